"""The experts of a step of one or a few rows as matrix-vector products on the CUDA cores.

`moe_triton.moe_grouped`'s per-pair mode runs one group per (row, k) pair; its tensor-core tiles pad
that one row to 16. Here each program instead holds BLOCK_N weight rows of one pair's expert and
walks K in BLOCK_K steps, adding the products into a [BLOCK_N, BLOCK_K] float32 tile that is summed
once at the end (no shared memory, no padded rows): at one row the step reads the used experts'
weights and little else. FP8 weights (`SCALED`) are multiplied in float32 with their block scales,
the rows unquantised: the weight-only arithmetic of `fp8_gemm`'s w16 and gemv modes, without
rounding the widened weight.

  up:   act[p] = silu(W13[e, :I] @ x[row]) * (W13[e, I:] @ x[row])
  down: y[p]   = w_p * (W2[e] @ act[p])                  (0 for a pair of weight 0; another rank's
                                                         expert: unwritten, as in `moe_grouped`)
"""

from __future__ import annotations

import torch

from epinfer.kernels import pdl

try:  # Triton is optional: CPU installs don't have it
    import triton
    import triton.language as tl

    from epinfer.kernels.small_gemm import row_times_rows
except ImportError:  # pragma: no cover
    triton = None


def pair_experts(x_TD: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights_TK: torch.Tensor,
                 ids_TK: torch.Tensor, first: int, act: torch.Tensor, y: torch.Tensor, cfg: dict,
                 fp8: tuple | None) -> None:
    """Writes act [T * K, I] and y [T * K, D] (rows in (row, k) order) for `moe_grouped`; cfg's
    "up" / "down": (BLOCK_N, BLOCK_K, num_stages, num_warps); `fp8`: (w13 scales, w2 scales, block)."""
    T, D = x_TD.shape
    K = ids_TK.shape[1]
    n, two_i, _ = w13.shape
    inter = two_i // 2
    s13, s2, block = fp8 if fp8 is not None else (w13, w2, (1, 16))  # (scales unread unless SCALED)
    common = dict(K=K, SCALED=fp8 is not None, SCALE_ROWS=block[0], GROUP=block[1], **pdl.kwargs(x_TD.device))
    bn, bk, stages, warps = cfg["up"]
    _pair_up[(T * K, triton.cdiv(inter, bn))](
        x_TD, w13, s13, ids_TK, weights_TK, act, first, n, ids_TK.stride(0), weights_TK.stride(0), x_TD.stride(0),
        w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1), act.stride(0), D=D, INTER=inter, BLOCK_N=bn,
        BLOCK_K=bk, num_stages=stages, num_warps=warps, **common)
    bn, bk, stages, warps = cfg["down"]
    _pair_down[(T * K, triton.cdiv(D, bn))](
        act, w2, s2, ids_TK, weights_TK, y, first, n, ids_TK.stride(0), weights_TK.stride(0), act.stride(0),
        w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1), y.stride(0), D=D, INTER=inter, BLOCK_N=bn,
        BLOCK_K=bk, num_stages=stages, num_warps=warps, **common)


if triton is not None:

    @triton.jit
    def _pair(IDS, WTS, first, n_local, si_t, sw_t, K: tl.constexpr):
        """(local expert, weight, whether it runs here) of pair program_id(0)."""
        g = tl.program_id(0)
        e = tl.load(IDS + (g // K) * si_t + g % K).to(tl.int32) - first
        local = (e >= 0) & (e < n_local)
        return tl.where(local, e, 0), tl.load(WTS + (g // K) * sw_t + g % K), local

    @triton.jit
    def _pair_up(X, W13, S13, IDS, WTS, ACT, first, n_local, si_t, sw_t, sx_t, sw_e, sw_n, ss_e, ss_r, sa_p,
                 D: tl.constexpr, INTER: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SCALED: tl.constexpr, SCALE_ROWS: tl.constexpr, GROUP: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_wait()
        g = tl.program_id(0)
        e, wt, local = _pair(IDS, WTS, first, n_local, si_t, sw_t, K)
        run = local & (wt != 0)  # a padding row's pair (weight 0) reads no weights
        hi = tl.where(run, D, 0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < INTER
        x = X + (g // K).to(tl.int64) * sx_t
        w = W13 + e.to(tl.int64) * sw_e
        s = S13 + e.to(tl.int64) * ss_e
        gate = row_times_rows(x, w, s + (offs_n // SCALE_ROWS) * ss_r, offs_n, n_ok, sw_n, hi, BLOCK_K, SCALED, GROUP)
        up = row_times_rows(x, w + INTER * sw_n, s + ((INTER + offs_n) // SCALE_ROWS) * ss_r, offs_n, n_ok, sw_n, hi,
                            BLOCK_K, SCALED, GROUP)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        act = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(ACT + g.to(tl.int64) * sa_p + offs_n, act.to(ACT.dtype.element_ty), mask=n_ok & run)

    @triton.jit
    def _pair_down(ACT, W2, S2, IDS, WTS, Y, first, n_local, si_t, sw_t, sa_p, sw_e, sw_n, ss_e, ss_r, sy_p,
                   D: tl.constexpr, INTER: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SCALED: tl.constexpr, SCALE_ROWS: tl.constexpr, GROUP: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_wait()
        g = tl.program_id(0)
        e, wt, local = _pair(IDS, WTS, first, n_local, si_t, sw_t, K)
        hi = tl.where(local & (wt != 0), INTER, 0)  # weight 0: no weights read, a row of zeros written
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < D
        y = row_times_rows(ACT + g.to(tl.int64) * sa_p, W2 + e.to(tl.int64) * sw_e,
                           S2 + e.to(tl.int64) * ss_e + (offs_n // SCALE_ROWS) * ss_r, offs_n, n_ok, sw_n, hi,
                           BLOCK_K, SCALED, GROUP)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        tl.store(Y + g.to(tl.int64) * sy_p + offs_n, y * wt.to(tl.float32), mask=n_ok & local)
