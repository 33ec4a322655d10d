"""Tile sizes for the decode MoE kernels (`moe_triton.moe_grouped`) on this GPU, against the cuBLAS
grouped-GEMM path (`FusedExperts._grouped`). One MoE layer of a real shape, random routing, bf16.
For each batch and mode (one group per pair — no permutation — for a few rows; one group per used
expert otherwise), each up tile is timed with the down tile fixed, then each down tile with the best
up tile; times are whole layers (permutation, both kernels, sum over k) replayed in a CUDA graph,
so the modes compare.

    python benchmarks/moe_kernel_sweep.py [--shape qwen3-30b-a3b] [--batches 1,2,4,8,64,128,256,512] [--out best.json]

Prefill sizes (over 96 pairs per expert: at the Qwen3.5-35B-A3B shape, 256 experts and 8 a row, from
3072 rows) sweep GEMM-sized tiles with the pairs' outputs in bf16. The table covers every size swept,
so sweep the decode sizes too (e.g. `--shape qwen3.5-35b-a3b --batches 1,2,4,8,64,128,256,512,4096,16384
--block-m 16,32,64,128`): with it in EPINFER_MOE_CONFIGS and EPINFER_MOE_TRITON_MAX=1e9 the Triton
kernels take prefill and mixed steps too (no gathered copy of x, SiLU in registers) in place of
cuBLAS's grouped GEMM.

`--quant fp8`: FP8 expert weights with 128 x 128 block scales, against cuBLAS's bf16 grouped GEMM
on the same weights dequantised; the table then holds "fp8_per_pair" and "fp8_grouped" (the FP8
path's). Steps of up to EPINFER_FP8_DECODE_W16's tokens (8) take the weight-only mode, the weights
widened in registers: every tile of `W16_TILES`. Larger ones quantise the rows per 128 columns, so
the K step is the block's and only BLOCK_N, stages and warps vary; their best tiles are timed again
with "tile_scale" (each tile's one weight scale a K step folded into the rows' scales). One group
per expert: the best tiles are timed again with "n_fast" too (the grid's column tiles of one expert
side by side, so that its rows are read from memory once rather than once per column tile), then
with "tma" (each K step's weight tile, and the down kernel's sorted rows, one bulk copy through a
tensor-memory-accelerator descriptor), and where that won, "sorted_rows" (the up kernel's input rows
copied once in sorted order, its row tiles by descriptor too). With `--split N` the prefill sizes'
tiles are searched with a group's row blocks shared by programs of about N blocks each (more,
shorter programs: "split"), and the best timed again without it.

`--gemv [all|wide]`: the per-pair mode only, on the CUDA cores (`kernels.moe_gemv`: one row a pair,
no tensor-core tile), the tiles of `GEMV_TILES`, at the batches of up to 32 pairs; the table then
holds the per-pair entry only: the smallest batch's tiles, with the per-pair limit unchanged.

Prints one JSON record per batch and mode, then the chosen table (the format of EPINFER_MOE_CONFIGS:
{"per_pair": {...}, "grouped": [[limit, cfg], ...]}), also written to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile

import torch
import triton
import triton.testing

from epinfer.bench.single import shape_folder
from epinfer.core.config import ModelConfig
from epinfer.core.env import SWITCHES
from epinfer.kernels import fp8_gemm, moe_configs, moe_triton
from epinfer.layers.moe import FusedExperts, permute_pairs

TILES = [(bn, bk, st, w) for bn, bk, st, w in itertools.product((16, 32, 64, 128), (128, 256), (2, 3, 4), (2, 4, 8))
         if (w == 8) == (bn == 128) or (w == 2 and bn <= 32)]  # (BLOCK_N, BLOCK_K, num_stages, num_warps)
# prefill sizes (over LARGE pairs per expert on average): GEMM-sized tiles, the pairs' outputs in bf16 ("y16")
LARGE = 96
LARGE_TILES = [(bn, bk, st, w) for bn, bk, st, w in itertools.product((64, 128), (64, 128), (3, 4), (4, 8))]
# FP8 weights widened in registers (steps of few tokens): K steps of whole scale blocks, wider ones
W16_TILES = [(bn, bk, st, w) for bn, bk, st, w in itertools.product((16, 32, 64), (256, 512, 1024), (2, 3, 4), (2, 4))
             if bn * bk <= 32768]
# the per-pair mode on the CUDA cores: (BLOCK_N weight rows, BLOCK_K, num_stages, num_warps); "wide": K steps
# of a whole row or half of one (each step's products summed at once), and the best narrow ones of an H200
GEMV_TILES = {"all": [(bn, bk, st, w) for bn, bk, st, w in itertools.product((4, 8, 16, 32), (256, 512), (2, 3), (2, 4))
                      if bn * bk <= 8192],
              "wide": [*itertools.product((2, 4, 8), (1024, 2048), (1,), (4, 8)), (4, 512, 2, 2), (16, 256, 2, 2)]}
PER_PAIR_LIMIT = 32  # pairs: the per-pair mode is tried up to here


def bench(fn) -> float:
    """ms per call, replayed in a CUDA graph as decode steps are (launch costs off the host)."""
    return triton.testing.do_bench_cudagraph(fn, rep=20)


def sweep(ex: FusedExperts, T: int, K: int, per_pair: bool, block_ms: list[int],
          ref_ex: FusedExperts | None = None, gemv: str | None = None, split: int | None = None) -> dict:
    """One batch size and mode: the best config and its layer time (ms) against the cuBLAS path
    (`ref_ex`'s: FP8 `ex`'s weights dequantised to bf16). `split`: prefill sizes' tiles searched with
    a group's row blocks shared by programs of about that many blocks each ("split"), then timed
    without it."""
    ref_ex = ref_ex or ex
    E, _, D = ex.w13.shape
    x = torch.randn(T, D, dtype=torch.bfloat16, device="cuda")
    ids = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)])
    w = torch.rand(T, K, device="cuda").to(torch.bfloat16)

    def layer(cfg):
        plan = None if per_pair else permute_pairs(ids, 0, E)
        return moe_triton.moe_grouped(x, ex.w13, ex.w2, w, ids, 0, True, plan, cfg, fp8=ex.fp8)

    def timed(cfg):
        try:
            return bench(lambda: layer(cfg))
        except Exception as exc:  # out of shared memory etc.
            print(f"# {cfg}: {type(exc).__name__}", flush=True)
            return float("inf")

    large = not per_pair and T * K / E > LARGE
    tiles, extra = (LARGE_TILES, {"y16": True, **({"split": split} if split else {})}) if large else (TILES, {})
    w16 = ex.fp8 is not None and SWITCHES.fp8_w16_tokens >= T  # (the kernel's rule, at BLOCK_M <= 32)
    if gemv:
        tiles, extra = GEMV_TILES[gemv], {"gemv": True}
    elif w16:
        tiles = W16_TILES
    elif ex.fp8 is not None:  # (the K step is the scale block's: one tile per BLOCK_K-free shape)
        tiles = sorted({(bn, 128, st, wp) for bn, _, st, wp in tiles} | ({(256, 128, 3, 8)} if large else set()))
    best = None
    for bm in [16] if per_pair else [b for b in block_ms if b <= max(16, 2 * T * K / E)]:
        fixed = {"BLOCK_M": bm, "up": (32, 256, 3, 4), "down": (64, 128, 3, 4), **extra}
        ups = {tile: timed({**fixed, "up": tile}) for tile in tiles}
        bu = min(ups, key=ups.get)
        downs = {tile: timed({**fixed, "up": bu, "down": tile}) for tile in tiles}
        bd = min(downs, key=downs.get)
        cfg = {"BLOCK_M": bm, "up": bu, "down": bd, **extra}
        ms = downs[bd]
        if ex.fp8 is not None and not (w16 or gemv):  # each tile's one weight scale a K step folded in the rows' scales
            folded = timed({**cfg, "tile_scale": True})
            if folded < ms:
                cfg, ms = {**cfg, "tile_scale": True}, folded
        if not (per_pair or gemv):  # a group's column tiles side by side in the grid (its rows read once into
            for key in ("n_fast", "tma", "sorted_rows"):  # L2), then the tiles loaded by descriptor
                if key != "sorted_rows" or cfg.get("tma"):  # (the up kernel's rows copied sorted: with "tma")
                    other = timed({**cfg, key: True})
                    if other < ms:
                        cfg, ms = {**cfg, key: True}, other
        if "split" in cfg:  # one program a group's column tile, walking all its row blocks
            whole = {key: value for key, value in cfg.items() if key != "split"}
            walk = timed(whole)
            if walk < ms:
                cfg, ms = whole, walk
        if best is None or ms < best[0]:
            best = (ms, cfg, ups, downs)
    layer_ms, chosen, ups, downs = best
    ref = ref_ex._grouped(x, w, ids).float()
    out = layer(chosen).float()
    return {"T": T, "mode": "per_pair" if per_pair else "grouped", "pairs_per_expert": T * K / E,
            "experts_used": int(torch.unique(ids).numel()), "config": chosen, "layer_ms": layer_ms,
            "cublas_layer_ms": bench(lambda: ref_ex._grouped(x, w, ids)),
            "rel_err_vs_cublas": round(((out - ref).norm() / ref.norm()).item(), 5),
            "top_up": sorted((round(v, 4), k) for k, v in ups.items())[:3],
            "top_down": sorted((round(v, 4), k) for k, v in downs.items())[:3]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-30b-a3b")
    ap.add_argument("--batches", default="1,2,4,8,64,128,256,512")
    ap.add_argument("--block-m", default="16,32,64")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quant", choices=["fp8"], default=None)
    ap.add_argument("--split", type=int, default=None,
                    help="prefill sizes: search the tiles with a group's row blocks shared by programs of about "
                         "this many blocks each")
    ap.add_argument("--gemv", nargs="?", const="all", choices=["all", "wide"], default=None,
                    help="the per-pair mode on the CUDA cores only (its tiles: all, or the wide K steps)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ModelConfig.from_dir(shape_folder(args.shape, 1, tmp))
    E, D, inter, K = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.top_k
    torch.manual_seed(0)
    with torch.device("cuda"):
        ex = FusedExperts(range(E), D, inter, E).to(torch.bfloat16)
        ex.w13.data.normal_(std=0.02)
        ex.w2.data.normal_(std=0.02)
    copy_tbs = 2 * ex.w13.numel() * 2 / bench(lambda: ex.w13.clone()) / 1e9
    ref_ex, itemsize = None, 2
    if args.quant == "fp8":
        block = (128, 128)
        ex.to_fp8(block)
        with torch.device("cuda"):
            ref_ex = FusedExperts(range(E), D, inter, E).to(torch.bfloat16)
        for ref_w, w, s in ((ref_ex.w13, ex.w13, ex.fp8[0]), (ref_ex.w2, ex.w2, ex.fp8[1])):
            ref_w.data.copy_(fp8_gemm.dequantize_blocks(w, s, block))
        itemsize = 1
    grouped, per_pair = [], {**moe_configs.PER_PAIR, "max_pairs": 0}
    for T in [int(b) for b in args.batches.split(",")]:
        if args.gemv and T * K > PER_PAIR_LIMIT:
            print(f"# batch {T}: over {PER_PAIR_LIMIT} pairs, no per-pair mode to sweep", flush=True)
            continue
        recs = {}
        for mode in ([True] if T * K <= PER_PAIR_LIMIT else []) + ([] if args.gemv else [False]):
            rec = sweep(ex, T, K, mode, [int(b) for b in args.block_m.split(",")], ref_ex, args.gemv, args.split)
            gb = rec["experts_used"] * 3 * D * inter * itemsize / 1e9
            rec.update(shape=args.shape, quant=args.quant, copy_tbs=round(copy_tbs, 3),
                       layer_tbs=round(gb / rec["layer_ms"], 3),  # (of the weights' own bytes)
                       cublas_tbs=round(gb * 2 / itemsize / rec["cublas_layer_ms"], 3))
            print(json.dumps(rec), flush=True)
            recs[rec["mode"]] = rec
        if args.gemv:  # the smallest batch's tiles; the per-pair / grouped boundary as it was
            if per_pair.get("gemv") is None:
                per_pair = {**recs["per_pair"]["config"], "max_pairs": moe_configs.PER_PAIR["max_pairs"]}
            continue
        grouped.append((T * K / E, recs["grouped"]["config"]))
        pp = recs.get("per_pair")
        if pp and pp["layer_ms"] < recs["grouped"]["layer_ms"]:
            per_pair = {**pp["config"], "max_pairs": T * K}
    limits = [(round((a[0] + b[0]) / 2, 2), a[1]) for a, b in zip(grouped, grouped[1:], strict=False)]
    if grouped:
        limits.append((1e9, grouped[-1][1]))
    table = {"fp8_per_pair": per_pair, "fp8_grouped": limits} if args.quant else {"per_pair": per_pair,
                                                                                     "grouped": limits}
    if args.gemv:  # (the per-pair entry only)
        table = {key: value for key, value in table.items() if "per_pair" in key}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(table, f)
    print("table:", json.dumps(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
