"""The Triton kernels in Triton's interpreter (CPU tensors) against the torch references: a
correctness check for kernel work on a machine without a GPU (speed needs a GPU).

    pip install triton  # in a scratch venv, never the CI one
    PYTHONPATH=. python scripts/triton_interpret_check.py
"""
import os

os.environ["TRITON_INTERPRET"] = "1"
import torch
import torch.nn.functional as F

from epinfer.layers import gdn_ops, paged_attention
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
from epinfer.layers import moe_triton, norm_triton  # noqa: E402
from epinfer.layers.moe import FusedExperts, permute_pairs  # noqa: E402
from epinfer.layers.norm import add_rms_norm  # noqa: E402

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
# residual add + RMS norm over the experts' unsummed outputs (fp16: the interpreter's bf16 casts truncate)
x, r, w = torch.randn(5, 300).half(), torch.randn(5, 4, 300), torch.randn(300).half()
nx, out = norm_triton.add_rms_norm(x, r, w, 1e-6, False)
rx, rout = add_rms_norm(x, r, w, 1e-6, False)
print("add_rms_norm", (nx.float() - rx.float()).abs().max().item(), (out.float() - rout.float()).abs().max().item())
