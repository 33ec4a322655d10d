"""Our logits vs transformers at a real shape, a few layers, random weights, on a GPU: float32 and
bf16, CUDA graphs on and off, prefill and decode errors separately (isolates an implementation
difference from bf16 rounding).

    [DTYPES=bfloat16] [GRAPHS=1] python benchmarks/gpu_logits_check.py [SHAPE LAYERS ...]
    (default: qwen3.5-35b-a3b 4; DTYPES float32,bfloat16 and GRAPHS 1,0 by default)
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

from tests.gpu.test_gpu_decode import compare_logits, real_shape_folder


def main(argv: list[str]) -> None:
    pairs = list(zip(argv[::2], map(int, argv[1::2]), strict=True)) or [("qwen3.5-35b-a3b", 4)]
    rows = []
    for shape, layers in pairs:
        for dtype in os.environ.get("DTYPES", "float32,bfloat16").split(","):
            with tempfile.TemporaryDirectory() as tmp:
                torch.backends.cuda.matmul.allow_tf32 = False
                folder, model = real_shape_folder(Path(tmp), shape, layers, getattr(torch, dtype))
                for graphs in [g == "1" for g in os.environ.get("GRAPHS", "1,0").split(",")]:
                    res = compare_logits(folder, model, dtype, graphs)
                    rows.append((shape, layers, dtype, res))
                    print(rows[-1], flush=True)
                del model
                torch.cuda.empty_cache()
    print(f"{'shape':16} {'L':>2} {'dtype':9} {'graphs':6} {'vs HF':>7} {'prefill':>8} {'decode':>8} {'top1':>6} "
          f"{'vs fp32':>8} {'top1':>6} {'HF bf16 vs fp32':>15} {'top1':>6}")
    for shape, layers, dtype, r in rows:
        extra = (f"{r['rel_err_vs_fp32']:8.4f} {r['top1_vs_fp32']:6.3f} {r['hf_bf16_rel_err_vs_fp32']:15.4f} "
                 f"{r['hf_bf16_top1_vs_fp32']:6.3f}") if "rel_err_vs_fp32" in r else ""
        print(f"{shape:16} {layers:2} {dtype:9} {r['graphs']!s:6} {r['rel_err']:7.4f} {r['rel_err_prefill']:8.4f} "
              f"{r['rel_err_decode']:8.4f} {r['top1']:6.3f} {extra}")

if __name__ == "__main__":
    main(sys.argv[1:])
