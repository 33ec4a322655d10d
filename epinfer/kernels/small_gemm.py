"""Linear layers at decode batch sizes on the GPU: y = x @ W.T for a few rows (bf16 / fp16).

At one to a few rows a projection is a matrix-vector product bound by reading W once. This kernel
gives each program BLOCK_N output columns for all rows (rows padded to 16 for the tensor-core dot)
and streams its [BLOCK_N, D] slice of W with BLOCK_K-wide loads, accumulating in fp32; with many
output columns (every projection of the supported models) that is enough programs to keep every SM
reading. Measured against cuBLAS per shape by `benchmarks/gemv_sweep.py`.

`row_times_rows` is the one-row form on the CUDA cores (no tensor-core tile), with the block scales of
FP8 weights: `gemv` (a projection of one row, bf16 or FP8: `fp8_gemm`'s gemv mode) and the per-pair
experts of `moe_gemv` use it.
"""

from __future__ import annotations

import torch

from epinfer.kernels import pdl

try:  # Triton is optional: CPU installs don't have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

MAX_ROWS = 8  # measured up to 8 rows (at 8 the o_proj ties cuBLAS)
ENABLED = True
# by output columns; H200, 2026-11-29, `benchmarks/gemv_sweep.py` (RESULTS.md): at 1 row, o_proj 2048 x 4096
# 6.8 µs (cuBLAS 8.1 + its split-K reduce), LM head 151936 x 2048 138 µs (cuBLAS 143); qkv 5120 x 2048
# ties (6.6 / 6.5), so the stacked q/k/v GEMM stays in cuBLAS
CONFIGS = [(4096, {"BLOCK_N": 16, "BLOCK_K": 512, "num_stages": 3, "num_warps": 2}),
           (32768, {"BLOCK_N": 32, "BLOCK_K": 512, "num_stages": 3, "num_warps": 2}),
           (None, {"BLOCK_N": 64, "BLOCK_K": 128, "num_stages": 4, "num_warps": 2})]


def config(n: int) -> dict:
    return next(cfg for limit, cfg in CONFIGS if limit is None or n <= limit)


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (ENABLED and triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and weight.dtype == x.dtype and weight.stride(1) == 1
            and x.stride(1) == 1)


def linear(x_TD: torch.Tensor, weight_ND: torch.Tensor, bias_N: torch.Tensor | None = None,
           cfg: dict | None = None) -> torch.Tensor:
    """`cfg` with "gemv" (one row): `row_times_rows` on the CUDA cores instead of the tensor-core tile
    (a sweep's option, `benchmarks/gemv_sweep.py`; no default takes it yet)."""
    T, D = x_TD.shape
    N = weight_ND.shape[0]
    cfg = cfg or config(N)
    if cfg.get("gemv"):
        if T != 1:
            raise ValueError(f"small_gemm.linear: the gemv tiles take one row, not {T}")
        return gemv(x_TD, weight_ND, None, (1, 1), bias_N, cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"],
                    cfg["num_stages"])
    y = torch.empty(T, N, dtype=x_TD.dtype, device=x_TD.device)
    _linear_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        x_TD, weight_ND, bias_N if bias_N is not None else y, y, T, N, x_TD.stride(0), weight_ND.stride(0),
        y.stride(0), D=D, BLOCK_T=max(16, triton.next_power_of_2(T)), HAS_BIAS=bias_N is not None,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_stages=cfg["num_stages"], num_warps=cfg["num_warps"],
        **pdl.kwargs(x_TD.device))
    return y


def gemv(x_1D: torch.Tensor, weight_ND: torch.Tensor, scale: torch.Tensor | None, block: tuple[int, int],
         bias_N: torch.Tensor | None, block_n: int, block_k: int, warps: int, stages: int) -> torch.Tensor:
    """x [1, D] @ W.T on the CUDA cores (`_gemv_kernel`); `scale`: W's FP8 block scales (`block`)."""
    N, D = weight_ND.shape
    y = torch.empty(1, N, dtype=x_1D.dtype, device=x_1D.device)
    s = scale if scale is not None else weight_ND
    whole = pdl.whole(x_1D.device, block_n, D, weight_ND.element_size(), block[1] if scale is not None else 1)
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x_1D, weight_ND, s, bias_N if bias_N is not None else y, y, N, weight_ND.stride(0),
        s.stride(0) if scale is not None else 0, D, HAS_BIAS=bias_N is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        SCALED=scale is not None, SCALE_ROWS=block[0], GROUP=block[1], WHOLE=whole,
        num_warps=max(warps, 4) if whole else warps, num_stages=stages, **pdl.kwargs(x_1D.device))
    return y



if triton is not None:

    @triton.jit
    def rows_times_columns(X, W, sx_t, sw_n, offs_t, t_ok, offs_n, n_ok, lo, hi, BLOCK_T: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """x[rows, lo:hi] @ W[columns, lo:hi].T in fp32 ([BLOCK_T, BLOCK_N]), streaming W in BLOCK_K steps."""
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for k0 in range(lo, hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < hi
            x = tl.load(X + offs_t[:, None] * sx_t + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W + offs_n[None, :].to(tl.int64) * sw_n + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0)
            acc = tl.dot(x, w, acc)
        return acc

    @triton.jit
    def scale_groups(p, scale_rows, k0, k_end, n_ok, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
        """p [BLOCK_N, BLOCK_K] (input columns k0 .. k0 + BLOCK_K, k0 a multiple of BLOCK_K) times
        each row's block scale of each column: `scale_rows` [BLOCK_N] points at each row's scales,
        input column k's at entry k // GROUP (GROUP a power of two; columns from k_end on get 0)."""
        if BLOCK_K <= GROUP:  # (the step lies inside one group)
            return p * tl.load(scale_rows + k0 // GROUP, mask=n_ok, other=0.0)[:, None]
        else:
            G: tl.constexpr = BLOCK_K // GROUP
            groups = k0 // GROUP + tl.arange(0, G)
            s = tl.load(scale_rows[:, None] + groups[None, :], mask=n_ok[:, None] & (groups * GROUP < k_end)[None, :],
                        other=0.0)
            return tl.reshape(tl.reshape(p, (p.shape[0], G, GROUP)) * s[:, :, None], (p.shape[0], BLOCK_K))

    @triton.jit
    def row_times_rows(X, W, S, offs_n, n_ok, sw_n, hi, BLOCK_K: tl.constexpr, SCALED: tl.constexpr,
                       GROUP: tl.constexpr):
        """sum over k < hi of x[k] * W[n, k] (times its scale, `SCALED`: S [BLOCK_N] points at each
        row's scales) for the BLOCK_N rows offs_n, float32 [BLOCK_N]. Steps of up to 8192 weights
        add their products into a [BLOCK_N, BLOCK_K] tile summed once at the end; wider ones (a
        whole row in one step, all its loads in flight at once) are summed each step."""
        w_rows = W + offs_n[:, None].to(tl.int64) * sw_n
        if offs_n.shape[0] * BLOCK_K > 8192:
            acc = tl.zeros([offs_n.shape[0]], dtype=tl.float32)
            for k0 in range(0, hi, BLOCK_K):
                acc += tl.sum(_products(X, w_rows, S, n_ok, k0, hi, BLOCK_K, SCALED, GROUP), 1)
            return acc
        else:
            tile = tl.zeros([offs_n.shape[0], BLOCK_K], dtype=tl.float32)
            for k0 in range(0, hi, BLOCK_K):
                tile += _products(X, w_rows, S, n_ok, k0, hi, BLOCK_K, SCALED, GROUP)
            return tl.sum(tile, 1)

    @triton.jit
    def _products(X, w_rows, S, n_ok, k0, hi, BLOCK_K: tl.constexpr, SCALED: tl.constexpr, GROUP: tl.constexpr):
        """x[k] * W[n, k] (scaled) for the input columns k0 .. k0 + BLOCK_K, float32 [BLOCK_N, BLOCK_K]."""
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < hi
        x = tl.load(X + k, mask=k_ok, other=0.0).to(tl.float32)
        p = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32) * x[None, :]
        if SCALED:
            p = scale_groups(p, S, k0, hi, n_ok, BLOCK_K, GROUP)
        return p

    @triton.jit
    def whole_rows(W, scale_rows, offs_n, n_ok, sw_n, depth, WHOLE: tl.constexpr, SCALED: tl.constexpr,
                   GROUP: tl.constexpr):
        """(the rows offs_n of W, columns 0 .. WHOLE, 0 from `depth` on; with SCALED their block scales
        [BLOCK_N, WHOLE // GROUP], `scale_rows` [BLOCK_N] pointing at each row's), loaded in one go: what a
        program loads before its PDL wait (`pdl.whole`)."""
        k = tl.arange(0, WHOLE)
        w = tl.load(W + offs_n[:, None].to(tl.int64) * sw_n + k[None, :], mask=n_ok[:, None] & (k < depth)[None, :],
                    other=0.0)
        if SCALED:
            groups = tl.arange(0, WHOLE // GROUP)
            sc = tl.load(scale_rows[:, None] + groups[None, :], mask=n_ok[:, None] & (groups * GROUP < depth)[None, :],
                         other=0.0)
        else:
            sc = tl.zeros([1], dtype=tl.float32)
        return w, sc

    @triton.jit
    def whole_dot(X, w, sc, depth, WHOLE: tl.constexpr, SCALED: tl.constexpr, GROUP: tl.constexpr):
        """x[:depth] . each row of `whole_rows`' (w, sc), float32 [BLOCK_N]: each group of GROUP
        products summed, then scaled."""
        k = tl.arange(0, WHOLE)
        p = w.to(tl.float32) * tl.load(X + k, mask=k < depth, other=0.0).to(tl.float32)[None, :]
        if SCALED:
            return tl.sum(tl.sum(tl.reshape(p, (p.shape[0], WHOLE // GROUP, GROUP)), 2) * sc, 1)
        else:
            return tl.sum(p, 1)

    @triton.jit
    def _gemv_kernel(X, W, S, B, Y, N, sw_n, ss, D, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SCALED: tl.constexpr, SCALE_ROWS: tl.constexpr, GROUP: tl.constexpr,
                     WHOLE: tl.constexpr, PDL: tl.constexpr):
        """One row: y[n] = x . W[n] (+ bias) on the CUDA cores; `SCALED`: W in FP8 with block scales S
        [ceil(N / SCALE_ROWS), ceil(D / GROUP)] (row stride ss): `fp8_gemm`'s gemv mode. WHOLE > 0
        (a power of two >= D): the program's weight rows (and scales) are loaded whole before the wait
        for the kernel before it, each group of GROUP products summed, then scaled."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        scale_rows = S + (offs_n // SCALE_ROWS).to(tl.int64) * ss
        if WHOLE:
            w, sc = whole_rows(W, scale_rows, offs_n, n_ok, sw_n, D, WHOLE, SCALED, GROUP)
        if PDL:
            tl.extra.cuda.gdc_wait()
        if WHOLE:
            y = whole_dot(X, w, sc, D, WHOLE, SCALED, GROUP)
        else:
            y = row_times_rows(X, W, scale_rows, offs_n, n_ok, sw_n, D, BLOCK_K, SCALED, GROUP)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        if HAS_BIAS:
            y += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(Y + offs_n, y.to(Y.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _linear_kernel(X, W, B, Y, T, N, sx_t, sw_n, sy_t, D: tl.constexpr, BLOCK_T: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_wait()
        offs_t = tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        acc = rows_times_columns(X, W, sx_t, sw_n, offs_t, t_ok, offs_n, n_ok, 0, D, BLOCK_T, BLOCK_N, BLOCK_K)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        if HAS_BIAS:
            acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_t[:, None] * sy_t + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=t_ok[:, None] & n_ok[None, :])
