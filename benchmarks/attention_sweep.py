"""Decode attention (`paged_attention._decode_triton`: split kernel + merge) per batch size: split
count and tiles, replayed in a CUDA graph, at the Qwen3-30B-A3B attention shape (32 query heads, 4 KV
heads, head dim 128) or with `--shape qwen3.5` Qwen3.5's (16, 2, 256), 16-token pages, a context of
about 1k tokens. Prints one JSON record per batch with the best config, its time, the current table's
time (timed after the sweep, the GPU warm), and the error against the torch reference. BLOCK_N is
the table's value; "keys" in the record is what the kernel loads a tile (`keys_a_tile`).

    python benchmarks/attention_sweep.py [--batches 1,8,64,256] [--context 1040] [--shape qwen3.5] [--stages 2,3]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton.testing

from epinfer.kernels import paged_attention as pa

SPLITS = {1: (4, 8, 16, 32, 64), 8: (1, 2, 4, 8, 16), 64: (1, 2, 4), 256: (1, 2)}
SHAPES = {"qwen3-30b": (32, 4, 128), "qwen3.5": (16, 2, 256)}


def bench(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=20)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--context", type=int, default=1040)
    ap.add_argument("--shape", choices=SHAPES, default="qwen3-30b")
    ap.add_argument("--stages", default="2")
    args = ap.parse_args()
    torch.manual_seed(0)
    (H, KVH, hd), bs = SHAPES[args.shape], 16
    block_ns = (32, 64, 128) if hd <= 128 else (64, 128)  # (above head dim 128: 32 and 64 keys a tile)
    tiles = [{"BLOCK_N": bn, "num_warps": w, "num_stages": st} for bn, w, st in
             itertools.product(block_ns, (2, 4, 8), [int(x) for x in args.stages.split(",")])]
    pages = -(-(args.context + 16) // bs)
    for B in [int(b) for b in args.batches.split(",")]:
        with torch.device("cuda"):
            k = torch.randn(B * pages + 1, bs, KVH, hd, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            table = torch.randperm(B * pages).view(B, pages).int() + 1
            slots = torch.arange(B, dtype=torch.int32)
            lens = torch.full((B,), args.context, dtype=torch.int32)
            q = torch.randn(B, H, hd, dtype=torch.bfloat16)
        call = (q, k, v, table, slots, lens, hd ** -0.5)
        ref = pa.decode_attention_reference(*call).float()
        times = {}
        for splits, tile in itertools.product(SPLITS.get(B, (1, 2, 4)), tiles):
            cfg = {**tile, "programs": 1 << 30, "max_splits": splits, "min_split": 1}
            times[(splits, *tile.values())] = bench(lambda cfg=cfg, call=call: pa._decode_triton(*call, cfg))
        best = min(times, key=times.get)
        cfg = dict(zip(("splits", *tiles[0].keys()), best, strict=True))
        cfg["keys"] = pa.keys_a_tile(cfg["BLOCK_N"], hd)
        run = {**{name: cfg[name] for name in tiles[0]}, "programs": 1 << 30, "max_splits": cfg["splits"],
               "min_split": 1}
        err = ((pa._decode_triton(*call, run).float() - ref).norm() / ref.norm()).item()
        table_ms = bench(lambda call=call: pa._decode_triton(*call))
        kv_gb = 2 * B * args.context * KVH * hd * 2 / 1e9
        print(json.dumps({"batch": B, "best": cfg, "us": round(times[best] * 1e3, 2),
                          "table_us": round(table_ms * 1e3, 2),
                          "table_splits": pa._num_splits(B, KVH, pages * bs), "kv_tbs": round(kv_gb / times[best], 2),
                          "rel_err": round(err, 5),
                          "top5": sorted((round(t * 1e3, 2), c) for c, t in times.items())[:5]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
