"""Prompt-chunk attention (`prefill_attention._prefill_kernel`) tiles, head packing (PACK query heads
of one KV head a program, each key tile read once for them) and lazy rescaling: one chunk of ROWS new rows
after CONTEXT cached tokens (16-token pages, or `--page N`), at the Qwen3.5-35B-A3B attention shape (16 query
heads, 2 KV heads, head dim 256) or another `--heads H,KVH --head-dim D`. Every tile candidate and
SDPA (flash, the keys gathered contiguous) timed on the same inputs, the tiles in the engine's
order (heaviest first) and the current tile also in chunk order; one JSON record each, with TFLOP/s
of the causal attention and the largest error against SDPA; the current table's choice marked.

    python benchmarks/prefill_attention_sweep.py [--context 16384] [--rows 16384] [--page 16]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.testing

from epinfer.core.forward import aligned_device_rows
from epinfer.kernels import prefill_attention as pa
from epinfer.layers.attention import _sdpa

# (BLOCK_M, BLOCK_N, warps, stages, PACK: query heads of one KV head a program, LAZY: the accumulator
# rescaled only when a row's maximum grew past 2^8)
TILES = [(64, 32, 8, 2, 1, False), (64, 64, 8, 2, 1, False), (64, 64, 4, 2, 1, False), (64, 32, 4, 3, 1, False),
         (128, 32, 8, 2, 1, False), (128, 32, 8, 3, 1, False), (128, 64, 8, 2, 1, False), (128, 64, 8, 3, 1, False),
         (128, 128, 8, 2, 1, False), (128, 64, 8, 2, 2, False), (128, 64, 8, 2, 4, False), (128, 64, 8, 2, 8, False),
         (256, 64, 16, 2, 2, False), (256, 32, 16, 2, 4, False), (128, 32, 8, 3, 2, False),
         (128, 64, 8, 2, 1, True), (128, 64, 8, 3, 1, True), (128, 128, 8, 2, 1, True), (128, 64, 8, 2, 2, True),
         (64, 64, 4, 2, 1, True)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--heads", default="16,2")
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--page", type=int, default=16, help="tokens a KV cache block holds (the engine's hold 16)")
    args = ap.parse_args()
    dev, bs = torch.device("cuda"), args.page
    H, KVH = (int(x) for x in args.heads.split(","))
    hd, C, N = args.head_dim, args.context, args.rows
    nb = (C + N) // bs + 1
    k = torch.randn(nb, bs, KVH, hd, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    table = torch.arange(nb, device=dev, dtype=torch.int32)[None].repeat(2, 1)
    q = torch.randn(N, H, hd, device=dev, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    meta = aligned_device_rows([[0], [N], [C], [1]], dev)
    flops = 4 * H * hd * N * (C + (N + 1) / 2)
    ref = _sdpa(q, k.reshape(-1, KVH, hd)[:C + N], v.reshape(-1, KVH, hd)[:C + N], C, hd**-0.5).float()
    ms = triton.testing.do_bench(lambda: _sdpa(q, k.reshape(-1, KVH, hd)[:C + N], v.reshape(-1, KVH, hd)[:C + N],
                                               C, hd**-0.5), rep=50)
    print(json.dumps({"kernel": "sdpa", "ms": round(ms, 3), "tflops": round(flops / ms / 1e9)}))
    chosen = pa.blocks_for(hd)
    current = [t for t in TILES if (t[0], t[1], t[4]) == chosen and t[2] == (8 if hd > 128 else 4) and t[3] == 2
               and t[5] == pa.LAZY_RESCALE]
    # every tile heaviest first (the engine's order), the current one also in chunk order
    for tile, heavy_first in [(t, True) for t in TILES] + [(t, False) for t in current]:
        bm, bn, warps, stages, pack, lazy = tile
        record = {"kernel": "prefill_attention", "block_m": bm, "block_n": bn, "warps": warps, "stages": stages,
                  "pack": pack, "lazy": lazy, "order": "heaviest first" if heavy_first else "chunk",
                  "current": tile in current and heavy_first}
        if (H // KVH) % pack:
            continue
        try:
            tiles = aligned_device_rows(list(pa.tile_map([N], bm // pack, [C] if heavy_first else None)), dev)

            def run(bm=bm, bn=bn, warps=warps, stages=stages, pack=pack, lazy=lazy, tiles=tiles):
                pa._prefill_kernel[(tiles[0].shape[0] * (H // pack),)](
                    q, k, v, out, table, tiles[0], tiles[1], *meta, hd**-0.5 * pa.LOG2E, q.stride(0), q.stride(1),
                    k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), out.stride(0),
                    out.stride(1), table.stride(0), BS=bs, REP=H // KVH, HD=hd,
                    HD_P=max(16, triton.next_power_of_2(hd)), BLOCK_M=bm, BLOCK_N=bn, PACK=pack, GROUPS=H // pack,
                    LAZY=lazy, num_warps=warps, num_stages=stages)
            run()
            ms = triton.testing.do_bench(run, rep=50)
            record.update(ms=round(ms, 3), tflops=round(flops / ms / 1e9), err=(out.float() - ref).abs().max().item())
        except Exception as exc:  # a tile that does not fit (shared memory, registers)
            record["error"] = type(exc).__name__
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
