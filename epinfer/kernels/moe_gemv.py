"""The experts of a step of one or a few rows as matrix-vector products on the CUDA cores.

`moe_triton.moe_grouped`'s per-pair mode runs one group per (row, k) pair; its tensor-core tiles pad
that one row to 16. Here each program instead holds BLOCK_N weight rows of one pair's expert and
walks K in BLOCK_K steps on the CUDA cores (`small_gemm.row_times_rows`: no shared memory, no padded
rows): at one row the step reads the used experts' weights and little else. FP8 weights (`SCALED`)
are multiplied in float32 with their block scales, the rows unquantised: the weight-only arithmetic
of `fp8_gemm`'s w16 and gemv modes, without rounding the widened weight.

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

    from epinfer.kernels.small_gemm import row_times_rows, whole_dot, whole_rows
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
    # the down kernel's weights do not depend on the up kernel: loaded whole before its wait where they fit
    # (`pdl.whole`), the up kernel then letting it start from its own start
    whole = pdl.whole(x_TD.device, cfg["down"][0], inter, w2.element_size(), block[1] if fp8 is not None else 1)
    for up, rows, w, s, out, N, depth in ((True, x_TD, w13, s13, act, inter, D), (False, act, w2, s2, y, D, inter)):
        bn, bk, stages, warps = cfg["up" if up else "down"]
        _pair_gemv[(T * K, triton.cdiv(N, bn))](
            rows, w, s, ids_TK, weights_TK, out, first, n, ids_TK.stride(0), weights_TK.stride(0), rows.stride(0),
            w.stride(0), w.stride(1), s.stride(0), s.stride(1), out.stride(0), N=N, DEPTH=depth, BLOCK_N=bn,
            BLOCK_K=bk, UP=up, WHOLE=whole, num_stages=stages, num_warps=max(warps, 4) if whole and not up else warps,
            **common)


if triton is not None:

    @triton.jit
    def _pair(IDS, WTS, first, n_local, si_t, sw_t, K: tl.constexpr):
        """(local expert, weight, whether it runs here) of pair program_id(0)."""
        g = tl.program_id(0)
        e = tl.load(IDS + (g // K) * si_t + g % K).to(tl.int32) - first
        local = (e >= 0) & (e < n_local)
        return tl.where(local, e, 0), tl.load(WTS + (g // K) * sw_t + g % K), local

    @triton.jit
    def _pair_gemv(IN, W, S, IDS, WTS, OUT, first, n_local, si_t, sw_t, s_in, sw_e, sw_n, ss_e, ss_r, s_out,
                   N: tl.constexpr, DEPTH: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   UP: tl.constexpr, SCALED: tl.constexpr, SCALE_ROWS: tl.constexpr, GROUP: tl.constexpr,
                   WHOLE: tl.constexpr, PDL: tl.constexpr):
        """Pair program_id(0), output columns program_id(1) * BLOCK_N on (N of them, each a dot over
        DEPTH inputs). UP: the pair's row of x [T, D] in, act out (W13's gate rows, then its up rows
        N further); else its row of act in, y out. A pair of weight 0 reads no weights (its y is 0);
        another rank's pair writes nothing. WHOLE > 0 (a power of two >= DEPTH): the down kernel loads
        its weight rows whole before its PDL wait (the pair's expert was routed two kernels before:
        complete once the up kernel passed its own wait); both kernels let the next one start as soon
        as they passed their wait, so the weights' reads overlap."""
        if PDL and (UP or not WHOLE):
            tl.extra.cuda.gdc_wait()
        if PDL and UP and WHOLE:
            tl.extra.cuda.gdc_launch_dependents()
        g = tl.program_id(0)
        e, wt, local = _pair(IDS, WTS, first, n_local, si_t, sw_t, K)
        hi = tl.where(local & (wt != 0), DEPTH, 0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        row = IN + (g // K if UP else g).to(tl.int64) * s_in
        w = W + e.to(tl.int64) * sw_e
        s = S + e.to(tl.int64) * ss_e
        if WHOLE and not UP:
            w_tile, sc = whole_rows(w, s + (offs_n // SCALE_ROWS) * ss_r, offs_n, n_ok & (hi > 0), sw_n, DEPTH, WHOLE,
                                    SCALED, GROUP)
            if PDL:
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()  # (the next layer's projections preload too)
            out = whole_dot(row, w_tile, sc, hi, WHOLE, SCALED, GROUP)  # (hi 0: act unwritten, not read)
        else:
            out = row_times_rows(row, w, s + (offs_n // SCALE_ROWS) * ss_r, offs_n, n_ok, sw_n, hi, BLOCK_K, SCALED,
                                 GROUP)
        if UP:
            up = row_times_rows(row, w + N * sw_n, s + ((N + offs_n) // SCALE_ROWS) * ss_r, offs_n, n_ok, sw_n, hi,
                                BLOCK_K, SCALED, GROUP)
        if PDL and not WHOLE:
            tl.extra.cuda.gdc_launch_dependents()
        if UP:
            tl.store(OUT + g.to(tl.int64) * s_out + offs_n, (out / (1.0 + tl.exp(-out)) * up).to(OUT.dtype.element_ty),
                     mask=n_ok & (hi > 0))
        else:
            tl.store(OUT + g.to(tl.int64) * s_out + offs_n, (out * wt.to(tl.float32)).to(OUT.dtype.element_ty),
                     mask=n_ok & local)
