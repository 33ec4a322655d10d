"""FP8 GEMMs at prefill sizes: the dense projections of a 16384-row step of the Qwen3.5-35B-A3B
shape (or `--rows`), each timed as bf16 cuBLAS (`F.linear`), the Triton block-scaled FP8 kernel
(`kernels.fp8_gemm`, activation quantisation included) and cuBLAS's block-scaled FP8 GEMM
(EPINFER_FP8_CUBLAS=1: `F.scaled_mm`, the same quantisation), with `triton.testing.do_bench`; one
JSON record per shape and path with ms, TFLOP/s and the relative error against the same quantisation
in torch. Then whether this torch's `F.scaled_grouped_mm` takes 1 x 128 / 128 x 128 block scales (the
routed experts' layout), and if so its time at the experts' gate / up shape against the bf16
grouped GEMM (`torch._grouped_mm`).

    python benchmarks/fp8_gemm_sweep.py [--rows 16384]

`--decode 1,8,64`: decode sizes instead. Each projection of the Qwen3-30B-A3B and Qwen3.5-35B-A3B
shapes at each row count, replayed in a CUDA graph: the bf16 path the engine takes there
(`small_gemm` up to its rows, else cuBLAS), the FP8 kernel's default tiles, cuBLAS's block-scaled
FP8 GEMM, and every tile of a grid (one-row `gemv`, weight-only `w16` and quantised-activation steps,
the last also with their K steps split over programs), with the weight's TB/s; then per row count the
best tile by total time over the shapes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import torch.nn.functional as F
import triton.testing

from epinfer.kernels import fp8_gemm, small_gemm

# (name, N, K) of the Qwen3.5-35B-A3B shape's FP8 projections
SHAPES = [("gdn_in_qkvz", 12288, 2048), ("gdn_out", 2048, 4096), ("attn_qkv", 9216, 2048), ("attn_o", 2048, 4096),
          ("shared_gate_up", 1024, 2048), ("shared_down", 2048, 512)]


# decode-time projections (name, N, K): the Qwen3-30B-A3B shape's stacked q / k / v and o_proj, then the
# Qwen3.5-35B-A3B shape's GDN and attention ones
DECODE_SHAPES = [("30b_qkv", 5120, 2048), ("30b_o", 2048, 4096), *SHAPES[:3]]


def decode_tiles(M: int) -> list[tuple]:
    """(mode, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tried at M rows (`fp8_gemm.tiles`)."""
    bm = max(16, triton.next_power_of_2(M))
    narrow = [(bn, bk, w, st) for bn, bk, w, st in itertools.product((4, 8, 16, 32), (128, 256, 512), (2, 4), (2, 4))
              if bn * bk <= 8192]
    wide = [(bn, bk, w, 1) for bn, bk, w in itertools.product((4, 8, 16), (1024, 2048), (4, 8))]  # (summed each step)
    gemv = [("gemv", 1, *t) for t in narrow + wide] if M == 1 else []
    w16 = [("w16", bm, bn, bk, w, st) for bn, bk, w, st in itertools.product((16, 32, 64), (256, 512, 1024), (2, 4),
                                                                            (3, 4, 5))
           if bn * bk <= 32768 and bm * bk <= 32768]
    bms = [bm] if M <= 64 else [64, 128]  # (over 64 rows: several row tiles)
    quant = [("fp8", m, bn, 128, w, st) for m, bn, w, st in itertools.product(bms, (16, 32, 64, 128), (2, 4, 8),
                                                                              (3, 4, 5))
             if not (w == 8 and bn < 64)]
    split = [("fp8", m, bn, 128, 4, st, sp)
             for m, bn, st, sp in itertools.product(bms, (32, 64, 128), (3, 4), (2, 4, 8))
             ] if M > 8 else []  # (K steps shared by `sp` programs)
    return gemv + w16 + quant + split


def decode(rows: list[int]) -> None:
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for name, N, K in DECODE_SHAPES:
        w, scale = fp8_gemm.quantize_blocks(torch.randn(N, K, generator=gen) * 0.02, (128, 128))
        w16 = fp8_gemm.dequantize_blocks(w, scale, (128, 128)).to("cuda", torch.bfloat16)
        weights[name] = (w.cuda(), scale.cuda(), w16)
    for M in rows:
        totals: dict = {}
        for name, N, K in DECODE_SHAPES:
            x = torch.randn(M, K, generator=gen).to("cuda", torch.bfloat16)
            times = decode_shape(x, *weights[name])
            for tile, ms in times.items():
                totals[tile] = totals.get(tile, 0.0) + ms
            best = sorted(times, key=times.get)[:4]
            print(json.dumps({"rows": M, "shape": name, "N": N, "K": K, "bf16_us": round(times["bf16"] * 1e3, 2),
                              "fp8_default_us": round(times["default"] * 1e3, 2),
                              "best": [(round(times[t] * 1e3, 2), round(N * K / 1e9 / times[t], 2), t)
                                       for t in best]}), flush=True)
        best = sorted((t for t in totals if isinstance(t, tuple)), key=totals.get)[:5]
        best += [t for t in ("cublas",) if t in totals]
        print(json.dumps({"rows": M, "bf16_us": round(totals["bf16"] * 1e3, 2),
                          "default_us": round(totals["default"] * 1e3, 2),
                          "best_over_shapes": [(round(totals[t] * 1e3, 2), t) for t in best]}), flush=True)


def decode_shape(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, w16: torch.Tensor) -> dict:
    """ms by path: "bf16", "default" (the FP8 kernel's own tiles), "cublas" (its block-scaled FP8 GEMM,
    where this GPU and torch have it) and each tile of `decode_tiles`."""
    times = {"bf16": graphed((lambda: small_gemm.linear(x, w16)) if small_gemm.usable(x, w16)
                             else (lambda: F.linear(x, w16))),
             "default": graphed(lambda: fp8_gemm.fp8_linear(x, w, scale, (128, 128)))}
    if hasattr(F, "scaled_mm") and fp8_gemm.hopper(x.device):
        times["cublas"] = graphed(lambda: fp8_gemm.cublas_linear(x, w, scale))
    for tile in decode_tiles(x.shape[0]):
        times[tile] = graphed(lambda tile=tile: fp8_gemm.fp8_linear(x, w, scale, (128, 128), tile=tile))
    return times


def graphed(fn) -> float:
    """ms per call replayed in a CUDA graph (inf where the tile does not launch: shared memory)."""
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=20)
    except Exception:
        return float("inf")


def timed(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50)


def dense(rows: int) -> None:
    gen = torch.Generator().manual_seed(0)
    for name, N, K in SHAPES:
        one_shape(name, rows, N, K, gen)


def one_shape(name: str, rows: int, N: int, K: int, gen: torch.Generator) -> None:
    w, scale = fp8_gemm.quantize_blocks(torch.randn(N, K, generator=gen) * 0.02, (128, 128))
    x = torch.randn(rows, K, generator=gen).to("cuda", torch.bfloat16)
    w, scale = w.cuda(), scale.cuda()
    w16 = fp8_gemm.dequantize_blocks(w, scale, (128, 128)).to(torch.bfloat16)
    ref = fp8_gemm.fp8_linear_reference(x[:512].cpu(), w.cpu(), scale.cpu(), (128, 128)).float()
    flops = 2 * rows * N * K

    def fp8():
        return fp8_gemm.fp8_linear(x, w, scale, (128, 128))

    for path, fn, switch in (("bf16", lambda: F.linear(x, w16), None), ("fp8_triton", fp8, "0"),
                             ("fp8_cublas", fp8, "1")):
        if switch is not None:
            os.environ["EPINFER_FP8_CUBLAS"] = switch
        rec = {"shape": name, "rows": rows, "N": N, "K": K, "path": path}
        if path == "fp8_cublas" and not fp8_gemm.cublas_mode(x, w, (128, 128)):
            print(json.dumps(rec | {"error": f"not taken here (torch {torch.__version__}, CUDA {torch.version.cuda}, "
                                             f"scaled_mm {hasattr(F, 'scaled_mm')})"}), flush=True)
            continue
        try:
            out = fn()
            if path != "bf16":
                rec["rel_err"] = round(((out[:512].float().cpu() - ref).norm() / ref.norm()).item(), 5)
            ms = timed(fn)
            rec |= {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
        except Exception as e:  # (a torch without the block-scaled cuBLAS GEMM: say so, go on)
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(json.dumps(rec), flush=True)


def grouped(rows: int, experts: int = 256, top_k: int = 8, N: int = 1024, K: int = 2048) -> None:
    """The routed experts' gate / up: rows x top_k pairs spread evenly over `experts`."""
    pairs = rows * top_k
    per = pairs // experts
    offs = torch.arange(1, experts + 1, device="cuda", dtype=torch.int32) * per
    x = torch.randn(per * experts, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(experts, N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    flops = 2 * per * experts * N * K
    rec = {"shape": "experts_gate_up", "pairs": per * experts, "experts": experts, "N": N, "K": K,
           "path": "bf16_grouped"}
    ms = timed(lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs))
    print(json.dumps(rec | {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}), flush=True)
    rec["path"] = "fp8_scaled_grouped_mm"
    if not hasattr(F, "scaled_grouped_mm"):
        print(json.dumps(rec | {"error": "no F.scaled_grouped_mm"}), flush=True)
        return
    try:
        q, qs = fp8_gemm.quantize_activations(x, 128, cublas=True)
        wq, ws = fp8_gemm.quantize_blocks(w, (128, 128))
        ws = fp8_gemm.cublas_weight_scales(ws)

        def run():
            return F.scaled_grouped_mm(q, wq.transpose(1, 2), qs, F.ScalingType.BlockWise1x128, ws,
                                       F.ScalingType.BlockWise128x128, offs=offs, output_dtype=torch.bfloat16)

        run()
        ms = timed(run)
        rec |= {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    print(json.dumps(rec), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--decode", default=None, help="row counts, e.g. 1,8,64: the decode-size tile sweep")
    args = ap.parse_args()
    if args.decode:
        decode([int(r) for r in args.decode.split(",")])
        return 0
    fp8_gemm.CUBLAS_MIN_NK = 128  # cuBLAS timed at every width, the narrow ones the engine leaves to Triton too
    print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                      "gpu": torch.cuda.get_device_name(), "scaled_mm": hasattr(F, "scaled_mm")}), flush=True)
    dense(args.rows)
    grouped(args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
