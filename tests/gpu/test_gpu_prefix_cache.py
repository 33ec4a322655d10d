"""GPU correctness of prefix caching in a hybrid model (skipped without CUDA; run them on a GPU):
the GDN state snapshots taken and restored on the device, several in one step (one gather and one
scatter a state tensor for all of them; one row written twice in a step when a single row is kept;
one row restored by two sequences in a step), with decode graphs and with and without graph
pieces, in float32: tokens identical to the same engine without prefix caching and to
transformers (`tests/test_prefix_cache.py` runs the same on the CPU)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("snapshots", [0, 1])
@pytest.mark.parametrize("pieces", [True, False])
def test_hybrid_prefix_cache_on_gpu(ckpt_dir, pieces, snapshots):
    from tests.test_prefix_cache import check_hybrid_reuse

    check_hybrid_reuse(str(ckpt_dir("qwen3_5_moe")), "cuda", snapshots, piecewise_graphs=pieces)
