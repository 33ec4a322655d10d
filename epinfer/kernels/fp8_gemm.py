"""Block-scaled FP8 linear layers in Triton: y = x @ W.T with W stored as float8_e4m3fn and one
float32 scale per 128 x 128 block (`scale_inv`, as Qwen's FP8 checkpoints ship it), and x quantised
on the fly per token and group of 128 input columns (dynamic activation scales, the checkpoints'
`activation_scheme: dynamic`).

x is quantised first, in one pass (`quantize_activations`): each row's group of GROUP columns (the
weight block's column count) scaled by its absolute maximum into FP8's range (max 448), a float32
scale per row and group. Program (m, n) of the GEMM then holds BLOCK_M rows x BLOCK_N output columns
and walks K a group at a time: it multiplies the FP8 tiles on the tensor cores and adds the product
times (row scale x each column's weight block scale) to a float32 accumulator. (Quantising inside
the GEMM instead repeats a row reduction per group in every column tile, on the path between the
loads and the product: measured slower on an H200.) Weight blocks may have any row count (a tile
reads its columns' scales as a vector); their column count is the activation group.

`fp8_linear_reference` computes the same quantisation in torch (float32 products): what the kernel
is tested against, and the arithmetic it promises.

At decode sizes (8 rows or fewer by default, `W16_ROWS` with EPINFER_FP8_DECODE_W16=1) the GEMM is
bound by reading the weight, and the per-group FP8 products above keep too few bytes in flight (one
128-column group a step). There the kernel widens each FP8 weight tile to the activations' dtype in
registers, times its block scales, and multiplies the unquantised activations in wide K steps (`w16`
mode: weight-only FP8, as for GPUs without FP8 products; the only rounding beyond the checkpoint's is
the widened weight's, 2^-9 relative in bf16). `fp8_linear_reference(..., w16=True)` is its arithmetic.
A single row takes the same arithmetic on the CUDA cores (`gemv` mode: no tensor-core tile padded to
16 rows, the weight times its scales kept in float32).

At prefill sizes (`CUBLAS_ROWS` rows or more, weights of 2048 x 2048 or wider, Hopper, 128 x 128
blocks; weights `WIDE_N` or more wide from `WIDE_ROWS` rows) the same quantised activations go to
cuBLAS's block-scaled FP8 GEMM instead (`F.scaled_mm` with 1 x 128 activation and 128 x 128 weight
scales, the arithmetic above): its scales column-major, rows padded to a multiple of 4, the
weight's scale columns to a multiple of 4 (cuBLAS's layout). EPINFER_FP8_CUBLAS=0 keeps them on the Triton kernel.

Shape suffixes: M rows, N output columns, K input columns.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from epinfer.core.env import SWITCHES
from epinfer.kernels import pdl, small_gemm

try:  # Triton is optional: CPU installs don't have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # kernels on CPU tensors (their checks here)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
MIN_SCALE = 1e-12  # a group of zeros keeps a finite scale


def quantize_groups(x_MK: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in FP8 [M, K], float32 scales [M, ceil(K / group)]): each row's group of `group` columns
    scaled by its absolute maximum / 448 (the last group may be partial)."""
    M, K = x_MK.shape
    groups = -(-K // group)
    padded = torch.nn.functional.pad(x_MK.float(), (0, groups * group - K)).view(M, groups, group)
    scale = (padded.abs().amax(-1) / FP8_MAX).clamp(min=MIN_SCALE)
    q = (padded / scale[..., None]).to(torch.float8_e4m3fn)
    return q.view(M, groups * group)[:, :K], scale


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, float32 scales [..., ceil(rows / b0), ceil(cols / b1)]) of a weight whose last
    two dims are (rows, cols): each block scaled by its absolute maximum / 448, as Qwen's
    checkpoints are (a block already quantised that way comes back as the same FP8 values)."""
    *lead, rows, cols = w.shape
    nr, nc = -(-rows // block[0]), -(-cols // block[1])
    if w.numel() == 0:  # (an expert-parallel rank without experts)
        return w.to(torch.float8_e4m3fn), torch.ones(*lead, nr, nc, device=w.device)
    padded = torch.nn.functional.pad(w.float(), (0, nc * block[1] - cols, 0, nr * block[0] - rows))
    tiles = padded.view(*lead, nr, block[0], nc, block[1])
    scale = (tiles.abs().amax((-3, -1)) / FP8_MAX).clamp(min=MIN_SCALE)
    q = (tiles / scale[..., :, None, :, None]).to(torch.float8_e4m3fn).view(*lead, nr * block[0], nc * block[1])
    return q[..., :rows, :cols].contiguous(), scale


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The block scales' shape of a weight of `shape`: [..., ceil(rows / b0), ceil(cols / b1)]."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def dequantize_blocks(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 weight: each (block rows x block columns) tile of the last two dims times its scale
    (edge tiles partial)."""
    rows, cols = w.shape[-2:]
    full = scale.float().repeat_interleave(block[0], -2)[..., :rows, :].repeat_interleave(block[1], -1)[..., :cols]
    return w.float() * full


def dequantize_weights(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                       dtype: torch.dtype) -> torch.Tensor:
    """`dequantize_blocks` rounded to `dtype` once, [..., rows, cols]: one Triton pass on CUDA (a
    program a block: its FP8 bytes read once, its one scale, `dtype` written), torch elsewhere."""
    rows, cols = w.shape[-2:]
    b0, b1 = block
    if tuple(scale.shape) != scale_shape(w.shape, block):
        raise ValueError(f"dequantize_weights: scales {tuple(scale.shape)} for {tuple(w.shape)} in {block} blocks")
    if triton is None or not (w.is_cuda or INTERPRETED):
        return dequantize_blocks(w, scale, block).to(dtype)
    w3, s3 = w.reshape(-1, rows, cols), scale.reshape(-1, *scale.shape[-2:])
    out = torch.empty(w3.shape, dtype=dtype, device=w.device)
    tile_r, tile_c = triton.next_power_of_2(b0), triton.next_power_of_2(b1)
    if out.numel():
        _dequantize_kernel[(w3.shape[0], triton.cdiv(rows, b0), triton.cdiv(cols, b1))](
            w3, s3, out, rows, cols, b0, b1, w3.stride(0), w3.stride(1), w3.stride(2), s3.stride(0), s3.stride(1),
            s3.stride(2), out.stride(0), out.stride(1), BLOCK_R=tile_r, BLOCK_C=tile_c,
            num_warps=8 if tile_r * tile_c >= 8192 else 4)
    return out.view(w.shape)


def fake_quantize(x_MK: torch.Tensor, group: int) -> torch.Tensor:
    """x as the kernels see it, float32: quantised per row and group of `group` columns, dequantised."""
    q, s = quantize_groups(x_MK, group)
    return q.float() * s.repeat_interleave(group, 1)[:, :q.shape[1]]


def fp8_linear_reference(x_MK, w_NK, scale, block: tuple[int, int], bias=None, w16: bool = False) -> torch.Tensor:
    """The kernel's arithmetic in float32: activations quantised per group (or, `w16`, as they are)."""
    x = x_MK.float() if w16 else fake_quantize(x_MK, block[1])
    y = x @ dequantize_blocks(w_NK, scale, block).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x_MK.dtype)


def usable(x_MK: torch.Tensor, w_NK: torch.Tensor, block: tuple[int, int]) -> bool:
    """CUDA bf16 / fp16 activations, an FP8 weight, activation groups of a power of two >= 16; unit
    inner strides (the kernels take row strides only)."""
    group = block[1]
    return (triton is not None and x_MK.is_cuda and x_MK.dtype in (torch.bfloat16, torch.float16)
            and w_NK.dtype == torch.float8_e4m3fn and group >= 16 and group & (group - 1) == 0
            and x_MK.stride(-1) == 1 and w_NK.stride(-1) == 1)


W16_ROWS = 64  # the most rows `w16` mode takes


def w16_mode(M: int) -> bool:
    return min(W16_ROWS, SWITCHES.fp8_w16_tokens) >= M


def tiles(M: int, N: int, K: int, sms: int, group: int, w16: bool) -> tuple:
    """(mode, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, splits]) by the shape: decode sizes
    read the weight once with narrow row tiles, and columns (or, for few narrow columns and a long K,
    K steps: `splits`) spread finely enough to keep every SM streaming weights; prefill sizes use
    square-ish tensor-core tiles, one activation group a K step. Modes: "w16" (wide K steps, as
    `small_gemm`'s bf16 kernel), "fp8" (quantised activations) and "gemv" (one row, the w16
    arithmetic on the CUDA cores: `small_gemm.gemv`). Measured on an H200 by
    `benchmarks/fp8_gemm_sweep.py --decode 1,64,200` over the 30B and Qwen3.5 shapes' projections
    (RESULTS.md): at one row the gemv tile below took 26.4 µs in all against 47.4 for the w16 tiles
    (bf16: 46.1); at 64 rows tiles of 64 x 16 columns for the 2048-wide projections (K = 4096) and
    64 x 64 for the 5120-wide 53.3 µs against 67.0 for 64 x 128 everywhere, and the 2048-wide ones'
    K steps split over 4 programs 7.4-7.8 µs against 9.7-9.8; at 200 rows 64 x 64 tiles (the
    2048-wide ones 128 x 64, K over 4 programs) against 128 x 128 tiles: 13.4-13.6 µs against
    27.2-27.6 for those and 21.8-26.0 against 29.0-31.1 for the 9216- and 12288-wide (which cuBLAS
    takes from 128 rows, `cublas_shape`)."""
    if w16:
        if M == 1:
            return "gemv", 1, 8, 512, 2, 4
        if M <= 16:
            bn = 16 if N <= 4096 else 32
            return "w16", 16, bn, 512, 2, 3
        return "w16", 64, 64, 128, 4, 3  # (K steps of 256 need ~288 KiB of shared memory here)
    if M <= 16:
        bn = 64
        while bn > 16 and triton.cdiv(N, bn) < 2 * sms:
            bn //= 2
        return "fp8", 16, bn, group, 4, 4
    narrow_long = N <= 2048 and K >= 4096  # (few column tiles, many K steps each)
    if M <= 64:
        if narrow_long:
            return "fp8", 64, 32, group, 4, 3, 4
        bn = 128 if N >= 8192 else 64 if N >= 4096 else 16
        return "fp8", 64, bn, group, 4, 4 if bn == 16 else 3
    if M < CUBLAS_ROWS:
        return ("fp8", 128, 64, group, 4, 3, 4) if narrow_long else ("fp8", 64, 64, group, 4, 3)
    return "fp8", 128, 128, group, 8, 3


@functools.cache
def multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":  # (Triton's interpreter)
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def quantize_activations(x_MK: torch.Tensor, group: int,
                         cublas: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_groups` in one Triton pass on CUDA (x may be row-strided); torch elsewhere.
    `cublas`: cuBLAS's layout: rows padded with zeros to a multiple of 4, the scales column-major."""
    if triton is None or not (x_MK.is_cuda or INTERPRETED):
        return quantize_groups(x_MK, group)
    M, K = x_MK.shape
    G = triton.cdiv(K, group)
    rows = -(-M // 4) * 4 if cublas else M
    q = torch.empty(rows, K, dtype=torch.float8_e4m3fn, device=x_MK.device)
    if cublas:
        s = torch.empty(G, rows, dtype=torch.float32, device=x_MK.device).t()
        q[M:].zero_()
        s[M:].fill_(1.0)
    else:
        s = torch.empty(M, G, dtype=torch.float32, device=x_MK.device)
    per = triton.next_power_of_2(max(1, min(G, 2048 // group)))  # groups per program
    if M:
        _quantize_kernel[(M, triton.cdiv(G, per))](x_MK, q, s, K, G, x_MK.stride(0), q.stride(0), s.stride(0),
                                                   s.stride(1), GROUP=group, GROUPS=per, num_warps=4,
                                                   **pdl.kwargs(x_MK.device))
    return q, s


CUBLAS_ROWS = 256  # the fewest rows the cuBLAS path takes; weights WIDE_N or wider from WIDE_ROWS (at 200
# rows on an H200 cuBLAS ran the 5120- to 12288-wide projections in 10.9-18.0 µs against 13.7-26.0 for the
# best Triton tiles; at 64 rows the Triton kernel's tiles were faster, RESULTS.md)
WIDE_N, WIDE_ROWS = 4096, 128
# the narrowest weight it takes, both ways: at 16384 rows on an H200 cuBLAS ran the Qwen3.5 shape's
# projections of 2048 x 4096 and wider 1.3-1.45x faster than bf16 and 1.8-1.9x faster than the Triton
# kernel, but the shared expert's 1024 x 2048 and 2048 x 512 slower than both (RESULTS.md, kernel sweeps)
CUBLAS_MIN_NK = 2048


def cublas_shape(M: int, N: int, K: int) -> bool:
    """Whether an [M, K] x [N, K]^T FP8 GEMM is one cuBLAS's block-scaled kernel runs faster."""
    fewest = WIDE_ROWS if N >= WIDE_N else CUBLAS_ROWS
    return fewest <= M and N >= CUBLAS_MIN_NK and K >= CUBLAS_MIN_NK and N % 128 == 0 and K % 128 == 0


@functools.cache
def hopper(device: torch.device) -> bool:
    """A Hopper GPU and a torch built with CUDA 12.9 or later (cuBLAS's block-scaled FP8 GEMM)."""
    cuda = tuple(int(p) for p in (torch.version.cuda or "0.0").split(".")[:2])
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0) and cuda >= (12, 9)


def cublas_mode(x_MK: torch.Tensor, w_NK: torch.Tensor, block: tuple[int, int]) -> bool:
    """cuBLAS's block-scaled FP8 GEMM for this input: not EPINFER_FP8_CUBLAS=0, bf16 activations (the
    output dtype measured and tested), a shape it runs faster (`cublas_shape`), 128 x 128 blocks, a
    Hopper GPU and a torch with `F.scaled_mm`."""
    return (SWITCHES.fp8_cublas and x_MK.dtype == torch.bfloat16
            and cublas_shape(x_MK.shape[0], w_NK.shape[0], x_MK.shape[1])
            and tuple(block) == (128, 128) and hasattr(F, "scaled_mm") and hopper(x_MK.device))


def cublas_weight_scales(scale: torch.Tensor) -> torch.Tensor:
    """A weight's block scales [..., N / 128, K / 128] as cuBLAS takes them: the K blocks padded to
    a multiple of 4, the last two dims transposed (a view)."""
    pad = -scale.shape[-1] % 4
    s = scale.float()
    return (F.pad(s, (0, pad)) if pad else s).transpose(-2, -1)


def cublas_linear(x_MK: torch.Tensor, w_NK: torch.Tensor, scale: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """`fp8_linear` through cuBLAS (`cublas_mode`): the activations quantised by our kernel in
    cuBLAS's layout, the weight's scales in theirs (`cublas_weight_scales`)."""
    M = x_MK.shape[0]
    q, qs = quantize_activations(x_MK, 128, cublas=True)
    y = F.scaled_mm(q, w_NK.t(), qs, F.ScalingType.BlockWise1x128, cublas_weight_scales(scale),
                    F.ScalingType.BlockWise128x128, output_dtype=x_MK.dtype)[:M]
    return y if bias is None else y + bias


def fp8_linear(x_MK: torch.Tensor, w_NK: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
               bias: torch.Tensor | None = None, tile: tuple | None = None) -> torch.Tensor:
    """x [M, K] (bf16 / fp16) @ W.T, W [N, K] float8_e4m3fn with `scale` [ceil(N / b0), ceil(K / b1)].
    `tile`: (mode, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, splits]) in place of `tiles`' (a
    sweep's; BLOCK_K is the group in "fp8" mode; "gemv" takes one row). `splits` > 1 ("fp8" / "w16"):
    each output tile's K steps are split over that many programs, whose float32 partial sums a second
    kernel adds in order (deterministic), with the bias: more programs for few, narrow output tiles
    (`tiles`' choice at decode sizes for narrow weights with a long K)."""
    M, K = x_MK.shape
    N = w_NK.shape[0]
    if M and tile is None and cublas_mode(x_MK, w_NK, block):
        return cublas_linear(x_MK, w_NK, scale, bias)
    if M == 0:
        return torch.empty(M, N, dtype=x_MK.dtype, device=x_MK.device)
    mode, bm, bn, bk, warps, stages, *splits = tile or tiles(M, N, K, multiprocessors(x_MK.device),
                                                             block[1], w16_mode(M))
    splits = splits[0] if splits else 1
    if mode == "gemv" and M != 1:
        raise ValueError(f"fp8_linear: the gemv tiles take one row, not {M}")
    if mode == "gemv":
        return small_gemm.gemv(x_MK, w_NK, scale, block, bias, bn, bk, warps, stages)
    bk = block[1] if mode == "fp8" else bk  # (a K step is one activation group)
    out = torch.empty(M, N, dtype=x_MK.dtype, device=x_MK.device)
    w16 = mode == "w16"
    q, qs = (x_MK, x_MK) if w16 else quantize_activations(x_MK, block[1])
    part = out if splits == 1 else torch.empty(splits, M, N, dtype=torch.float32, device=x_MK.device)
    _fp8_linear_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn), splits)](
        q, qs, w_NK, scale, bias if bias is not None else scale, part, M, N, K, q.stride(0), qs.stride(0),
        w_NK.stride(0), scale.stride(0), part.stride(-2), GROUP=block[1], SCALE_ROWS=block[0],
        HAS_BIAS=bias is not None and splits == 1, W16=w16, SPLITS=splits, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages, **pdl.kwargs(x_MK.device))
    if splits > 1:
        _sum_splits_kernel[(M, triton.cdiv(N, 1024))](part, bias if bias is not None else part, out, M, N,
                                                      out.stride(0), SPLITS=splits, HAS_BIAS=bias is not None,
                                                      BLOCK=1024, num_warps=4, **pdl.kwargs(x_MK.device))
    return out


if triton is not None:

    @triton.jit
    def quantize_rows(a):
        """A tile [M, group] -> (FP8 tile, float32 scale per row): each row scaled into +-448."""
        a = a.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(a), 1) / 448.0, 1e-12)
        return (a / scale[:, None]).to(tl.float8e4nv), scale

    @triton.jit
    def fp8_dot(a_q, w):
        """FP8 tiles' product on the tensor cores, float32. Their FP8 product needs K >= 32: groups
        of 16 (tiny test shapes) go through fp16, which holds every FP8 value exactly."""
        if a_q.shape[1] >= 32:
            return tl.dot(a_q, w)
        else:
            return tl.dot(a_q.to(tl.float16), w.to(tl.float16))

    @triton.jit
    def _quantize_kernel(X, Q, S, K, G, sx, sq, ss, sg, GROUP: tl.constexpr, GROUPS: tl.constexpr,
                         PDL: tl.constexpr):
        """Row program_id(0), groups program_id(1) * GROUPS on: each group scaled into +-448; the
        scale of row m, group g at S + m * ss + g * sg."""
        if PDL:
            tl.extra.cuda.gdc_wait()
        m = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
        cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        ok = (g[:, None] < G) & (cols < K)
        q, scale = quantize_rows(tl.load(X + m * sx + cols, mask=ok, other=0.0))
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        tl.store(Q + m * sq + cols, q, mask=ok)
        tl.store(S + m * ss + g * sg, scale, mask=g < G)

    @triton.jit
    def widen(w, scales_ptr, k0, k_end, n_ok, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
        """An FP8 weight tile [BLOCK_K, BLOCK_N] of input columns k0 .. k0 + BLOCK_K (k0 a multiple
        of BLOCK_K, columns from k_end on masked) times its block scales, float32. `scales_ptr`: each
        column's row of scales [BLOCK_N]; input column k's scale is that row's entry k // GROUP. Each
        group's scales are read once, [BLOCK_K / GROUP, BLOCK_N], and broadcast over its rows (a
        scale gathered for every weight element cost more than the weight's own bytes)."""
        if BLOCK_K <= GROUP:  # (powers of two: the tile lies inside one group)
            s = tl.load(scales_ptr + k0 // GROUP, mask=n_ok, other=0.0)
            return w.to(tl.float32) * s[None, :]
        else:
            G: tl.constexpr = BLOCK_K // GROUP
            groups = k0 // GROUP + tl.arange(0, G)
            s = tl.load(scales_ptr[None, :] + groups[:, None], mask=(groups * GROUP < k_end)[:, None] & n_ok[None, :],
                        other=0.0)
            w3 = tl.reshape(w.to(tl.float32), (G, GROUP, w.shape[1]))
            return tl.reshape(w3 * s[:, None, :], (BLOCK_K, w.shape[1]))

    @triton.jit
    def _fp8_linear_kernel(X, XS, W, S, B, Out, M, N, K, sx, sxs, sw, ss, so, GROUP: tl.constexpr,
                           SCALE_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, W16: tl.constexpr, SPLITS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        """X in FP8 [M, K] with scales XS [M, K / GROUP] (`quantize_activations`), BLOCK_K = GROUP;
        `W16`: X as it is, the weight widened (`widen`), any BLOCK_K. SPLITS > 1: program_id(2)'s
        share of the K steps, its float32 sum to Out [SPLITS, M, N] (row stride so)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        scale_rows = (offs_n // SCALE_ROWS).to(tl.int64) * ss  # each column's block row of scales
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        steps = tl.cdiv(K, BLOCK_K)
        share = tl.cdiv(steps, SPLITS)
        first = tl.program_id(2) * share
        for g in range(first, tl.minimum(first + share, steps)):
            k = g * BLOCK_K + offs_k
            k_ok = k < K
            a = tl.load(X + offs_m[:, None].to(tl.int64) * sx + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            wm = k_ok[:, None] & n_ok[None, :]
            w = tl.load(W + offs_n[None, :].to(tl.int64) * sw + k[:, None], mask=wm, other=0.0)  # [BLOCK_K, BLOCK_N]
            if W16:
                acc = tl.dot(a, widen(w, S + scale_rows, g * BLOCK_K, K, n_ok, BLOCK_K, GROUP).to(a.dtype), acc)
            else:
                a_scale = tl.load(XS + offs_m.to(tl.int64) * sxs + g, mask=m_ok, other=0.0)  # each row's, this group
                w_scale = tl.load(S + scale_rows + g, mask=n_ok, other=0.0)  # [BLOCK_N]
                acc += fp8_dot(a, w) * a_scale[:, None] * w_scale[None, :]
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        if HAS_BIAS:
            acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        rows = (tl.program_id(2) * M + offs_m).to(tl.int64)  # (SPLITS == 1: the output's rows)
        tl.store(Out + rows[:, None] * so + offs_n[None, :], acc.to(Out.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _dequantize_kernel(W, S, Out, rows, cols, b0, b1, sw_e, sw_r, sw_c, ss_e, ss_r, ss_c, so_e, so_r,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """Block (program_id(1), program_id(2)) of weight program_id(0), b0 x b1 (BLOCK_R x BLOCK_C
        its powers of two at least as large): FP8 times its scale, in Out's dtype."""
        e = tl.program_id(0).to(tl.int64)
        i, j = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_C)
        r = tl.program_id(1) * b0 + i
        c = tl.program_id(2) * b1 + j
        ok = ((i < b0) & (r < rows))[:, None] & ((j < b1) & (c < cols))[None, :]
        w = tl.load(W + e * sw_e + r[:, None].to(tl.int64) * sw_r + c[None, :].to(tl.int64) * sw_c, mask=ok,
                    other=0.0)
        scale = tl.load(S + e * ss_e + tl.program_id(1) * ss_r + tl.program_id(2) * ss_c)
        tl.store(Out + e * so_e + r[:, None].to(tl.int64) * so_r + c[None, :], (w.to(tl.float32) * scale).to(
            Out.dtype.element_ty), mask=ok)

    @triton.jit
    def _sum_splits_kernel(P, B, Out, M, N, so, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                           PDL: tl.constexpr):
        """Out[m] = sum over s in order of P[s, m] (float32 [SPLITS, M, N]) + bias."""
        if PDL:
            tl.extra.cuda.gdc_wait()
        m = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            acc += tl.load(P + (s * M + m) * N + offs, mask=ok, other=0.0)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        if HAS_BIAS:
            acc += tl.load(B + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(Out + m * so + offs, acc.to(Out.dtype.element_ty), mask=ok)
