"""Tile sizes for the decode MoE kernels (`moe_triton.moe_grouped`) on this GPU, against the cuBLAS
grouped-GEMM path (`FusedExperts._grouped`). One MoE layer of a real shape, random routing, bf16:
each up / down kernel config is timed alone (the other at a fixed config), then the best pair is
timed end to end (permutation + both kernels + combine) and checked against the grouped path.

    python benchmarks/moe_kernel_sweep.py [--shape qwen3-30b-a3b] [--batches 64,128,256,512] [--out best.json]

Prints one JSON record per batch and writes the chosen table (the format of `moe_triton.CONFIGS`,
usable as EPINFER_MOE_CONFIGS=best.json) to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile

import torch
import triton
import triton.testing

from epinfer.bench import shape_folder
from epinfer.config import ModelConfig
from epinfer.layers import moe_triton
from epinfer.layers.moe import FusedExperts, permute_pairs

TILES = [(bn, bk, st, w) for bn, bk, st, w in itertools.product((16, 32, 64, 128), (128, 256), (3, 4), (4, 8))
         if w == 4 or bn == 128]  # (BLOCK_N, BLOCK_K, num_stages, num_warps)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=40)  # ms, median


def sweep(ex: FusedExperts, T: int, K: int, block_ms: list[int]) -> dict:
    """One batch size: the best config and its timings (ms) against the cuBLAS grouped path."""
    E, two_i, D = ex.w13.shape
    inter = two_i // 2
    x = torch.randn(T, D, dtype=torch.bfloat16, device="cuda")
    ids = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)])
    w = torch.rand(T, K, device="cuda").to(torch.bfloat16)
    order, offs, _ = permute_pairs(ids, 0, E)
    P = T * K
    act = torch.empty(P, inter, dtype=torch.bfloat16, device="cuda")
    y = torch.empty(P, D, dtype=torch.float32, device="cuda")

    def up(bm, tile):
        bn, bk, st, nw = tile
        moe_triton._grouped_up[(E, triton.cdiv(inter, bn))](
            x, ex.w13, order, offs, act, x.stride(0), ex.w13.stride(0), ex.w13.stride(1), act.stride(0),
            D=D, INTER=inter, K=K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_stages=st, num_warps=nw)

    def down(bm, tile):
        bn, bk, st, nw = tile
        moe_triton._grouped_down[(E, triton.cdiv(D, bn))](
            act, ex.w2, order, offs, w.reshape(-1), y, act.stride(0), ex.w2.stride(0), ex.w2.stride(1),
            y.stride(0), D=D, INTER=inter, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_stages=st, num_warps=nw)

    def timed(fn, bm, tile):
        try:
            return bench(lambda: fn(bm, tile))
        except Exception as exc:  # out of shared memory etc.
            print(f"# {fn.__name__} bm={bm} {tile}: {type(exc).__name__}", flush=True)
            return float("inf")

    best = None
    for bm in [b for b in block_ms if b <= max(16, 2 * P / E)]:
        ups = {tile: timed(up, bm, tile) for tile in TILES}
        downs = {tile: timed(down, bm, tile) for tile in TILES}
        bu, bd = min(ups, key=ups.get), min(downs, key=downs.get)
        if best is None or ups[bu] + downs[bd] < best[0]:
            best = (ups[bu] + downs[bd], {"BLOCK_M": bm, "up": bu, "down": bd}, ups, downs)
    _, chosen, ups, downs = best
    ref = ex._grouped(x, w, ids).float()
    out = moe_triton.moe_grouped(x, ex.w13, ex.w2, w, order, offs, True, chosen).float()
    return {"T": T, "pairs_per_expert": P / E, "experts_used": int(torch.unique(ids).numel()), "config": chosen,
            "up_ms": ups[chosen["up"]], "down_ms": downs[chosen["down"]],
            "layer_ms": bench(lambda: moe_triton.moe_grouped(x, ex.w13, ex.w2, w, *permute_pairs(ids, 0, E)[:2],
                                                             True, chosen)),
            "cublas_layer_ms": bench(lambda: ex._grouped(x, w, ids)),
            "rel_err_vs_cublas": round(((out - ref).norm() / ref.norm()).item(), 5),
            "top_up": sorted((round(v, 4), k) for k, v in ups.items())[:3],
            "top_down": sorted((round(v, 4), k) for k, v in downs.items())[:3]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-30b-a3b")
    ap.add_argument("--batches", default="64,128,256,512")
    ap.add_argument("--block-m", default="16,32,64")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ModelConfig.from_dir(shape_folder(args.shape, 1, tmp))
    E, D, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    torch.manual_seed(0)
    with torch.device("cuda"):
        ex = FusedExperts(range(E), D, inter, E).to(torch.bfloat16)
        ex.w13.data.normal_(std=0.02)
        ex.w2.data.normal_(std=0.02)
    copy_tbs = 2 * ex.w13.numel() * 2 / bench(lambda: ex.w13.clone()) / 1e9
    table = []
    for T in [int(b) for b in args.batches.split(",")]:
        rec = sweep(ex, T, cfg.top_k, [int(b) for b in args.block_m.split(",")])
        gb = rec["experts_used"] * 3 * D * inter * 2 / 1e9
        kernels_ms = rec["up_ms"] + rec["down_ms"]
        rec.update(shape=args.shape, copy_tbs=round(copy_tbs, 3), kernels_tbs=round(gb / kernels_ms, 3),
                   layer_tbs=round(gb / rec["layer_ms"], 3), cublas_tbs=round(gb / rec["cublas_layer_ms"], 3))
        print(json.dumps(rec), flush=True)
        table.append((rec["pairs_per_expert"], rec["config"]))
    limits = [(round((a[0] + b[0]) / 2, 2), a[1]) for a, b in zip(table, table[1:], strict=False)]
    limits.append((1e9, table[-1][1]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(limits, f)
    print("table:", json.dumps(limits))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
