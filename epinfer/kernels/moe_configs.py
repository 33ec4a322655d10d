"""Tile sizes of the Triton MoE expert kernels (`kernels.moe_triton`), by batch: the tables a sweep
(`benchmarks/moe_kernel_sweep.py`) measured on an H200, and the lookup that picks one (a sweep's
file replaces them: EPINFER_MOE_CONFIGS)."""

from __future__ import annotations

import json

from epinfer.core.env import SWITCHES


def grouped_config(pairs: int, num_local: int, fp8: bool = False) -> dict:
    """Tile sizes by batch (static per batch size: CUDA-graph safe): PER_PAIR up to its pair count,
    else by the average pairs per expert; `fp8`: FP8 expert weights' table (`FP8_CONFIGS`, the bf16
    one while it is empty). EPINFER_MOE_CONFIGS=file.json replaces the tables it holds (a
    sweep's output: {"per_pair": ..., "grouped": [[limit, cfg], ...], "fp8_per_pair": ...,
    "fp8_grouped": [...]}, each key optional; "fp8_per_pair" replaces the FP8 per-pair tiles whole
    (without "gemv", tensor-core tiles); the per-pair mode's pair limit is "per_pair"'s)."""
    if "file" not in _LOADED:
        path = _LOADED["file"] = SWITCHES.moe_configs
        if path:
            with open(path) as f:
                table = json.load(f)
            if isinstance(table, list):  # the grouped table alone (sweeps before the per-pair mode)
                table = {"per_pair": {}, "grouped": table}
            PER_PAIR.update(table.get("per_pair", {}))
            if "fp8_per_pair" in table:
                FP8_PER_PAIR.clear()
                FP8_PER_PAIR.update({k: v for k, v in table["fp8_per_pair"].items() if k != "max_pairs"})
            for key, configs in (("grouped", CONFIGS), ("fp8_grouped", FP8_CONFIGS)):
                if key in table:
                    configs[:] = [(limit, cfg) for limit, cfg in table[key]]
    if pairs <= PER_PAIR["max_pairs"]:
        return FP8_PER_PAIR if fp8 else PER_PAIR
    table = FP8_CONFIGS if fp8 and FP8_CONFIGS else CONFIGS
    for limit, cfg in table:
        if pairs / num_local <= limit:
            return cfg
    return table[-1][1]


def per_pair(pairs: int) -> bool:
    """Whether `moe_grouped` runs one group per (row, k) pair (no permutation) at this size."""
    return grouped_config(pairs, 1) is PER_PAIR


_LOADED: dict = {}
# Up to `max_pairs` pairs (a few rows), each pair is its own group: no permutation kernel, and an
# expert chosen by two rows is read twice (from L2 the second time). H200, 30B shape, whole layer in a
# CUDA graph (2026-11-29): 1 row 28.2 µs vs 42.0 grouped (cuBLAS 72); 4 rows 78.6 vs 91.0 (cuBLAS 146);
# tiles within 0.3 µs of each other at 1 row
PER_PAIR = {"max_pairs": 32, "BLOCK_M": 16, "up": (32, 256, 3, 4), "down": (32, 128, 3, 2)}
# FP8 expert weights in the per-pair mode (the same pair limit): one row a pair on the CUDA cores
# (`moe_gemv`), (BLOCK_N, BLOCK_K, num_stages, num_warps). H200, 30B shape, one row, whole layer in a
# CUDA graph (`moe_kernel_sweep.py --quant fp8 --gemv`, 2026-12-04): 16.1 µs, against 19.9 for the best
# tensor-core tiles of the w16 mode and ~21 for the bf16 tiles it used before
FP8_PER_PAIR = {"BLOCK_M": 16, "gemv": True, "up": (4, 512, 2, 2), "down": (16, 256, 2, 2)}
# (average pairs per expert up to, {up: ..., down: ...}); measured on H200 (benchmarks/moe_kernel_sweep.py)
CONFIGS = [  # H200, Qwen3-30B-A3B expert shape, 2026-11-28: 3.5-4.0 TB/s on the expert weights from 8 pairs per
    # expert up (RESULTS.md); 2.1-3 TB/s below, where few weights are read (at 1-2 rows the sweep's best
    # differ within noise, and this row was faster inside the graph)
    (12, {"BLOCK_M": 16, "up": (32, 256, 3, 4), "down": (64, 128, 3, 4)}),
    (24, {"BLOCK_M": 32, "up": (64, 128, 3, 4), "down": (64, 128, 3, 4)}),
    (1e9, {"BLOCK_M": 64, "up": (64, 128, 4, 4), "down": (128, 128, 4, 8)}),
]  # tile tuples: (BLOCK_N, BLOCK_K, num_stages, num_warps); "y16": the pairs' outputs in x's dtype (summed
# in float32 by the combine), half the bytes of float32 ones at prefill sizes
# FP8 expert weights (BLOCK_K is the scale block's columns): decode rows from `moe_kernel_sweep.py
# --quant fp8` (H200, 2026-12-05): the 30B shape at 64 rows (4 pairs per expert) 0.172 ms a layer, and
# the Qwen3.5 shape at 200 (6.25) 0.239 ms, narrow two-warp tiles both (the 30B shape's batch-64 step
# 12.64 -> 12.58 ms with the first); then the bf16 table's rows up to 96 pairs per expert; then
# prefill sizes from `moe_kernel_sweep.py --shape qwen3-30b-a3b --quant fp8 --batches 2048,8192,16384
# --block-m 64,128` (H200, 2026-12-04): 128-row tiles with 8 warps from 512 pairs per expert, 16384
# rows 3.13 ms a layer (with them the 30B shape's prefill of 64 x 1024 ran at 56.0k tok/s, against
# 46.7k with the bf16 table's tiles, RESULTS.md); a group's column tiles side by side ("n_fast") since
# an H100's run (2026-12-06): the 30B shape's 64 x 1024 prefill at 60.9k tok/s on these tiles,
# against 57.3k with the experts dequantised for cuBLAS's bf16 grouped GEMM
FP8_CONFIGS: list[tuple[float, dict]] = [
    (5, {"BLOCK_M": 16, "up": (32, 128, 3, 2), "down": (32, 128, 4, 2)}),
    (12, {"BLOCK_M": 16, "up": (32, 128, 4, 2), "down": (64, 128, 3, 2), "tile_scale": True}),
    CONFIGS[1],
    (96, CONFIGS[-1][1]),
    (320, {"BLOCK_M": 64, "up": (64, 128, 4, 4), "down": (128, 128, 4, 4), "y16": True}),
    (1e9, {"BLOCK_M": 128, "up": (64, 128, 4, 8), "down": (128, 128, 4, 8), "y16": True, "n_fast": True}),
]
