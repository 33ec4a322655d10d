"""JSON mode (`SamplingParams.json_object`, `response_format: {"type": "json_object"}`): the byte
parser accepts exactly the JSON objects `json.loads` accepts (nothing after the closing brace; the
texts here are within its nesting and whitespace limits) and refuses broken ones at the byte where
they break; the trie walk's allowed ids equal a direct check of every token; the engine's answers,
greedy and sampled, with and without async scheduling, are JSON objects (or, cut by max_tokens,
beginnings of one); greedy tokens equal transformers' `generate` constrained by the direct check."""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers

from epinfer import LLM, SamplingParams
from epinfer.core.config import DEMO_MODEL
from epinfer.core.errors import UserError
from epinfer.engine.guided import vocab_bytes
from epinfer.engine.json_mode import MAX_SPACE, OBJECT, START, json_vocab

GOOD = [{}, {"a": 1}, {"a": [1, -2.5e+10, 0, 0.25, -0, 1E-3], "b": {"c": None, "d": True, "e": False}},
        {"s": "quote \" back \\ slash / tab \t nl \n u \u00e9 \u2603 ctrl \u0001"}, {"": [[], {}, [[{}]]]},
        {"k": "x" * 50}]


def walk(text: bytes):
    return OBJECT.walk(START, text)


def test_parser_accepts_json_objects_and_refuses_broken_ones():
    for value in GOOD:
        for text in (json.dumps(value), json.dumps(value, indent=2), json.dumps(value, separators=(",", ":"))):
            raw = text.encode()
            assert walk(raw)[1] == "D", text
            assert all(walk(raw[:k]) not in (None,) and walk(raw[:k])[1] != "D" for k in range(len(raw))), text
    for bad in ('[1]', '"a"', ' {}', '{"a":}', '{"a" 1}', '{,}', '{"a":01}', '{"a":1.}', '{"a":tru}', '{"a":1,}',
                '{"a":"\x01"}', '{"a":"\\q"}', '{} x', '{}{}', '{"a":[1,]}', '{"a":-}', '{"a":1e}', '{"a":"\\u12g4"}',
                '{a:1}', '{"a":1 "b":2}', "{" + " " * (MAX_SPACE + 1) + "}"):
        assert walk(bad.encode()) is None or walk(bad.encode())[1] != "D", bad
    rng = random.Random(0)  # against json.loads: short random texts of JSON's alphabet
    alphabet = list('{}[]":,01-.eE tfnrulsa\\') + ['"a"', '"b"', "true", "null", "12", "\n"]
    agree = 0
    for _ in range(20000):
        text = "{" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 8)))
        try:
            ok = isinstance(json.loads(text), dict) and text == text.rstrip()  # (the end right after the "}")
        except ValueError:
            ok = False
        state = walk(text.encode())
        assert (state is not None and state[1] == "D") == ok, text
        agree += ok
    assert agree > 50  # (enough of them are objects for the check to mean something)


def direct_allowed(vocab, state) -> list[int]:
    return [t for t, raw in enumerate(vocab.of) if raw and OBJECT.walk(state, raw) is not None]


def test_sweep_equals_a_direct_check():
    llm = LLM()
    vocab = vocab_bytes(llm.tokenizer, llm.engine.model_config.vocab_size)
    jv = json_vocab(vocab)
    for prefix in (b"{", b'{"a', b'{"a":', b'{"a": 1', b'{"a": [', b'{"a": "x\\', b'{"a": "x\\u00', b'{"a": tr',
                   b'{"a": {"b": 1}', b'{"a": -0.5e', b"{ \n", b'{"a":' + b" " * 15):
        state = walk(prefix)
        assert state is not None, prefix
        assert jv.allowed(state).ids.tolist() == direct_allowed(vocab, state), prefix
        base = (*state[:3], 0)
        assert jv.allowed(base) is jv.allowed(base)  # (remembered, once for every whitespace run)


def reference(tokenizer, prompt: str, eos: set[int]) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.float32)
    ids = tokenizer(prompt)["input_ids"]
    vocab = vocab_bytes(tokenizer, model.config.vocab_size)

    def allowed(batch, sequence):
        state = walk(b"".join(vocab.of[t] for t in sequence[len(ids):].tolist()))
        return sorted(eos) if state[1] == "D" else direct_allowed(vocab, state)

    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             prefix_allowed_tokens_fn=allowed, generation_config=transformers.GenerationConfig(
                                 do_sample=False, max_new_tokens=40, eos_token_id=sorted(eos), pad_token_id=0))
    return out[0, len(ids):].tolist()


def test_answers_are_json_objects():
    prompts = ["The answer is", "Beautiful is", "Errors should"]
    greedy = SamplingParams(max_tokens=40, temperature=0, json_object=True)
    refs = None
    for async_scheduling in (False, True):
        llm = LLM(dtype="float32", async_scheduling=async_scheduling)
        refs = refs or [reference(llm.tokenizer, p, llm.engine.eos_ids) for p in prompts]
        outs = llm.generate(prompts, greedy)
        assert [o.token_ids for o in outs] == refs, async_scheduling
        sampled = llm.generate(prompts * 4, [SamplingParams(max_tokens=60, temperature=1.2, seed=i, json_object=True)
                                             for i in range(12)])
        for o in outs + sampled:
            if o.finish_reason == "stop":
                assert isinstance(json.loads(o.text), dict), o.text
            else:
                assert walk(o.text.encode()) is not None, o.text
        assert any(o.finish_reason == "stop" for o in outs + sampled)


def test_json_mode_checked():
    llm = LLM()
    with pytest.raises(UserError, match="json_object, json_schema, regex and choices: give one of them"):
        llm.generate("x", SamplingParams(max_tokens=4, json_object=True, choices=["a"]))
    with pytest.raises(UserError, match="json_object must be a boolean"):
        llm.generate("x", SamplingParams(max_tokens=4, json_object=1))
    with pytest.raises(UserError, match="JSON mode needs a tokenizer"):
        llm.generate("x", SamplingParams(max_tokens=4, json_object=True, ignore_eos=True))
