"""Prompt logprobs (`SamplingParams.prompt_logprobs`): each prompt token's logprob given the tokens
before it, its rank and the top N, equal to transformers' one forward over the prompt, for every
family, whole and in prompt chunks mixed with decodes, through the graph pieces, and for a prompt
whose blocks are in the prefix cache (such a request computes its prompt again)."""

from __future__ import annotations

import pytest
import torch

from epinfer import LLM, SamplingParams
from epinfer.core.errors import UserError
from tests.checkpoints import FAMILIES, _load

PROMPT_LENS = (1, 2, 9, 40, 70)
TOP = 3


def prompts(vocab: int = 256) -> list[list[int]]:
    gen = torch.Generator().manual_seed(99)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def reference(path, prompt: list[int]) -> torch.Tensor:
    """transformers' log-softmax over the prompt's positions, float32 [P, V]."""
    with torch.no_grad():
        logits = _load(path)(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def check(records: list, prompt: list[int], ref: torch.Tensor, what: str) -> None:
    assert len(records) == len(prompt) and records[0] is None, what
    for i in range(1, len(prompt)):
        logprob, rank, top = records[i]
        row = ref[i - 1]
        assert abs(logprob - row[prompt[i]].item()) < 1e-4, f"{what}: position {i}"
        chosen = row[prompt[i]].item()  # (ranks and top ids: as far as float32 rounding can tell them apart)
        assert int((row > chosen + 1e-4).sum()) + 1 <= rank <= int((row > chosen - 1e-4).sum()) + 1, \
            f"{what}: rank at position {i}"
        values = torch.topk(row, TOP).values
        torch.testing.assert_close(torch.tensor([v for _, v in top]), values, atol=1e-4, rtol=0)
        torch.testing.assert_close(row[[t for t, _ in top]], values, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_logprobs_match_transformers(family, ckpt_dir):
    path = ckpt_dir(family)
    ps = prompts()
    refs = [reference(path, p) for p in ps]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=TOP)
    for budget, pieces in ((512, False), (7, False), (16, True)):
        llm = LLM(str(path), dtype="float32", device="cpu", max_num_batched_tokens=budget, max_num_seqs=len(ps),
                  piecewise_graphs=pieces)
        plain = llm.generate(ps, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        assert all(o.prompt_logprobs is None for o in plain)
        outs = llm.generate(ps, params)  # the prompts' blocks are cached now: computed again all the same
        for p, out, ref, base in zip(ps, outs, refs, plain, strict=True):
            check(out.prompt_logprobs, p, ref, f"{family}, chunks of {budget}, pieces {pieces}, {len(p)} tokens")
            assert out.token_ids == base.token_ids


def test_prompt_logprobs_are_checked():
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(UserError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad).resolved({})
