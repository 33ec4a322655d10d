"""GPU check of the grouped-GEMM expert path against the per-expert loop (bf16), then timing."""

from __future__ import annotations

import time

import torch

from epinfer.layers import moe
from epinfer.layers.moe import FusedExperts, route

torch.manual_seed(0)
dev = torch.device("cuda")
E, D, inter, K = 128, 2048, 768, 8
with torch.device(dev):
    experts = FusedExperts(range(E), D, inter, E).to(torch.bfloat16)
    experts.w13.data.normal_(0, 0.02)
    experts.w2.data.normal_(0, 0.02)
for T in (1, 64, 256, 4096):
    x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
    w, ids = route(torch.randn(T, E, device=dev), K, True)
    w = w.to(torch.bfloat16)
    moe.GROUPED_MM = False
    ref = experts(x, w, ids)
    moe.GROUPED_MM = True
    out = experts(x, w, ids)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    times = {}
    for flag in (False, True):
        moe.GROUPED_MM = flag
        experts(x, w, ids)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            experts(x, w, ids)
        torch.cuda.synchronize()
        times[flag] = (time.perf_counter() - t) / 20 * 1e3
    print(f"T={T:5d} rel_err={err:.2e} loop={times[False]:.3f} ms grouped={times[True]:.3f} ms")
