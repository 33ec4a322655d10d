"""The Triton kernels in Triton's interpreter (CPU tensors) against the torch references: a
correctness check for kernel work on a machine without a GPU (speed needs a GPU).

    pip install triton  # in a scratch venv, never the CI one
    PYTHONPATH=. python scripts/triton_interpret_check.py
"""
import os

os.environ["TRITON_INTERPRET"] = "1"
import torch
import torch.nn.functional as F

from epinfer.distributed.communicator import row_layout, row_views
from epinfer.kernels import gdn_ops, paged_attention
from tests.test_decode_path import paged_case

torch.manual_seed(0)
# conv step
B, C, K, slots_total = 3, 300, 4, 6
for dtype in (torch.float32, torch.bfloat16):
    state = torch.randn(slots_total, C, K - 1).to(dtype)
    x = torch.randn(B, C).to(dtype)
    w = torch.randn(C, K).to(dtype)
    slots = torch.tensor([4, 0, 2])
    ref_state = state.clone()
    full = torch.cat([ref_state[slots].to(x.dtype), x[:, :, None]], dim=2)
    ref_state[slots] = full[:, :, 1:]
    ref_out = F.silu((full.float() * w.float()[None]).sum(-1)).to(dtype)
    out = gdn_ops.conv_triton(state, slots, x, w)
    print("conv", dtype, (out.float() - ref_out.float()).abs().max().item(), torch.equal(state, ref_state))
# recurrent step
Bq, Hk, Hv, DK, DV = 2, 2, 4, 16, 32
q, k = torch.randn(Bq, Hk, DK), torch.randn(Bq, Hk, DK)
v = torch.randn(Bq, Hv, DV)
g = -torch.rand(Bq, Hv) * 2
beta = torch.rand(Bq, Hv)
st = torch.randn(5, Hv, DK, DV)
sl = torch.tensor([3, 1])
ro, rs = gdn_ops.recurrent_gated_delta_step(q, k, v, g, beta, st[sl])
o = gdn_ops._recurrent_triton(q, k, v, g, beta, st, sl)
print("gdn", (o - ro).abs().max().item(), (st[sl] - rs).abs().max().item())
# paged decode
args, expected = paged_case([1, 5, 17, 0, 12], H=4, KVH=2, hd=16, bs=4)
out = paged_attention._decode_triton(*args, 16**-0.5)
print("attn", (out - expected).abs().max().item())
# decode MoE: one group per pair, and one group per used expert (with another rank's experts in the mix)
from epinfer.kernels import moe_router, moe_triton, norm_triton  # noqa: E402
from epinfer.layers.moe import FusedExperts, permute_pairs  # noqa: E402
from epinfer.layers.norm import add_rms_norm, gated_rms_norm  # noqa: E402

T, D, inter, total, K = 3, 256, 96, 8, 2
for first, n in ((0, 8), (2, 4)):
    experts = FusedExperts(range(first, first + n), D, inter, total)
    experts.w13.data.normal_(std=0.05)
    experts.w2.data.normal_(std=0.05)
    x = torch.randn(T, D)
    ids = torch.stack([torch.randperm(total)[:K] for _ in range(T)])
    wts = torch.rand(T, K)
    ref = experts(x, wts, ids)
    for plan in (None, permute_pairs(ids, first, n)):
        args = (x, experts.w13.data, experts.w2.data, wts, ids, first, n == total, plan)
        out = moe_triton.moe_grouped(*args)
        per_pair = moe_triton.moe_grouped(*args, reduce=False).sum(1)
        errors = (out - ref).abs().max().item(), (per_pair - ref).abs().max().item()
        print("moe_grouped", first, n, plan is None, *errors)
        # the same from a dispatcher's packed rows: row-strided x, int32 ids and weights, read in place
        fields = [(x.dtype, D), (torch.int32, K), (wts.dtype, K)]
        packed = torch.zeros(T, row_layout(fields)[0], dtype=torch.uint8)
        for view, value in zip(row_views(packed, fields), (x, ids, wts), strict=True):
            view.copy_(value)
        px, pids, pw = row_views(packed, fields)
        pplan = None if plan is None else permute_pairs(pids, first, n)
        out = moe_triton.moe_grouped(px, experts.w13.data, experts.w2.data, pw, pids, first, n == total, pplan)
        print("moe_grouped packed", first, n, plan is None, (out - ref).abs().max().item())
# one group per pair: a pair of weight 0 (a padding row) reads nothing (here its row is NaN) and gives 0
experts = FusedExperts(range(0, 4), D, inter, 8)
experts.w13.data.normal_(std=0.05)
experts.w2.data.normal_(std=0.05)
x, wts = torch.randn(T, D), torch.rand(T, K)
ids = torch.tensor([[0, 5], [1, 2], [3, 6]])  # local experts 0-3, others' 4-7
x[1], wts[1] = float("nan"), 0.0
ref = experts(torch.nan_to_num(x), wts, ids)
out = moe_triton.moe_grouped(x, experts.w13.data, experts.w2.data, wts, ids, 0, False, None)
per_pair = moe_triton.moe_grouped(x, experts.w13.data, experts.w2.data, wts, ids, 0, False, None, reduce=False)
print("moe_grouped pad row", out.abs().max().item(), (out - ref).abs().max().item(),
      torch.equal(out[1], torch.zeros(D)), torch.equal(per_pair[1], torch.zeros(K, D)),
      (per_pair.sum(1) - ref).abs().max().item())
# the grouped-GEMM path's combine (the same kernel, gathering through the permutation): other ranks' rows NaN
from epinfer.layers.moe import combine_pairs  # noqa: E402

ids = torch.tensor([[0, 5], [1, 2], [3, 6]])
order = permute_pairs(ids, 0, 4)[0]
y = torch.randn(T * K, D)
y[4:] = float("nan")  # sorted last: the pairs of experts 4-7
ref = combine_pairs.__wrapped__(y, wts, ids, order, 0, 4)
print("combine", (moe_triton.combine(y, wts, ids, order, 0, 4) - ref).abs().max().item())
# routers writing into packed rows vs into their own tensors
T, D, E, K = 5, 256, 16, 4
x, gate = torch.randn(T, D), torch.randn(E, D) * 0.1
mask = torch.tensor([True, False, True, True, False])
fields = [(x.dtype, D), (torch.int32, K), (x.dtype, K)]
packed = torch.zeros(T, row_layout(fields)[0], dtype=torch.uint8)
_, pids, pw = row_views(packed, fields)
w0, i0 = moe_router.gate_route(x, gate, K, True, mask, T)
w1, i1 = (t.clone() for t in moe_router.gate_route(x, gate, K, True, mask, T, (pw, pids)))
w2, i2 = moe_router.route(x @ gate.T, K, True, None, 3, x.dtype)
w3, i3 = moe_router.route(x @ gate.T, K, True, None, 3, x.dtype, (pw, pids))
print("routers packed", torch.equal(w0, w1), torch.equal(i0, i1.long()), torch.equal(w2, w3),
      torch.equal(i2, i3.long()), w3.data_ptr() == pw.data_ptr())
# residual add + RMS norm over the experts' unsummed outputs (fp16: the interpreter's bf16 casts truncate)
x, r, w = torch.randn(5, 300).half(), torch.randn(5, 4, 300), torch.randn(300).half()
nx, out = norm_triton.add_rms_norm(x, r, w, 1e-6, False)
rx, rout = add_rms_norm(x, r, w, 1e-6, False)
print("add_rms_norm", (nx.float() - rx.float()).abs().max().item(), (out.float() - rout.float()).abs().max().item())
# the GDN gated RMS norm: x [T, H, D], the gate a row-strided view of a wider projection; 2-D too
wide = torch.randn(3, 4 * 128 + 40).half()
x, gate, w = torch.randn(3, 4, 128).half(), wide[:, 40:].view(3, 4, 128), torch.randn(128).half()
big = torch.randn(1030, 2, 128).half()  # over 1024 rows: 4 rows a program, the last one partly masked
for rows_x, rows_g in ((x, gate), (x.view(12, 128), torch.randn(12, 128).half()), (big, big.flip(0))):
    got = norm_triton.gated_rms_norm(rows_x, rows_g, w, 1e-6)
    want = gated_rms_norm(rows_x, rows_g, w, 1e-6)
    print("gated_rms_norm", tuple(rows_x.shape), (got.float() - want.float()).abs().max().item())
# prompt-chunk attention over the paged cache (fp16: the interpreter's bf16 is unreliable): plain,
# query heads packed, lazy rescaling; each against SDPA per chunk (the GPU test's check)
from tests.gpu.test_gpu_prefill import check_prefill_kernel  # noqa: E402

for hd, bs, pack, lazy in [(64, 16, None, False), (64, 32, 2, False), (64, 16, None, True), (128, 16, 4, True)]:
    print("prefill_attention", hd, bs, pack, lazy, check_prefill_kernel("cpu", torch.float16, hd, bs, pack=pack,
                                                                        lazy=lazy))
# FP8 linears: one row on the CUDA cores (K steps inside a group, of several groups, of a whole row) and K
# split over programs, against the weight-only reference; the per-pair experts on the CUDA cores
# (`moe_gemv`), FP8 against its reference and in the compute dtype against the tensor-core tiles, another
# rank's experts and a padding pair among them
from tests.gpu.test_gpu_fp8 import check_fp8_experts, check_fp8_linear  # noqa: E402

for M, N, K, block, tile in [(1, 256, 640, (128, 128), ("gemv", 1, 8, 64, 2, 2)),
                             (1, 300, 1000, (128, 128), ("gemv", 1, 16, 1024, 8, 1)),
                             (1, 90, 200, (12, 32), ("gemv", 1, 4, 128, 2, 2)),
                             (5, 90, 200, (12, 32), ("w16", 16, 32, 64, 2, 3, 2))]:
    print("fp8_linear", tile, check_fp8_linear("cpu", torch.float16, M, N, K, block, bias=True, w16=True, tile=tile,
                                               spread=True)[0])
for cfg in ({"BLOCK_M": 16, "gemv": True, "up": (4, 128, 2, 2), "down": (16, 64, 2, 2)},
            {"BLOCK_M": 16, "gemv": True, "up": (8, 256, 1, 4), "down": (4, 4096, 1, 4)}):
    print("fp8 pair gemv", cfg["up"], check_fp8_experts("cpu", torch.float16, 3, 8, 256, 128, 2, (128, 128),
                                                          w16=True, cfg=cfg))
    experts = FusedExperts(range(4, 12), 96, 40, 16).half()
    experts.w13.data.normal_(std=0.05)
    experts.w2.data.normal_(std=0.05)
    x, wts = torch.randn(3, 96).half(), torch.rand(3, 4).half()
    ids = torch.stack([torch.randperm(16)[:4] for _ in range(3)])
    wts[1] = 0
    tiles = {"BLOCK_M": 16, "up": (32, 32, 2, 4), "down": (32, 32, 2, 4)}
    args = (x, experts.w13.data, experts.w2.data, wts, ids, 4, False, None)
    want, got = moe_triton.moe_grouped(*args, tiles).float(), moe_triton.moe_grouped(*args, cfg).float()
    print("pair gemv", cfg["up"], ((got - want).norm() / want.norm()).item(), got[1].abs().max().item(),
          torch.equal(moe_triton.moe_grouped(*args, cfg, reduce=False)[1], torch.zeros(4, 96, dtype=torch.float32)))
# the decode MoE's pair permutation in one kernel against the torch form (ties, other ranks' experts, int32)
from epinfer.layers.moe import torch_permute_pairs  # noqa: E402

for T, K, first, n, total in [(1, 8, 0, 128, 128), (64, 8, 0, 128, 128), (33, 8, 64, 64, 128), (5, 10, 100, 200, 512)]:
    ids = torch.stack([torch.randperm(total)[:K] for _ in range(T)]).to(torch.int32)
    ids[::3] = ids[0].clone()
    pairs = zip(torch_permute_pairs(ids, first, n), moe_triton.permute(ids, first, n), strict=True)
    same = [torch.equal(a, b) for a, b in pairs]
    print("permute", T, K, first, n, all(same))
# FP8 weights dequantised a block a program (experts [E, rows, cols] with partial edge blocks; a 2-D weight)
from epinfer.kernels.fp8_gemm import dequantize_blocks, dequantize_weights, quantize_blocks  # noqa: E402

for shape, block in [((3, 200, 96), (128, 32)), ((130, 256), (128, 128)), ((2, 48, 80), (16, 16)),
                     ((2, 50, 70), (12, 20))]:  # (fp16: the interpreter truncates float32 to bf16)
    w, s = quantize_blocks(torch.randn(shape), block)
    same = torch.equal(dequantize_weights(w, s, block, torch.float16), dequantize_blocks(w, s, block).half())
    print("dequantize", shape, block, same)
    assert same
# the grouped expert kernels with a group's column tiles next to each other in the grid ("n_fast"): bf16 and
# FP8 (tile scales folded too), the same outputs as the default grid order, bitwise
for fp8 in (False, True):
    T, D, inter, E, K = 40, 256, 256, 4, 2
    experts = FusedExperts(range(0, E), D, inter, E)
    experts.w13.data.normal_(std=0.05)
    experts.w2.data.normal_(std=0.05)
    x, wts = torch.randn(T, D).half(), torch.rand(T, K).half()
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w13, w2 = experts.w13.data.half(), experts.w2.data.half()
    scales = None
    if fp8:
        (w13, s13), (w2, s2) = quantize_blocks(w13.float(), (128, 128)), quantize_blocks(w2.float(), (128, 128))
        scales = (s13, s2, (128, 128))
    cfg = {"BLOCK_M": 16, "up": (64, 128, 2, 4), "down": (128, 128, 2, 4), "tile_scale": fp8}
    plan = permute_pairs(ids, 0, E)
    a = moe_triton.moe_grouped(x, w13, w2, wts, ids, 0, True, plan, cfg, fp8=scales)
    b = moe_triton.moe_grouped(x, w13, w2, wts, ids, 0, True, plan, {**cfg, "n_fast": True}, fp8=scales)
    c = moe_triton.moe_grouped(x, w13, w2, wts, ids, 0, True, None, {**cfg, "n_fast": True}, fp8=scales)
    print("n_fast", "fp8" if fp8 else "fp16", torch.equal(a, b), (c.float() - a.float()).abs().max().item())
    assert torch.equal(a, b)
