"""GPU correctness of prefix caching in a hybrid model (skipped without CUDA; run them on a GPU):
the GDN state snapshots taken and restored on the device, several in one step (one gather and one
scatter a state tensor for all of them; one row written twice in a step when a single row is kept;
one row restored by two sequences in a step), with decode graphs and with and without graph
pieces, in float32: tokens identical to the same engine without prefix caching and to
transformers (`tests/test_prefix_cache.py` runs the same on the CPU). In bf16 at the Qwen3.5
shape (fla's kernels, the bf16 state): states captured inside a prompt chunk against the same
snapshot taken by cutting the chunk there."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("snapshots", [0, 1])
@pytest.mark.parametrize("pieces", [True, False])
def test_hybrid_prefix_cache_on_gpu(ckpt_dir, pieces, snapshots):
    from tests.test_prefix_cache import check_hybrid_reuse

    check_hybrid_reuse(str(ckpt_dir("qwen3_5_moe")), "cuda", snapshots, piecewise_graphs=pieces)


def test_bf16_state_captured_inside_a_chunk(tmp_path, monkeypatch):
    """A 1025-token prompt's snapshot at 1024 tokens, captured inside its one chunk from fla's
    per-chunk states (and the conv inputs before it), against the engine that cuts the chunk at 1024
    and copies the state slot: every GDN layer's conv and recurrent rows agree to bf16 rounding (the
    two forwards' GEMMs differ in rows). The prompt's tokens equal those of the engine without
    prefix caching (same schedule, no cut), and a prompt extending it restores 1024 tokens."""
    from epinfer import LLM, SamplingParams
    from epinfer.bench.single import shape_folder

    folder = shape_folder("qwen3.5-35b-a3b", 4, str(tmp_path))
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, 200000, (1025,), generator=gen).tolist()
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    kw = {"dtype": "bfloat16", "device": "cuda", "random_weights": True, "max_num_seqs": 4,
          "max_model_len": 2048, "cuda_graphs": False}

    def snapshot_rows(llm) -> list[torch.Tensor]:
        snapshots = llm.engine.scheduler.allocator.snapshots
        assert len(snapshots) == 1, snapshots
        row = llm.engine.runner.layout.snapshot_row(next(iter(snapshots.values())))
        return [t[row].float().clone() for t in llm.engine.runner.cache.states]

    off = LLM(str(folder), enable_prefix_caching=False, **kw).generate([prompt], greedy)[0].token_ids
    cap = LLM(str(folder), **kw)
    assert cap.generate([prompt], greedy)[0].token_ids == off
    assert cap.engine.scheduler.allocator.stats()["snapshot_captures"] == 1
    captured = snapshot_rows(cap)
    monkeypatch.setenv("EPINFER_STATE_CAPTURE", "0")
    cut = LLM(str(folder), **kw)
    cut.generate([prompt], greedy)
    assert cut.engine.scheduler.allocator.stats()["snapshot_captures"] == 0
    for i, (a, b) in enumerate(zip(captured, snapshot_rows(cut), strict=True)):
        err = ((a - b).norm() / b.norm()).item()
        assert err < 2e-2, (i, err)
    hits = cap.engine.scheduler.allocator.hit_tokens
    cap.generate([prompt + [7] * 20], greedy)
    assert cap.engine.scheduler.allocator.hit_tokens - hits == 1024
