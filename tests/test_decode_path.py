"""The decode fast path (batched paged-decode attention, device-side padding) on CPU, where it runs
the torch reference kernel: same tokens as the eager per-sequence path, padding rows inert. The
Triton kernel and the CUDA graphs are checked against the same references in tests/gpu."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from epinfer.core.sampling_params import SamplingParams
from epinfer.distributed.parallel import ParallelContext
from epinfer.engine.engine import Engine, EngineConfig
from epinfer.kernels.paged_attention import decode_attention_reference
from epinfer.runner.cuda_graphs import buckets_up_to

PROMPTS = [[5, 17, 99, 3, 250, 41, 7], list(range(10, 80)), [200, 100, 50], [9]]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def paged_case(lens: list[int], H=4, KVH=2, hd=16, bs=4, seed=0):
    """Random q and a paged cache whose blocks are deliberately scattered; returns the inputs and
    the expected output from one plain SDPA per row."""
    gen = torch.Generator().manual_seed(seed)
    B, max_blocks = len(lens), max(1, -(-max(lens) // bs))
    num_blocks = B * max_blocks + 3
    k_cache = torch.randn(num_blocks, bs, KVH, hd, generator=gen)
    v_cache = torch.randn(num_blocks, bs, KVH, hd, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(B + 1, max_blocks, dtype=torch.int32)
    slots = torch.randperm(B + 1, generator=gen)[:B]
    for b in range(B):
        table[slots[b]] = perm[b * max_blocks:(b + 1) * max_blocks].int()
    q = torch.randn(B, H, hd, generator=gen)
    expected = torch.zeros(B, H, hd)
    for b, n in enumerate(lens):
        if n == 0:
            continue
        pages = table[slots[b]].long()
        keys = k_cache[pages].reshape(-1, KVH, hd)[:n].transpose(0, 1).repeat_interleave(H // KVH, 0)
        values = v_cache[pages].reshape(-1, KVH, hd)[:n].transpose(0, 1).repeat_interleave(H // KVH, 0)
        expected[b] = F.scaled_dot_product_attention(q[b][:, None], keys, values, scale=hd**-0.5)[:, 0]
    return (q, k_cache, v_cache, table, slots, torch.tensor(lens)), expected


def test_reference_decode_attention_matches_sdpa():
    args, expected = paged_case([1, 5, 17, 0, 12])
    out = decode_attention_reference(*args, scale=16**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out[3].abs().max() == 0  # a padding row (length 0) gets zeros


def test_buckets():
    assert buckets_up_to(256)[:6] == [1, 2, 4, 8, 16, 32] and buckets_up_to(256)[-1] == 256
    assert buckets_up_to(3) == [1, 2, 3] and buckets_up_to(40)[-2:] == [32, 40]
    assert buckets_up_to(512)[19:22] == [256, 288, 320] and len(buckets_up_to(832)) == 38  # by 32s past 256


def run(folder, fast: bool, extra_rows: int = 0, poison: bool = False) -> list[list[int]]:
    engine = Engine(EngineConfig(model=str(folder), dtype="float32", device="cpu"),
                    ParallelContext(poison_pads=poison))
    runner = engine.runner
    runner.fast_decode = fast
    used = []
    if extra_rows:  # padding rows past the real ones, as data-parallel padding or a graph bucket adds
        execute = runner.execute

        def padded(plan, rows=None, **kw):
            fast_step = runner.decode_meta_host(plan, len(plan.items)) is not None
            used.append(fast_step)
            return execute(plan, rows=plan.num_tokens + extra_rows, **kw)

        runner.execute = padded
    seqs = [engine.add_request(p, GREEDY) for p in PROMPTS]
    while engine.scheduler.has_work():
        engine.step()
    if extra_rows:
        assert any(used) and not all(used)  # both paths ran
    return [s.output_ids for s in seqs]


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_moe"])
def test_fast_decode_path_gives_the_same_tokens(ckpt_dir, family):
    folder = ckpt_dir(family)
    eager = run(folder, fast=False)
    assert run(folder, fast=True) == eager
    # padding rows on the fast path: scratch slot, zero routing weight; NaN-poisoned they stay inert
    assert run(folder, fast=True, extra_rows=3, poison=True) == eager


@pytest.mark.parametrize("T,first,n,total", [(5, 0, 8, 8), (64, 2, 3, 8), (1100, 4, 4, 8), (3000, 0, 8, 8)])
def test_pair_permutation_and_combine(T, first, n, total):
    """The sync-free MoE permutation equals a stable sort by local expert (other ranks' experts
    last), and combining per-pair expert outputs — with garbage where grouped_mm leaves rows
    undefined — equals the per-expert reference loop."""
    from epinfer.layers.moe import FusedExperts, combine_pairs, permute_pairs

    gen = torch.Generator().manual_seed(T)
    K, D, inter = 2, 8, 6
    ids = torch.stack([torch.randperm(total, generator=gen)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=gen)
    order, offs, rows, active = permute_pairs(ids, first, n)
    local = ids.flatten() - first
    key = torch.where((local >= 0) & (local < n), local, n)
    assert torch.equal(order, torch.argsort(key, stable=True))
    assert offs.tolist() == torch.bincount(key, minlength=n + 1)[:n].cumsum(0).tolist()
    assert torch.equal(rows, order // K)
    used = sorted(set(key.tolist()) - {n})  # the Triton kernels' grid: used experts, then -1
    assert active.tolist() == used + [-1] * (min(T * K, n) - len(used))

    experts = FusedExperts(range(first, first + n), D, inter, total)
    experts.w13.data.normal_(generator=gen)
    experts.w2.data.normal_(generator=gen)
    x = torch.randn(T, D, generator=gen)
    y = torch.full((T * K, D), float("nan"))  # what grouped_mm would compute, NaN past the groups
    start = 0
    for e, end in enumerate(offs.tolist()):
        r = rows[start:end]
        gate, up = (x[r] @ experts.w13[e].T).chunk(2, dim=-1)
        y[start:end] = (F.silu(gate) * up) @ experts.w2[e].T
        start = end
    out = combine_pairs(y, weights, ids, order, first, n)
    torch.testing.assert_close(out, experts(x, weights, ids), rtol=1e-5, atol=1e-5)
