"""GDN decode kernel (`gdn_ops._gdn_decode_kernel`) block layouts: one decode step of B rows at the
Qwen3.5-35B-A3B GDN shape (16 key heads, 32 value heads, dk = dv = 128), the recurrent state in
float32 and in bf16. Every (BV value columns a block, programs a head, warps) candidate, and the
persistent form's (programs an SM), timed with `triton.testing.do_bench` on the same inputs; one
JSON record each, with GB/s of the state read and written and the largest output error against the
torch step; the current table's choice marked.

    python benchmarks/gdn_decode_sweep.py [--batches 200,512]
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import triton.testing

from epinfer.kernels import gdn_ops

LAYOUTS = [(32, 4, 4), (32, 2, 4), (32, 1, 4), (64, 2, 4), (64, 2, 2), (64, 2, 8), (64, 1, 4), (128, 1, 4),
           (128, 1, 8)]  # (BV, programs a head, warps)
# each with the state's loads in program order and issued early (`_gdn_decode_kernel`'s EARLY)
LAYOUTS = [(*layout, early) for layout in LAYOUTS for early in (False, True)]
# the persistent form (`_gdn_decode_persistent`): (BV, 128 / BV, warps, -, programs an SM)
LAYOUTS += [(bv, 128 // bv, w, False, per_sm) for bv in (64, 128) for w in (4, 8) for per_sm in (2, 4, 8)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="200,512")
    args = ap.parse_args()
    dev = "cuda"
    for B in (int(b) for b in args.batches.split(",")):
        qkv = torch.randn(B, 2 * 16 * 128 + 32 * 128, device=dev, dtype=torch.bfloat16)
        q, k = qkv[:, :2048].view(B, 16, 128), qkv[:, 2048:4096].view(B, 16, 128)
        v = qkv[:, 4096:].view(B, 32, 128)
        g = -torch.rand(B, 32, device=dev)
        beta = torch.rand(B, 32, device=dev, dtype=torch.bfloat16)
        slots = torch.arange(B, device=dev)
        for state_dtype in (torch.float32, torch.bfloat16):
            state = (torch.randn(B + 1, 32, 128, 128, device=dev) * 0.1).to(state_dtype)
            ref, _ = gdn_ops.recurrent_gated_delta_step(q, k, v, g, beta, state[:B].clone())
            moved = 2 * B * 32 * 128 * 128 * state.element_size()
            current = gdn_ops.DECODE_CONFIGS.get(state.element_size())
            for cfg in LAYOUTS:
                work = state.clone()
                out = gdn_ops._recurrent_triton(q, k, v, g, beta, work, slots, cfg)
                err = (out.float() - ref.float()).abs().max().item()
                call = functools.partial(gdn_ops._recurrent_triton, q, k, v, g, beta, work, slots, cfg)
                ms = triton.testing.do_bench(call)
                print(json.dumps({"batch": B, "state": str(state_dtype).removeprefix("torch."), "bv": cfg[0],
                                  "split": cfg[1], "warps": cfg[2], "early": cfg[3],
                                  "per_sm": cfg[4] if len(cfg) > 4 else 0, "us": round(ms * 1e3, 1),
                                  "gb_s": round(moved / ms / 1e6), "max_err": float(f"{err:.2e}"),
                                  "current": cfg == current}), flush=True)
            del state
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
