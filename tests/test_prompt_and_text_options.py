"""vLLM's `truncate_prompt_tokens` (only a prompt's last N tokens are used, -1: as many as leave
room for one generated token, applied before the length checks), `skip_special_tokens` (false:
special tokens stay in the text, and stop strings are searched in that text) and `bad_words` (never
in the answer: greedy tokens equal transformers' `generate` with `bad_words_ids`), offline, in
`epinfer generate`'s JSONL lines and on the server; a bad value is one clear error."""

from __future__ import annotations

import pytest

from epinfer.core.errors import UserError
from epinfer.core.sampling_params import SamplingParams, truncate_prompt


def test_truncate_prompt_rule_and_checks():
    ids = list(range(10))
    assert truncate_prompt(ids, None, 8) == ids
    assert truncate_prompt(ids, 3, 8) == [7, 8, 9]
    assert truncate_prompt(ids, 30, 8) == ids  # (longer than the prompt: all of it)
    assert truncate_prompt(ids, -1, 8) == list(range(3, 10))  # room for one generated token
    for good in (None, -1, 1, 4096):
        assert SamplingParams(truncate_prompt_tokens=good).resolved({}).truncate_prompt_tokens == good
    for bad in (0, -2, True, 2.5, "3"):
        with pytest.raises(UserError, match="truncate_prompt_tokens must be"):
            SamplingParams(truncate_prompt_tokens=bad).resolved({})


def test_truncated_prompts_generate_as_their_last_tokens():
    """Offline (demo model, float32): a prompt truncated to its last N tokens gives the tokens of that
    suffix sent whole; -1 lets a prompt longer than the model length through (its last
    max_model_len - 1 tokens); without it such a prompt is refused."""
    from epinfer import LLM

    llm = LLM(dtype="float32", device="cpu", max_model_len=48, max_num_seqs=4)
    prompt = [(7 * i + 3) % 200 + 10 for i in range(60)]
    greedy = dict(max_tokens=1, temperature=0, ignore_eos=True)
    got = llm.generate([prompt, prompt], [SamplingParams(truncate_prompt_tokens=12, **greedy),
                                          SamplingParams(truncate_prompt_tokens=-1, **greedy)])
    want = llm.generate([prompt[-12:], prompt[-47:]], SamplingParams(**greedy))
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [len(o.prompt_token_ids) for o in got] == [12, 47]
    with pytest.raises(UserError, match="max model length is 48"):
        llm.generate([prompt], SamplingParams(**greedy))


def test_server_truncates_before_its_length_checks():
    from epinfer.server.protocol import APIError, ModelInfo, parse_request

    info = ModelInfo("m", 16, 100, {})
    body = {"model": "m", "prompt": list(range(1, 41)), "max_tokens": 4}
    with pytest.raises(APIError, match="maximum context length is 16"):
        parse_request(dict(body), False, None, info)
    (req,) = parse_request({**body, "truncate_prompt_tokens": 6}, False, None, info)
    assert req.prompt_ids == list(range(35, 41)) and req.params.max_tokens == 4
    (req,) = parse_request({**body, "truncate_prompt_tokens": -1, "max_tokens": 1}, False, None, info)
    assert req.prompt_ids == list(range(26, 41))
    for bad in (0, -3, "5", 1.5, True):
        with pytest.raises(APIError, match="truncate_prompt_tokens"):
            parse_request({**body, "truncate_prompt_tokens": bad}, False, None, info)


def test_special_tokens_in_the_text_when_asked():
    """skip_special_tokens=False (demo model, its special tokens forced by allowed_token_ids): the text
    holds them, the ids are the same; a stop string made of one is found only in that text."""
    from epinfer import LLM

    llm = LLM(dtype="float32", device="cpu", max_num_seqs=4)
    forced = dict(max_tokens=6, temperature=0, ignore_eos=True, allowed_token_ids=[1, 2, 72])
    plain, kept = llm.generate(["The answer is"] * 2, [SamplingParams(**forced),
                                                       SamplingParams(skip_special_tokens=False, **forced)])
    assert plain.token_ids == kept.token_ids and {1, 2} & set(kept.token_ids)
    assert "<|im_" not in plain.text and "<|im_" in kept.text
    assert kept.text == llm.engine.tokenizer.decode(kept.token_ids, skip_special_tokens=False)
    stop = dict(forced, stop=["<|im_start|>"])
    skipped, found = llm.generate(["The answer is"] * 2, [SamplingParams(**stop),
                                                          SamplingParams(skip_special_tokens=False, **stop)])
    assert skipped.finish_reason == "length" and found.finish_reason == "stop"
    assert found.text == kept.text[:kept.text.index("<|im_start|>")]
    with pytest.raises(UserError, match="skip_special_tokens must be a boolean"):
        SamplingParams(skip_special_tokens="no").resolved({})


def test_server_text_with_special_tokens():
    """The server's parameters carry the flag (a non-boolean is a 400), and its text stream decodes with
    it, whole and a window at a time."""
    from epinfer.core.config import DEMO_MODEL
    from epinfer.engine.generation_files import load_tokenizer
    from epinfer.server.protocol import APIError, ModelInfo, parse_request
    from epinfer.server.text import TextStream

    info = ModelInfo("m", 64, 1000, {})
    body = {"model": "m", "prompt": [5, 6, 7], "max_tokens": 4}
    assert parse_request(dict(body), False, None, info)[0].params.skip_special_tokens is True
    (req,) = parse_request({**body, "skip_special_tokens": False}, False, None, info)
    assert req.params.skip_special_tokens is False
    with pytest.raises(APIError, match="skip_special_tokens"):
        parse_request({**body, "skip_special_tokens": "false"}, False, None, info)
    tokenizer = load_tokenizer(DEMO_MODEL)
    ids = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    seq = [ids[0], 1, *ids[1:], 2]
    for skip in (True, False):
        stream = TextStream(tokenizer, [], skip)
        sent = ""
        for t in seq:
            stream.add([t])
            sent += stream.delta(False)
        sent += stream.delta(True)
        want = tokenizer.decode(seq, skip_special_tokens=skip)
        assert sent == want == stream.full_text() and ("<|im_start|>" in want) != skip, (skip, sent)


def test_bad_words_are_never_generated():
    """A one-token word is never sampled; a two-token one never completed; with and without async
    scheduling (the longer word's check waits for the previous token): the tokens of transformers'
    `generate` with the same `bad_words_ids`."""
    import torch
    import transformers

    from epinfer import LLM
    from epinfer.core.config import DEMO_MODEL
    from epinfer.engine.bad_words import bad_word_ids

    prompts = ["Beautiful is", "Errors should"]
    words = ["Explicit", "Simple"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.float32)
    refs, plain = [], None
    for async_scheduling in (False, True):
        llm = LLM(dtype="float32", device="cpu", max_num_seqs=4, async_scheduling=async_scheduling)
        tok = llm.engine.tokenizer
        ids = bad_word_ids(tok, words, model.config.vocab_size)
        assert ids == [(509,), (384, 292)]  # (the demo tokenizer: a word of one token and one of two)
        greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        plain = plain or llm.generate(prompts, greedy)
        assert any(509 in o.token_ids for o in plain)  # (what the ban changes)
        if not refs:
            for prompt in prompts:
                x = tok(prompt, return_tensors="pt")["input_ids"]
                with torch.inference_mode():
                    out = model.generate(x, attention_mask=torch.ones_like(x), bad_words_ids=[list(w) for w in ids],
                                         generation_config=transformers.GenerationConfig(
                                             do_sample=False, max_new_tokens=24, min_new_tokens=24, pad_token_id=0))
                refs.append(out[0, x.shape[1]:].tolist())
        got = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, bad_words=words))
        assert [o.token_ids for o in got] == refs, async_scheduling
        for o in got:
            assert 509 not in o.token_ids and all(o.token_ids[i:i + 2] != [384, 292] for i in range(len(o.token_ids)))
    for bad in ([""], ["  "], "word", [3], ["x"] * 129):
        with pytest.raises(UserError, match="bad_words must be a list"):
            SamplingParams(bad_words=bad).resolved({})


def test_server_takes_bad_words():
    from epinfer.server.protocol import APIError, ModelInfo, parse_request

    info = ModelInfo("m", 64, 1000, {})
    body = {"model": "m", "prompt": [5, 6, 7], "max_tokens": 4}
    (req,) = parse_request({**body, "bad_words": ["a", "b c"]}, False, None, info)
    assert req.params.bad_words == ["a", "b c"]
    assert parse_request({**body, "bad_words": []}, False, None, info)[0].params.bad_words is None
    for bad in ("a", [1], [""]):
        with pytest.raises(APIError, match="bad_words"):
            parse_request({**body, "bad_words": bad}, False, None, info)


def test_a_guide_refused_names_its_request_field():
    """An error's `param` is the request's field (vLLM's names), not the engine's."""
    from epinfer.server.protocol import APIError, ModelInfo, parse_request

    info = ModelInfo("m", 64, 1000, {})
    body = {"model": "m", "prompt": [5, 6, 7], "max_tokens": 4}
    for extra, field in (({"guided_regex": "a("}, "guided_regex"), ({"guided_json": {"type": "nope"}}, "guided_json"),
                         ({"guided_choice": []}, "guided_choice")):
        with pytest.raises(APIError) as exc:
            parse_request({**body, **extra}, False, None, info)
        assert exc.value.param == field, (extra, exc.value.param, exc.value.message)
