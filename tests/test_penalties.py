"""Presence, frequency and repetition penalties (`SamplingParams`), float32 on the CPU: greedy tokens
equal transformers' own repetition penalty in `generate`, and a step-by-step reference of the
formulas on transformers' logits; rows without penalties in the same batch are untouched; the
same with async scheduling (a token still on the device counted); bad values are one line."""

from __future__ import annotations

import pytest
import torch
import transformers

from epinfer import LLM, SamplingParams
from epinfer.core.errors import UserError
from tests.checkpoints import _load

PROMPTS = [[5, 6, 7, 5, 6], [9] * 12, list(range(30, 71)), [200, 3]]
NEW = 24


def reference(model, prompt: list[int], presence: float, frequency: float, repetition: float,
              bias: dict[int, float] | None = None) -> list[int]:
    """Greedy tokens with the logit bias, then the penalties, applied to transformers' logits, one step
    at a time."""
    ids, out = list(prompt), []
    with torch.inference_mode():
        for _ in range(NEW):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            for token, value in (bias or {}).items():
                logits[token] += value
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float() \
                if out else torch.zeros_like(logits)
            seen = counts > 0
            seen[torch.tensor(prompt)] = True
            logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
            logits = logits - frequency * counts - presence * (counts > 0).float()
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_5_moe"])
def test_penalties_match_references(family, ckpt_dir):
    path = ckpt_dir(family)
    model = _load(path)
    cases = [(0.0, 0.0, 1.3), (1.5, 0.7, 1.0), (-0.5, 0.3, 0.8), (0.0, 0.0, 1.0)]  # the last: no penalty
    refs = [reference(model, p, *c) for p, c in zip(PROMPTS, cases, strict=True)]
    with torch.inference_mode():  # transformers' own repetition penalty, for the first case
        hf = model.generate(torch.tensor([PROMPTS[0]]), attention_mask=torch.ones(1, len(PROMPTS[0]), dtype=torch.long),
                            generation_config=transformers.GenerationConfig(
                                do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, repetition_penalty=1.3,
                                eos_token_id=None, bos_token_id=None, pad_token_id=None))
    assert hf[0, len(PROMPTS[0]):].tolist() == refs[0]
    assert refs[1] != reference(model, PROMPTS[1], 0.0, 0.0, 1.0)  # (the penalties change these tokens)
    params = [SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, presence_penalty=p,
                             frequency_penalty=f, repetition_penalty=r) for p, f, r in cases]
    for async_scheduling in (False, True):
        llm = LLM(str(path), dtype="float32", device="cpu", async_scheduling=async_scheduling)
        outs = llm.generate(PROMPTS, params)
        assert [o.token_ids for o in outs] == refs, (family, async_scheduling)


def test_bad_penalties_are_one_line():
    for fields, fragment in [({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
                             ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3"),
                             ({"frequency_penalty": float("nan")}, "frequency_penalty must be a finite number"),
                             ({"repetition_penalty": 0}, "repetition_penalty must be > 0 (1: off), got 0"),
                             ({"repetition_penalty": True}, "repetition_penalty must be a number")]:
        with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            SamplingParams(max_tokens=4, **fields).resolved({})
    assert not SamplingParams(max_tokens=4).resolved({}).penalized
    assert SamplingParams(max_tokens=4).resolved({"repetition_penalty": 1.05}).penalized


def test_logit_bias(ckpt_dir):
    """OpenAI's logit_bias: +100 on a token makes greedy pick it every step; -100 on the tokens greedy
    picked keeps them out; a bias with penalties equals the reference (bias first, as vLLM); an id
    beyond the vocabulary is one line."""
    path = ckpt_dir("qwen3_moe")
    llm = LLM(str(path), dtype="float32", device="cpu")
    greedy = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    free = llm.generate(PROMPTS[2], greedy)[0].token_ids
    forced = llm.generate(PROMPTS[2], SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True,
                                                     logit_bias={42: 100}))[0].token_ids
    assert forced == [42] * NEW
    banned = set(free[:3])
    out = llm.generate(PROMPTS[2], SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True,
                                                  logit_bias={t: -100 for t in banned}))[0].token_ids
    assert not banned & set(out)
    bias = {free[0]: 3.5, 17: 2.0}
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, logit_bias=bias, repetition_penalty=1.3,
                            presence_penalty=0.5)
    assert llm.generate(PROMPTS[2], params)[0].token_ids == reference(_load(path), PROMPTS[2], 0.5, 0.0, 1.3, bias)
    with pytest.raises(UserError, match=r"request 0: logit_bias token id 999 is outside the vocabulary \(size 256\)"):
        llm.generate([1, 2], SamplingParams(max_tokens=2, logit_bias={999: 1.0}))


def test_allowed_token_ids(ckpt_dir):
    """Only `allowed_token_ids` are sampled: greedy tokens equal transformers' `generate` with the same
    set allowed (`prefix_allowed_tokens_fn`), beside an unconstrained request in the same batch and with
    a penalty on top; sampled tokens stay in the set; bad sets are one line."""
    path = ckpt_dir("qwen3_5_moe")
    model = _load(path)
    allowed = [3, 17, 42, 101, 250]
    with torch.inference_mode():
        hf = model.generate(torch.tensor([PROMPTS[2]]), attention_mask=torch.ones(1, len(PROMPTS[2]), dtype=torch.long),
                            prefix_allowed_tokens_fn=lambda batch, ids: allowed,
                            generation_config=transformers.GenerationConfig(
                                do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=None,
                                bos_token_id=None, pad_token_id=None))[0, len(PROMPTS[2]):].tolist()
    llm = LLM(str(path), dtype="float32", device="cpu")
    greedy = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    free = llm.generate(PROMPTS[2], greedy)[0].token_ids
    assert not set(free) <= set(allowed)  # (the set changes these tokens)
    outs = llm.generate([PROMPTS[2], PROMPTS[2], PROMPTS[2]], [
        SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, allowed_token_ids=allowed), greedy,
        SamplingParams(max_tokens=NEW, temperature=1.0, seed=7, ignore_eos=True, allowed_token_ids=allowed,
                       presence_penalty=1.0)])
    assert outs[0].token_ids == hf and outs[1].token_ids == free
    assert set(outs[2].token_ids) <= set(allowed)
    for bad, message in (([], "allowed_token_ids must be a non-empty list"), ([1, -2], "allowed_token_ids must be"),
                         ("3", "allowed_token_ids must be a non-empty list")):
        with pytest.raises(UserError, match=message):
            llm.generate([1, 2], SamplingParams(max_tokens=2, allowed_token_ids=bad))
    with pytest.raises(UserError, match=r"request 0: allowed token id 300 is outside the vocabulary \(size 256\)"):
        llm.generate([1, 2], SamplingParams(max_tokens=2, allowed_token_ids=[1, 300]))
