"""Long prompt chunks through `kernels.cudnn_attention` (GPUs, EPINFER_CUDNN_CHUNKS=1), checked on the
CPU with its float32 torch form standing in for cuDNN: the padded causal part, the context part and
their log-sum-exp merge against SDPA, and whole runs with the scheduler's aligned chunks against
transformers."""

from __future__ import annotations

import pytest
import torch

from epinfer import LLM, SamplingParams
from epinfer.kernels import cudnn_attention
from epinfer.layers.attention import _sdpa
from tests.test_generation import assert_transformers_tokens, prompts


@pytest.mark.parametrize("N,context", [(37, 0), (512, 0), (64, 32), (50, 96), (1, 64)])
def test_chunk_attention_matches_sdpa(N, context):
    torch.manual_seed(N + context)
    H, KVH, hd = 4, 2, 16
    q = torch.randn(N, H, hd)
    k, v = torch.randn(context + N, KVH, hd), torch.randn(context + N, KVH, hd)
    ctx = (k[:context], v[:context]) if context else (None, None)
    got = cudnn_attention.chunk_attention(q, k[context:], v[context:], *ctx, hd**-0.5, cudnn_attention.reference)
    torch.testing.assert_close(got, _sdpa(q, k, v, context, hd**-0.5), atol=2e-6, rtol=1e-5)


def test_context_gathers_scattered_blocks():
    bs, KVH, hd = 4, 2, 8
    k_cache, v_cache = torch.randn(10, bs, KVH, hd), torch.randn(10, bs, KVH, hd)
    blocks = torch.tensor([7, 2, 9, 0], dtype=torch.int32)
    k, v = cudnn_attention.context(k_cache, v_cache, blocks, 14)
    assert torch.equal(k, k_cache[[7, 2, 9, 0]].reshape(-1, KVH, hd)[:14])
    assert torch.equal(v, v_cache[[7, 2, 9, 0]].reshape(-1, KVH, hd)[:14])
    assert cudnn_attention.context(k_cache, v_cache, blocks, 0) == (None, None)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_5_moe"])
def test_long_chunks_match_transformers(family, ckpt_dir, monkeypatch):
    """Small stand-ins for the GPU's sizes (chunks of 16 rows or more, contexts of multiples of 16,
    rows padded to multiples of 8): every prompt of 64 or more tokens goes through the path, fresh
    and after context, with decodes and short chunks in the same steps on the usual path."""
    monkeypatch.setattr(cudnn_attention, "usable", lambda q: True)
    monkeypatch.setattr(cudnn_attention, "cudnn", cudnn_attention.reference)
    monkeypatch.setattr(cudnn_attention, "_SHAPES", set())
    for name, value in (("MIN_ROWS", 16), ("ALIGN", 16), ("PAD", 8)):
        monkeypatch.setattr(cudnn_attention, name, value)
    taken = []
    chunk_attention = cudnn_attention.chunk_attention
    monkeypatch.setattr(cudnn_attention, "chunk_attention",
                        lambda q, k, v, ck, cv, *a: taken.append((q.shape[0], 0 if ck is None else ck.shape[0]))
                        or chunk_attention(q, k, v, ck, cv, *a))
    path = ckpt_dir(family)
    ps = prompts()
    llm = LLM(str(path), dtype="float32", device="cpu", max_num_batched_tokens=40, max_num_seqs=len(ps))
    assert llm.engine.scheduler.alignment() == (16, 16)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    got = [o.token_ids for o in llm.generate(ps, params)]
    assert any(c == 0 for _, c in taken) and any(c > 0 for _, c in taken), taken
    assert all(c % 16 == 0 and n >= 16 for n, c in taken)
    assert_transformers_tokens(path, ps, got, f"{family}, long chunks")


def test_refusal_falls_back_once(ckpt_dir, monkeypatch, capsys):
    """cuDNN refusing a shape: one note, then every chunk on the usual path, the same tokens."""
    monkeypatch.setattr(cudnn_attention, "_REFUSED", [])
    monkeypatch.setattr(cudnn_attention, "_SHAPES", set())
    monkeypatch.setattr(cudnn_attention, "usable", lambda q: not cudnn_attention._REFUSED)  # (its device test off)
    for name, value in (("MIN_ROWS", 16), ("ALIGN", 16), ("PAD", 8)):
        monkeypatch.setattr(cudnn_attention, name, value)
    calls = []

    def refuse(*args):
        calls.append(1)
        raise RuntimeError("cuDNN Frontend error: No valid execution plans built.\nmore")

    monkeypatch.setattr(cudnn_attention, "cudnn", refuse)
    path = ckpt_dir("qwen3_moe")
    ps = prompts()
    llm = LLM(str(path), dtype="float32", device="cpu", max_num_batched_tokens=40, max_num_seqs=len(ps))
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    got = [o.token_ids for o in llm.generate(ps, params)]
    assert_transformers_tokens(path, ps, got, "after cuDNN refused")
    err = capsys.readouterr().err
    assert len(calls) == 1 and err.count("cuDNN attention failed") == 1
    assert "No valid execution plans built. more" in err
    assert llm.engine.scheduler.alignment() == (0, 0)  # and the scheduler stops cutting for it


def test_shapes_are_capped_and_warm_up_plans_both_kinds(monkeypatch, capsys):
    monkeypatch.setattr(cudnn_attention, "_SHAPES", set())
    monkeypatch.setattr(cudnn_attention, "_REFUSED", [])
    monkeypatch.setattr(cudnn_attention, "MAX_SHAPES", 3)
    seen = []
    monkeypatch.setattr(cudnn_attention, "cudnn", lambda q, k, v, causal, scale: seen.append(
        (q.shape[2], k.shape[2], causal)) or cudnn_attention.reference(q, k, v, causal, scale))
    cudnn_attention.warm_up(4, 2, 16, torch.float32, torch.device("cpu"))
    M, A = cudnn_attention.MIN_ROWS, cudnn_attention.ALIGN
    assert seen == [(M, M, True), (M, A, False), (M, M, True)]  # after context, then fresh
    assert {(M, A), (M, 0)} == cudnn_attention._SHAPES
    assert cudnn_attention.eligible(M + 1, 0)  # the third plan
    assert cudnn_attention.eligible(M, A) and not cudnn_attention.eligible(M + 1, A)  # past the cap: known only
    assert not cudnn_attention.eligible(M - 1, 0) and not cudnn_attention.eligible(M, A + 16)
    assert not cudnn_attention.eligible(M, cudnn_attention.MAX_CONTEXT + A)

    def refuse(*args):
        raise RuntimeError("unsupported head dim")

    monkeypatch.setattr(cudnn_attention, "_SHAPES", set())
    monkeypatch.setattr(cudnn_attention, "cudnn", refuse)
    cudnn_attention.warm_up(4, 2, 16, torch.float32, torch.device("cpu"))
    assert cudnn_attention._REFUSED == ["unsupported head dim"]
    assert "cuDNN attention failed (unsupported head dim)" in capsys.readouterr().err
