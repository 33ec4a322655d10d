"""Decode-size projections: `small_gemm.linear` tiles against cuBLAS (`F.linear`) per real shape,
replayed in a CUDA graph; prints one JSON record per (shape, rows) with the best config, its time,
cuBLAS's, and the relative error. At one row the CUDA-core form ("gemv": `row_times_rows`) is tried
too.

    python benchmarks/gemv_sweep.py [--rows 1,8]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
import triton.testing

from epinfer.kernels import small_gemm

SHAPES = {"qkv 30B": (5120, 2048), "o 30B": (2048, 4096), "router 30B": (128, 2048), "lm_head": (151936, 2048)}
TILES = [{"BLOCK_N": bn, "BLOCK_K": bk, "num_stages": st, "num_warps": w}
         for bn, bk, st, w in itertools.product((16, 32, 64), (128, 256, 512), (2, 3, 4), (2, 4))]
GEMV_TILES = [{"BLOCK_N": bn, "BLOCK_K": bk, "num_stages": st, "num_warps": w, "gemv": True}
              for bn, bk, st, w in itertools.product((4, 8, 16), (256, 512, 1024, 2048), (1, 2, 4), (2, 4, 8))
              if bn * bk <= 16384]


def bench(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=20)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8")
    args = ap.parse_args()
    torch.manual_seed(0)
    for (name, (N, D)), T in itertools.product(SHAPES.items(), [int(r) for r in args.rows.split(",")]):
        w = torch.randn(N, D, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, w).float()
        times = {}
        configs = {}
        for cfg in TILES + (GEMV_TILES if T == 1 else []):
            try:
                times[tuple(cfg.values())] = bench(lambda cfg=cfg, x=x, w=w: small_gemm.linear(x, w, None, cfg))
                configs[tuple(cfg.values())] = cfg
            except Exception as exc:  # out of shared memory etc.
                print(f"# {cfg}: {type(exc).__name__}", flush=True)
        best = min(times, key=times.get)
        cfg = configs[best]
        err = ((small_gemm.linear(x, w, None, cfg).float() - ref).norm() / ref.norm()).item()
        cublas = bench(lambda x=x, w=w: F.linear(x, w))
        gb = N * D * 2 / 1e9
        print(json.dumps({"shape": name, "rows": T, "best": cfg, "ms": round(times[best], 5),
                          "tbs": round(gb / times[best], 2), "cublas_ms": round(cublas, 5),
                          "cublas_tbs": round(gb / cublas, 2), "rel_err": round(err, 5),
                          "table_ms": round(times.get(tuple(small_gemm.config(N).values()), -1), 5),
                          "top3": sorted((round(v, 5), k) for k, v in times.items())[:3]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
