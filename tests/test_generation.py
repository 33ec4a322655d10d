"""Greedy tokens and final logits equal transformers `generate`, for every supported family,
with all prompts batched together in epinfer (prefill and decode mixed, GDN chunk boundaries
crossed)."""

from __future__ import annotations

import pytest
import torch

from epinfer import LLM, SamplingParams
from tests.checkpoints import FAMILIES, hf_generate

PROMPT_LENS = (1, 7, 64, 65, 133)
NEW_TOKENS = 32


def prompts(vocab: int = 256) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def logits_of_last_step(llm: LLM, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """Re-run prompt + generated[:-1] as one prefill and return the logits of its last row."""
    eng = llm.engine
    seq = eng.make_request(prompt + generated[:-1], SamplingParams(max_tokens=1, temperature=0), 0)
    eng.submit(seq)
    captured = []
    orig = eng.runner.execute

    def spy(*args, **kwargs):
        out = orig(*args, **kwargs)
        captured.append(out)
        return out

    eng.runner.execute = spy
    try:
        while eng.scheduler.has_work():
            eng.step()
    finally:
        eng.runner.execute = orig
    return captured[-1][-1]


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers(family, ckpt_dir):
    path = ckpt_dir(family)
    llm = LLM(str(path), dtype="float32", device="cpu", max_num_batched_tokens=512)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    ps = prompts()
    outs = llm.generate(ps, params)
    for p, out in zip(ps, outs, strict=True):
        ref_tokens, ref_logits = hf_generate(path, p, NEW_TOKENS)
        assert out.token_ids == ref_tokens, f"{family}: prompt of {len(p)} tokens differs"
        assert out.finish_reason == "length"
        assert out.prompt_token_ids == p
    # final-step logits of the longest prompt
    p = ps[-1]
    ref_tokens, ref_logits = hf_generate(path, p, NEW_TOKENS)
    ours = logits_of_last_step(llm, p, outs[-1].token_ids)
    torch.testing.assert_close(ours, ref_logits.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", [
    dict(expert_layout="fused"),
    dict(sharded=True),
    dict(config_style="hub"),
])
@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_next", "qwen3_moe", "mixtral"])
def test_checkpoint_layouts(family, layout, ckpt_dir):
    base = ckpt_dir(family)
    variant = ckpt_dir(family, **layout)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ps = prompts()[:3]
    a = LLM(str(base), dtype="float32", device="cpu").generate(ps, params)
    b = LLM(str(variant), dtype="float32", device="cpu").generate(ps, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_multimodal_wrapper_layout(ckpt_dir):
    base = ckpt_dir("qwen3_5_moe")
    wrapped = ckpt_dir("qwen3_5_moe", multimodal=True)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ps = prompts()[:3]
    a = LLM(str(base), dtype="float32", device="cpu").generate(ps, params)
    b = LLM(str(wrapped), dtype="float32", device="cpu").generate(ps, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


_HF: dict[tuple[str, int], list[int]] = {}


def assert_transformers_tokens(path, ps: list[list[int]], got: list[list[int]], what: str) -> None:
    for p, tokens in zip(ps, got, strict=True):
        key = (str(path), len(p))
        if key not in _HF:
            _HF[key] = hf_generate(path, p, NEW_TOKENS)[0]
        assert tokens == _HF[key], f"{what}: prompt of {len(p)} tokens"


@pytest.mark.parametrize("budget", [1, 7, 64])
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_matches_transformers(family, budget, ckpt_dir):
    """Prompts split into chunks of `budget` tokens, chunks of several prompts packed into one step
    and mixed with running decodes (the varlen prefill path): tokens identical to transformers and
    to the unchunked run."""
    path = ckpt_dir(family)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    ps = prompts()
    chunked = LLM(str(path), dtype="float32", device="cpu", max_num_batched_tokens=budget, max_num_seqs=len(ps))
    whole = LLM(str(path), dtype="float32", device="cpu", max_num_batched_tokens=512)
    got = [o.token_ids for o in chunked.generate(ps, params)]
    assert got == [o.token_ids for o in whole.generate(ps, params)]
    assert_transformers_tokens(path, ps, got, f"{family}, chunks of {budget}")


def test_steps_over_the_largest_piece_run_eagerly(ckpt_dir, monkeypatch):
    """Pieces up to `piecewise.LARGEST` rows only (here 16, the budget 64): larger prompt steps run
    the whole-layer path, smaller ones the pieces; tokens identical to transformers (hybrid family)."""
    from epinfer.runner import piecewise

    monkeypatch.setattr(piecewise, "LARGEST", 16)
    path = ckpt_dir("qwen3_5_moe")
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    ps = prompts()
    llm = LLM(str(path), dtype="float32", device="cpu", max_num_batched_tokens=64, max_num_seqs=len(ps),
              piecewise_graphs=True)
    pieces, runner = llm.engine.runner.pieces, llm.engine.runner
    assert pieces.buckets[-1] == 16
    through, whole = [], []
    run, forward = pieces.run, runner.model.forward
    pieces.run = lambda batch, caches: through.append(batch.num_rows) or run(batch, caches)
    runner.model.forward = lambda batch, caches: whole.append(batch.num_rows) or forward(batch, caches)
    got = [o.token_ids for o in llm.generate(ps, params)]
    assert through and max(through) <= 16 and any(rows > 16 for rows in whole), (through, whole)
    assert_transformers_tokens(path, ps, got, "pieces up to 16 rows, steps of 64")


@pytest.mark.parametrize("budget", [7, 64])
@pytest.mark.parametrize("family", FAMILIES)
def test_graph_pieces_match(family, budget, ckpt_dir):
    """Prefill and mixed steps split into graph pieces (the eager mixers between per-row pieces on
    static buffers, rows padded to the pieces' buckets; plain calls on the CPU): tokens identical to
    the whole-layer path and to transformers."""
    path = ckpt_dir(family)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    ps = prompts()
    llm = LLM(str(path), dtype="float32", device="cpu", max_num_batched_tokens=budget, max_num_seqs=len(ps),
              piecewise_graphs=True)
    pieces = llm.engine.runner.pieces
    sizes = []
    run = pieces.run
    pieces.run = lambda batch, caches: sizes.append((batch.num_real_rows, batch.num_rows)) or run(batch, caches)
    got = [o.token_ids for o in llm.generate(ps, params)]
    assert sizes and any(real < rows for real, rows in sizes), "no step ran padded through the pieces"
    assert all(rows in pieces.buckets for _, rows in sizes)
    whole = LLM(str(path), dtype="float32", device="cpu", max_num_batched_tokens=budget, max_num_seqs=len(ps))
    assert whole.engine.runner.pieces is None
    assert got == [o.token_ids for o in whole.generate(ps, params)]
    assert_transformers_tokens(path, ps, got, f"{family}, chunks of {budget}")
