"""`truncate_prompt_tokens` (vLLM's): only a prompt's last N tokens are used (-1: as many as leave
room for one generated token), offline, in `epinfer generate`'s JSONL lines and on the server, applied
before the length checks; anything else than -1 or a positive integer is one clear error."""

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
