"""Tiles of the two memory-bound kernels of a mixed step, at the Qwen3.5-35B-A3B shape's 16384-row
step (the throughput profile's; RESULTS.md, end-to-end workloads):

* the GDN varlen conv (`gdn_prefill._conv_varlen_kernel`): 16 prompts of 1024 rows, 8192 channels
  read as a column slice of the 12352-wide input projection, q / k L2-normalised inside, output as
  one [P, C] block or as q | k | v blocks (`planar`);
* SiLU(gate) * up (`activation._silu_mul_kernel`) over the experts' [pairs, 2I] (131,072 pairs,
  I = 512), against inductor's compiled kernel for the same expression.

Every candidate is timed with `triton.testing.do_bench` on the same inputs; one JSON record each with
µs, GB/s of the bytes read and written once, and the largest difference from the default layout's
output; the defaults marked.

    python benchmarks/mixed_kernel_sweep.py [--rows 16384] [--pairs 131072]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os

import torch
import triton.testing

os.environ["EPINFER_MIXED_STEP_KERNELS"] = "1"  # the planar output and the SiLU-mul kernel

from epinfer.kernels import activation, gdn_prefill  # noqa: E402
from epinfer.layers.linear import _silu_mul  # noqa: E402


def conv_sweep(rows: int) -> None:
    dev, dtype = "cuda", torch.bfloat16
    lens = [1024] * (rows // 1024) + ([rows % 1024] if rows % 1024 else [])
    C, K, width = 8192, 4, 12352
    proj = torch.randn(rows, width, device=dev, dtype=dtype)
    x = proj[:, :C]
    prev = torch.randn(len(lens), C, K - 1, device=dev, dtype=dtype)
    w = torch.randn(C, K, device=dev, dtype=dtype) * 0.5
    taps, state_rows = (t.to(dev) for t in gdn_prefill.conv_taps(lens, K))
    groups = (2048, 2048, 4096)
    moved = 2 * rows * C * x.element_size()

    def run(cfg, planar):
        parts, _ = gdn_prefill.causal_conv_varlen(x, prev, w, taps, state_rows, 4096, 128,
                                                  groups if planar else None, cfg)
        return parts

    ref = torch.cat(run(None, False), dim=1).float()
    for cfg, planar in itertools.product(itertools.product((16, 32, 64), (128, 256), (4, 8)), (False, True)):
        got = torch.cat(run(cfg, planar), dim=1).float()
        ms = triton.testing.do_bench(functools.partial(run, cfg, planar))
        print(json.dumps({"kernel": "conv", "rows": rows, "block_t": cfg[0], "block_c": cfg[1], "warps": cfg[2],
                          "planar": planar, "us": round(ms * 1e3, 1), "gb_s": round(moved / ms / 1e6),
                          "max_diff": float(f"{(got - ref).abs().max().item():.2e}"),
                          "default": cfg == gdn_prefill.CONV_CONFIG}), flush=True)


def silu_sweep(pairs: int, inter: int = 512) -> None:
    gate_up = torch.randn(pairs, 2 * inter, device="cuda", dtype=torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    moved = 3 * pairs * inter * gate.element_size()
    ref = activation.silu_mul(gate, up).float()
    ms = triton.testing.do_bench(functools.partial(_silu_mul, gate, up))
    print(json.dumps({"kernel": "silu_mul", "pairs": pairs, "inter": inter, "inductor": True,
                      "us": round(ms * 1e3, 1), "gb_s": round(moved / ms / 1e6),
                      "max_diff": float(f"{(_silu_mul(gate, up).float() - ref).abs().max().item():.2e}")}), flush=True)
    for cfg in itertools.product((8, 16, 32), (128, 256, 512), (4, 8)):
        got = activation.silu_mul(gate, up, cfg).float()
        ms = triton.testing.do_bench(functools.partial(activation.silu_mul, gate, up, cfg))
        print(json.dumps({"kernel": "silu_mul", "pairs": pairs, "inter": inter, "rows": cfg[0], "cols": cfg[1],
                          "warps": cfg[2], "us": round(ms * 1e3, 1), "gb_s": round(moved / ms / 1e6),
                          "max_diff": float(f"{(got - ref).abs().max().item():.2e}"),
                          "default": cfg == activation.CONFIG}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--pairs", type=int, default=131072)
    args = ap.parse_args()
    silu_sweep(args.pairs)
    conv_sweep(args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
