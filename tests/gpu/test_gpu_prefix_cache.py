"""GPU correctness of prefix caching in a hybrid model (skipped without CUDA; run them on a GPU):
the GDN state snapshots taken and restored on the device, several in one step (one gather and one
scatter a state tensor for all of them), with decode graphs and graph pieces on, in float32: tokens
identical to the same engine without prefix caching and to transformers, with cache hits."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("pieces", [True, False])
def test_hybrid_prefix_cache_on_gpu(ckpt_dir, pieces):
    from epinfer import LLM
    from tests.checkpoints import hf_generate
    from tests.test_prefix_cache import BASE, GREEDY

    path = str(ckpt_dir("qwen3_5_moe"))
    system = BASE[:48]
    first = [system + [5] * 30, system + [6] * 20, BASE[:70]]  # three snapshots in the same steps
    then = [system + [7] * 9, system + [8] * 17, system + [6] * 20, BASE[:70] + [9] * 3]  # restores
    kw = {"dtype": "float32", "device": "cuda", "piecewise_graphs": pieces, "max_num_seqs": 8}
    off = LLM(path, enable_prefix_caching=False, **kw)
    want = [o.token_ids for o in off.generate(first + then, GREEDY)]
    llm = LLM(path, **kw)
    got = [o.token_ids for o in llm.generate(first, GREEDY)] + [o.token_ids for o in llm.generate(then, GREEDY)]
    stats = llm.engine.scheduler.allocator.stats()
    assert got == want
    assert stats["prefix_cache_hits"] > 0 and stats["state_snapshots"] >= 3, stats
    for prompt, tokens in zip(first + then, got, strict=True):
        assert tokens == hf_generate(path, prompt, 8)[0]
