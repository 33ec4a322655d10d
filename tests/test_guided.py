"""Guided choice (`SamplingParams.choices`, vLLM's `guided_choice`): the answer is exactly one of the
strings; greedy tokens equal transformers' `generate` constrained by an independent rule (a token is
allowed where the text decoded so far plus it begins a choice; the end-of-sequence id where the text
is one), with and without async scheduling, beside unconstrained requests; sampled answers are
choices too; bad choice lists are one line."""

from __future__ import annotations

import pytest
import torch
import transformers

from epinfer import LLM, SamplingParams
from epinfer.core.config import DEMO_MODEL
from epinfer.core.errors import UserError

CHOICES = ["yes", "no", "maybe so", "yes indeed"]
PROMPTS = ["The answer is", "Beautiful is", "Errors should"]


@pytest.fixture(scope="module")
def demo():
    return LLM(dtype="float32")


def reference(demo, prompt: str, choices: list[str]) -> list[int]:
    tok = demo.tokenizer
    model = transformers.AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.float32)
    ids = tok(prompt)["input_ids"]
    special = set(tok.all_special_ids)
    eos = demo.engine.eos_ids

    def allowed(batch, sequence):
        said = sequence[len(ids):].tolist()
        text = tok.decode(said)
        out = [t for t in range(len(tok)) if t not in special
               and any(c.startswith(tok.decode(said + [t])) and len(tok.decode(said + [t])) > len(text)
                       for c in choices)]
        return out + (sorted(eos) if text in choices else [])

    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             prefix_allowed_tokens_fn=allowed, generation_config=transformers.GenerationConfig(
                                 do_sample=False, max_new_tokens=20, eos_token_id=sorted(eos), pad_token_id=0))
    return out[0, len(ids):].tolist()


def test_guided_choice(demo):
    refs = [reference(demo, p, CHOICES) for p in PROMPTS]
    greedy = SamplingParams(max_tokens=20, temperature=0, choices=CHOICES)
    free = SamplingParams(max_tokens=20, temperature=0)
    for async_scheduling in (False, True):
        llm = LLM(dtype="float32", async_scheduling=async_scheduling)
        outs = llm.generate(PROMPTS + PROMPTS[:1], [greedy] * len(PROMPTS) + [free])
        assert [o.token_ids for o in outs[:-1]] == refs, async_scheduling
        assert all(o.text in CHOICES and o.finish_reason == "stop" for o in outs[:-1])
        assert outs[-1].text not in CHOICES  # (the unconstrained request beside them)
    sampled = demo.generate(PROMPTS * 3, [SamplingParams(max_tokens=20, temperature=1.5, seed=i, choices=CHOICES)
                                          for i in range(9)])
    assert all(o.text in CHOICES for o in sampled) and len({o.text for o in sampled}) > 1


@pytest.mark.parametrize("choices,fragment", [([], "choices must be a list of 1 to 64"),
                                              (["a", ""], "non-empty strings"), ("yes", "choices must be a list"),
                                              (["a", 3], "non-empty strings"), (["\ud800"], "not valid Unicode")])
def test_bad_choices(demo, choices, fragment):
    with pytest.raises(UserError, match=fragment):
        demo.generate("x", SamplingParams(max_tokens=4, choices=choices))


def test_choices_need_an_end(demo):
    with pytest.raises(UserError, match="guided choice needs a tokenizer and an end-of-sequence or stop token"):
        demo.generate("x", SamplingParams(max_tokens=4, choices=["a"], ignore_eos=True))
    out = demo.generate("x", SamplingParams(max_tokens=8, choices=["ab"], ignore_eos=True, stop_token_ids=[5]))[0]
    assert out.token_ids[-1] == 5 and out.finish_reason == "stop"
