"""The residual add + RMS norm as one Triton kernel (bf16 / fp16 on CUDA), one program per row: for
the MoE experts' unsummed per-pair outputs [T, K, D] (float32, summed here) at every size, and at
decode sizes for a plain residual too, so the whole layer can be a chain of programmatically
dependent launches (`pdl.py`; inductor's kernels are launched without PDL). Rounds where
`norm.add_rms_norm` rounds.

The GDN layer's gated RMS norm too (`gated_rms_norm`, every size): inductor's kernel for it, tuned at
the size it first saw, took 4.9 µs a layer at batch 1 in two runs and 1.8 µs in a third (H200).
"""

from __future__ import annotations

import torch

from epinfer.kernels import pdl

try:  # Triton is optional: CPU installs don't have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

MAX_ROWS = 8
MAX_DIM = 16384  # one program holds a row


def usable(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> bool:
    """Low precision; the residual in x's dtype at decode sizes (a PDL chain link), or the experts'
    [T, K, D] in float32 at any size (other dtypes would promote in the reference); a weight in x's
    dtype. The [T, K, D] case always comes here: inductor's dynamic-shape kernel for the sum over K,
    tuned at the size it first saw, took 41 µs a layer at 64 rows in one run and 5 µs in another (H200)."""
    dtype_ok = residual.dtype == x.dtype if residual.dim() == 2 else residual.dtype in (torch.float32, x.dtype)
    rows_ok = x.shape[0] > 0 and (residual.dim() == 3 or x.shape[0] <= MAX_ROWS)
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.dim() == 2
            and rows_ok and x.shape[1] <= MAX_DIM and x.is_contiguous()
            and residual.is_contiguous() and residual.shape[0] == x.shape[0] and residual.shape[-1] == x.shape[1]
            and dtype_ok and weight.dtype == x.dtype)


def add_rms_norm(x_TD: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 zero_centered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, its RMS norm); residual [T, D] in x's dtype or [T, K, D] summed over K."""
    T, D = x_TD.shape
    K = residual.shape[1] if residual.dim() == 3 else 1
    new_x = torch.empty_like(x_TD)
    out = torch.empty_like(x_TD)
    _add_rms_norm_kernel[(T,)](x_TD, residual, weight, new_x, out, eps, D=D, K=K, BLOCK_D=triton.next_power_of_2(D),
                               ZC=zero_centered, num_warps=4, **pdl.kwargs(x_TD.device))
    return new_x, out


def gated_usable(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor) -> bool:
    """x [T, H, D] or [T, D] contiguous, gate of its shape with unit inner stride (a view of the
    stacked projection), all in one low-precision dtype."""
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.dim() in (2, 3)
            and x.is_contiguous() and gate.shape == x.shape and gate.stride(-1) == 1 and gate.dtype == x.dtype
            and weight.dtype == x.dtype and weight.shape == x.shape[-1:] and x.shape[-1] <= MAX_DIM)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`norm.gated_rms_norm`: weight * rms_norm(x) (rounded to x's dtype), times silu(gate)."""
    D = x.shape[-1]
    H = x.shape[1] if x.dim() == 3 else 1
    rows = x.numel() // D
    out = torch.empty_like(x)
    g_t, g_h = gate.stride(0), (gate.stride(1) if x.dim() == 3 else 0)
    per = 4 if rows > 1024 else 1
    if rows:
        _gated_rms_norm_kernel[(triton.cdiv(rows, per),)](
            x, gate, weight, out, rows, H, g_t, g_h, eps, D=D, BLOCK_D=triton.next_power_of_2(D), ROWS=per,
            num_warps=1 if D <= 256 else 4, **pdl.kwargs(x.device))
    return out


if triton is not None:

    @triton.jit
    def _gated_rms_norm_kernel(X, G, W, OUT, N, H, sg_t, sg_h, eps, D: tl.constexpr, BLOCK_D: tl.constexpr,
                               ROWS: tl.constexpr, PDL: tl.constexpr):
        """ROWS rows (t, h) of D per program; x and out contiguous, the gate row-strided."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        offs = tl.arange(0, BLOCK_D)
        ok = (rows < N)[:, None] & (offs < D)[None, :]
        x = tl.load(X + rows[:, None] * D + offs[None, :], mask=ok, other=0.0).to(tl.float32)
        normed = x * tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
        w = tl.load(W + offs, mask=offs < D, other=0.0).to(tl.float32)
        out = (w[None, :] * normed.to(X.dtype.element_ty).to(tl.float32)).to(X.dtype.element_ty)
        g_off = (rows // H) * sg_t + (rows % H) * sg_h
        g = tl.load(G + g_off[:, None] + offs[None, :], mask=ok, other=0.0).to(tl.float32)
        y = out.to(tl.float32) * (g * tl.sigmoid(g))
        tl.store(OUT + rows[:, None] * D + offs[None, :], y.to(OUT.dtype.element_ty), mask=ok)

    @triton.jit
    def weighted(normed, w, DTYPE: tl.constexpr, ZC: tl.constexpr):
        """`norm.rms_norm`'s weight step on fp32 normed values: (1 + w) * x̂, or w * x̂ with x̂ rounded
        to DTYPE first, as the reference rounds it (fp32 result, not rounded)."""
        if ZC:
            return normed * (1.0 + w)
        return normed.to(DTYPE).to(tl.float32) * w

    @triton.jit
    def _add_rms_norm_kernel(X, R, W, NEW_X, OUT, eps, D: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr,
                             ZC: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        t = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        ok = offs < D
        r = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):  # the experts' sum over k, in order, then rounded as theirs is
            r += tl.load(R + (t * K + k) * D + offs, mask=ok, other=0.0).to(tl.float32)
        r = r.to(X.dtype.element_ty).to(tl.float32)
        x = (tl.load(X + t * D + offs, mask=ok, other=0.0).to(tl.float32) + r).to(X.dtype.element_ty)
        tl.store(NEW_X + t * D + offs, x, mask=ok)
        x32 = x.to(tl.float32)
        normed = x32 * tl.rsqrt(tl.sum(x32 * x32, 0) / D + eps)
        w = tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
        y = weighted(normed, w, X.dtype.element_ty, ZC)
        tl.store(OUT + t * D + offs, y.to(OUT.dtype.element_ty), mask=ok)
