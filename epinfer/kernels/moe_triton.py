"""MoE experts and router in Triton (bf16 / fp16 on CUDA), for decode-sized batches.

`moe_grouped`: one program per (group, output tile) walks its group's pairs in blocks of BLOCK_M
rows. A group is one used expert's pairs (sorted by expert, `permute_pairs`; the grid has one slot
per used expert at most) or, for a few rows, a single pair (no permutation kernel at all). The up
kernel gathers the rows by index, so there is no gathered copy of x, and applies silu(gate) * up in
registers; the down kernel scales by the routing weight and writes each pair's output in (row, k)
order, so the combine is one sum over k — which the next residual add can do (`reduce=False`).
An expert with no pairs reads none of its weights, nor (one group per pair) does a pair of weight 0
(a padding row's): at decode sizes (one to a few dozen pairs per expert) the step is bound by
reading the used experts' weights once, and the tile sizes are chosen for that
(`benchmarks/moe_kernel_sweep.py`). On H200 this beats cuBLAS's grouped GEMM (which needs the
gathered copy and pads every group) from 1 to 512 rows.

  up:   act[j]  = silu(W13[e, :I] @ x[row_j]) * (W13[e, I:] @ x[row_j])      (fp32 accumulate)
  down: y[p_j]  = w_p * (W2[e] @ act[j])                                     (fp32)
  out[t]        = sum_k y[t*K + k]

Pairs routed to another rank's expert (expert parallelism) produce zeros.

`route`: softmax, top-k, renormalisation and the padding mask in one kernel; `gate_route`: the
router's GEMV too, for a few rows (at batch 1 cuBLAS's GEMV + the route kernel took 8.4 µs a layer
for half a megabyte of weights).
"""

from __future__ import annotations

import torch

from epinfer.core.env import SWITCHES
from epinfer.kernels import moe_configs, moe_gemv, pdl
from epinfer.kernels.moe_configs import grouped_config

try:  # Triton is optional: CPU installs don't have it
    import triton
    import triton.language as tl

    from epinfer.kernels.fp8_gemm import fp8_dot, quantize_activations, widen
    from epinfer.kernels.small_gemm import rows_times_columns
except ImportError:  # pragma: no cover
    triton = None


def usable(x: torch.Tensor) -> bool:
    """The Triton kernels run here (bf16 / fp16 on CUDA, with Triton; rows of unit inner stride: the
    kernels take a row stride only)."""
    return triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.stride(-1) == 1


def _usable(x: torch.Tensor) -> bool:
    return GROUPED and usable(x)


def grouped_usable(x: torch.Tensor, pairs: int, num_local: int) -> bool:
    """moe_grouped up to EPINFER_MOE_TRITON_MAX pairs per expert on average (96); beyond, cuBLAS's
    grouped GEMM."""
    return _usable(x) and pairs <= SWITCHES.moe_triton_max * num_local


def router_usable(logits: torch.Tensor) -> bool:
    return _usable(logits) and logits.shape[1] <= 1024


def gate_route_usable(x_TD: torch.Tensor, gate_ED: torch.Tensor) -> bool:
    """Whether `gate_route` (router GEMV + top-k in one kernel) takes this batch: a few rows (the
    last program selects for all rows at once, in registers)."""
    return (_usable(x_TD) and 0 < x_TD.shape[0] * triton.next_power_of_2(gate_ED.shape[0]) <= GATE_ROUTE_ELEMENTS
            and x_TD.stride(1) == 1 and gate_ED.stride(1) == 1 and gate_ED.dtype == x_TD.dtype)


# rows x experts (power of 2) the fused router's last program selects over: at 64 x 128 its serial
# selection took 347 µs a layer on H200 (2026-11-29); up to 8 rows of 128 experts it beats cuBLAS + `route`
GATE_ROUTE_ELEMENTS = 1024

GROUPED = SWITCHES.moe_triton  # EPINFER_MOE_TRITON=0: cuBLAS grouped GEMM (A/B)


def route(logits_TE: torch.Tensor, top_k: int, renormalize: bool, row_mask_T: torch.Tensor | None, real: int,
          dtype: torch.dtype, out: tuple[torch.Tensor, torch.Tensor] | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The router in one kernel: softmax (fp32), top-k (descending; the lowest index among ties),
    optional renormalisation, weight 0 for padding rows (`row_mask_T` False, or index >= `real`
    when there is no mask); a row with a NaN logit gets NaN weights (and valid ids). Returns
    (weights_TK in `dtype`, ids_TK int64), or writes them into `out` (see `_outputs`)."""
    T, E = logits_TE.shape
    weights, ids = _outputs(out, T, top_k, dtype, logits_TE.device)
    if T:
        mask = row_mask_T if row_mask_T is not None else ids  # (unused without HAS_MASK)
        _route_kernel[(triton.cdiv(T, 2),)](logits_TE, weights, ids, mask, T, real, logits_TE.stride(0),
                                            weights.stride(0), ids.stride(0), E=E,
                                            BLOCK_E=triton.next_power_of_2(E), K=top_k,
                                            KP=triton.next_power_of_2(top_k), RENORM=renormalize,
                                            HAS_MASK=row_mask_T is not None, num_warps=4 if E > 256 else 2)
    return weights, ids


def gate_route(x_TD: torch.Tensor, gate_ED: torch.Tensor, top_k: int, renormalize: bool,
               row_mask_T: torch.Tensor | None, real: int,
               out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`route(x @ gate.T, ...)` in one kernel, for a few rows: program (c, s) computes the partial
    logits of 16 experts over one slice of D; the last program to finish (an atomic counter, reset
    by that program) sums the slices in order (deterministic), rounds to x's dtype as the linear
    layer's output is, and selects the top-k of every row. Calls on one device must not run
    concurrently (the model runs on one stream)."""
    T, D = x_TD.shape
    E = gate_ED.shape[0]
    splits = max(1, min(8, D // 256))
    partial = torch.empty(splits, T, E, dtype=torch.float32, device=x_TD.device)
    weights, ids = _outputs(out, T, top_k, x_TD.dtype, x_TD.device)
    if x_TD.device not in _COUNTERS:
        _COUNTERS[x_TD.device] = torch.zeros(1, dtype=torch.int32, device=x_TD.device)
    mask = row_mask_T if row_mask_T is not None else ids
    chunks = triton.cdiv(E, 16)
    _gate_route_kernel[(chunks, splits)](
        x_TD, gate_ED, partial, weights, ids, mask, _COUNTERS[x_TD.device], T, real, x_TD.stride(0), gate_ED.stride(0),
        weights.stride(0), ids.stride(0), D=D, E=E, BLOCK_T=max(16, triton.next_power_of_2(T)),
        BLOCK_R=triton.next_power_of_2(T), BLOCK_E=triton.next_power_of_2(E), BE=16, SPLITS=splits,
        BK=min(512, triton.next_power_of_2(triton.cdiv(D, splits))), K=top_k, KP=triton.next_power_of_2(top_k),
        RENORM=renormalize, HAS_MASK=row_mask_T is not None, NPROG=chunks * splits, num_warps=2,
        **pdl.kwargs(x_TD.device))
    return weights, ids


def _outputs(out, T: int, top_k: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's (weights [T, K], ids [T, K]): fresh (dtype, int64), or `out` — row-strided views
    (weights in `dtype`, ids int32 or int64) a dispatcher packs its rows in, so routing is packing."""
    if out is None:
        return (torch.empty(T, top_k, dtype=dtype, device=device),
                torch.empty(T, top_k, dtype=torch.int64, device=device))
    weights, ids = out
    if (weights.shape != (T, top_k) or ids.shape != (T, top_k) or weights.dtype != dtype or weights.stride(1) != 1
            or ids.stride(1) != 1 or ids.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"router outputs: want [{T}, {top_k}] {dtype} / int ids with unit inner stride, "
                         f"got {weights.dtype} {tuple(weights.shape)} / {ids.dtype} {tuple(ids.shape)}")
    return weights, ids


_COUNTERS: dict = {}  # per device: programs of the running gate_route that have finished (0 between calls)


def combine(y_PD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor, order: torch.Tensor, first: int,
            n: int) -> torch.Tensor:
    """`moe.combine_pairs` in one kernel: out[t] = sum_k w[t, k] * y[position of pair (t, k) in
    `order`], pairs of other ranks' experts skipped (their rows of y are undefined). Each program
    reads whole rows of y (coalesced) and accumulates in fp32. The kernel reads the weights as one
    flat [T * K] run: a dispatcher's row view of them is copied (`reshape` would keep a one-column
    view, K == 1, strided)."""
    T, K = ids_TK.shape
    D = y_PD.shape[1]
    inverse = inverse_permutation(order)
    out = torch.empty(T, D, dtype=y_PD.dtype, device=y_PD.device)
    ids_TK = ids_TK if ids_TK.stride(1) == 1 else ids_TK.contiguous()
    if T:
        _combine_kernel[(T, triton.cdiv(D, 1024))](y_PD, weights_TK.contiguous().view(-1), ids_TK, inverse, out,
                                                   y_PD.stride(0),
                                                   ids_TK.stride(0), out.stride(0), first, n, GATHER=True,
                                                   ALL_LOCAL=False, D=D, K=K, BLOCK_D=1024, PDL=False)
    return out


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """inverse[p] = the position of pair p in `order`."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))


def moe_grouped(x_TD: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights_TK: torch.Tensor,
                ids_TK: torch.Tensor, first: int, all_local: bool, plan: tuple | None, cfg: dict | None = None,
                reduce: bool = True, fp8: tuple | None = None) -> torch.Tensor:
    """The experts of this rank's pairs. `plan`: `permute_pairs`'s (order, offs, rows, active) —
    one group per used expert — or None: one group per pair, in (row, k) order. Pairs of other
    ranks' experts (only when not `all_local`) get 0. Returns out [T, D], or with `reduce=False`
    the weighted per-pair outputs [T, K, D] in float32. x, weights and ids may be row-strided views
    (a dispatcher's packed buffer: no copies); ids int32 or int64. `fp8`: (w13 scales, w2 scales,
    block) of FP8 expert weights: each kernel's K steps are the block's columns, and the rows it
    reads (x, then the activations) are quantised per row and step, as `fp8_gemm` does."""
    T, D = x_TD.shape
    K = weights_TK.shape[1]
    n, two_i, _ = w13.shape
    inter = two_i // 2
    P = T * K
    cfg = cfg or grouped_config(P, n, fp8 is not None)
    # the CUDA-core form runs one group per pair, weight-only: otherwise the per-pair tensor-core tiles
    if cfg.get("gemv") and (plan is not None or (fp8 is not None and SWITCHES.fp8_w16_tokens < T)):
        cfg = moe_configs.PER_PAIR
    weights_TK, ids_TK = (t if t.stride(1) == 1 else t.contiguous() for t in (weights_TK, ids_TK))
    if plan is None:
        order, offs, group_e, groups, shift = ids_TK, ids_TK, ids_TK, P, first  # (order, offs unused)
    else:
        order, offs, _, group_e = plan
        groups, shift = group_e.shape[0], 0
    bm = cfg["BLOCK_M"]
    s13, s2, block = fp8 if fp8 is not None else (w13, w2, (1, 16))  # (scales unread without FP8)
    # FP8 at decode tiles of steps of few tokens (`SWITCHES.fp8_w16_tokens`): weights widened in
    # registers, the bf16 tiles (`fp8_gemm`'s w16 mode); else the rows quantised once, per row and
    # group of block[1] columns (each kernel's K step)
    w16 = fp8 is not None and bm <= 32 and SWITCHES.fp8_w16_tokens >= T
    quant = {"FP8": fp8 is not None and not w16, "W16": w16, "SCALE_ROWS": block[0], "GROUP": block[1]}
    # FP8 with "tile_scale" in the config: a column tile inside one block row of weight scales takes
    # that block's one scale a K step, folded into the rows' scales (one multiply-add an element
    # instead of two); a tile of BLOCK_N columns is inside one when BLOCK_N divides the block's rows
    # and the tile starts at a multiple of BLOCK_N (the up kernel's up half at INTER + its columns)
    tile_scale = quant["FP8"] and bool(cfg.get("tile_scale"))
    act = torch.empty(P, inter, dtype=x_TD.dtype, device=x_TD.device)
    # other ranks' pairs stay unwritten: the sum below skips them; unsummed, they must read 0
    y_dtype = x_TD.dtype if reduce and cfg.get("y16") else torch.float32
    y = (torch.empty if all_local or reduce else torch.zeros)(P, D, dtype=y_dtype, device=x_TD.device)
    if plan is None and cfg.get("gemv"):  # one row a pair on the CUDA cores
        moe_gemv.pair_experts(x_TD, w13, w2, weights_TK, ids_TK, first, act, y, cfg, fp8)
    else:
        _up_down(x_TD, w13, w2, weights_TK, ids_TK, order, offs, group_e, groups, shift, act, y, plan is None, cfg,
                 quant, tile_scale, s13, s2, block)
    if not reduce:
        return y.view(T, K, D)
    out = torch.empty(T, D, dtype=x_TD.dtype, device=x_TD.device)
    if T:
        _combine_kernel[(T, triton.cdiv(D, 1024))](y, y, ids_TK, y, out, y.stride(0), ids_TK.stride(0), out.stride(0),
                                                   first, n, GATHER=False, ALL_LOCAL=all_local, D=D, K=K,
                                                   BLOCK_D=1024, **pdl.kwargs(x_TD.device))
    return out


def _up_down(x_TD, w13, w2, weights_TK, ids_TK, order, offs, group_e, groups, shift, act, y, per_pair, cfg, quant,
             tile_scale, s13, s2, block) -> None:
    """`moe_grouped`'s tensor-core kernels: act, then y."""
    T, D = x_TD.shape
    n, two_i, _ = w13.shape
    inter, K, bm = two_i // 2, ids_TK.shape[1], cfg["BLOCK_M"]
    x_in, x_s = quantize_activations(x_TD, block[1]) if quant["FP8"] else (x_TD, x_TD)
    bn, bk, stages, warps = cfg["up"]
    bk = block[1] if quant["FP8"] else bk
    _grouped_up[(groups, triton.cdiv(inter, bn))](
        x_in, x_s, w13, order, offs, group_e, weights_TK, act, shift, n, ids_TK.stride(0), weights_TK.stride(0),
        x_in.stride(0), x_s.stride(0), w13.stride(0), w13.stride(1), act.stride(0), s13, s13.stride(0),
        s13.stride(1), D=D, INTER=inter, K=K, PER_PAIR=per_pair, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        TILE_SCALE=tile_scale and block[0] % bn == 0 and inter % bn == 0,
        num_stages=stages, num_warps=warps, **quant, **pdl.kwargs(x_TD.device))
    act_in, act_s = quantize_activations(act, block[1]) if quant["FP8"] else (act, act)
    bn, bk, stages, warps = cfg["down"]
    bk = block[1] if quant["FP8"] else bk
    _grouped_down[(groups, triton.cdiv(D, bn))](
        act_in, act_s, w2, order, offs, group_e, weights_TK, y, shift, n, ids_TK.stride(0), weights_TK.stride(0),
        act_in.stride(0), act_s.stride(0), w2.stride(0), w2.stride(1), y.stride(0), s2, s2.stride(0), s2.stride(1),
        D=D, INTER=inter, K=K, PER_PAIR=per_pair, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        TILE_SCALE=tile_scale and block[0] % bn == 0, num_stages=stages, num_warps=warps, **quant,
        **pdl.kwargs(x_TD.device))


if triton is not None:

    @triton.jit
    def _group(OFFS, GROUP_E, shift, n_local, si_t, K: tl.constexpr, PER_PAIR: tl.constexpr):
        """(expert, first sorted pair, end) of group program_id(0); an empty range for a group
        without a local expert (another rank's, or an unused slot). Per pair, GROUP_E is the ids
        [T, K] with row stride si_t."""
        g = tl.program_id(0)
        if PER_PAIR:
            e = tl.load(GROUP_E + (g // K) * si_t + g % K).to(tl.int32) - shift
        else:
            e = tl.load(GROUP_E + g).to(tl.int32) - shift
        ok = (e >= 0) & (e < n_local)
        e = tl.where(ok, e, 0)
        if PER_PAIR:
            start = g
            end = g + 1
        else:
            start = tl.where(e > 0, tl.load(OFFS + e - 1, mask=e > 0, other=0), 0)
            end = tl.load(OFFS + e)
        return e, start, tl.where(ok, end, start)

    @triton.jit
    def _pair_weight(WTS, sw_t, K: tl.constexpr):
        """Routing weight of pair program_id(0) (one group per pair)."""
        g = tl.program_id(0)
        return tl.load(WTS + (g // K) * sw_t + g % K)

    @triton.jit
    def _grouped_up(X, XS, W13, ORDER, OFFS, GROUP_E, WTS, ACT, shift, n_local, si_t, sw_t, sx_t, sxs_t, sw_e, sw_n,
                    sa_p, S13, ss_e, ss_r, D: tl.constexpr, INTER: tl.constexpr, K: tl.constexpr,
                    PER_PAIR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    TILE_SCALE: tl.constexpr, PDL: tl.constexpr, FP8: tl.constexpr, W16: tl.constexpr,
                    SCALE_ROWS: tl.constexpr, GROUP: tl.constexpr):
        """act[j] = silu(x[row] @ W13[e, :I].T) * (x[row] @ W13[e, I:].T) for the pairs j of group
        program_id(0) (expert e), on one tile of I. FP8: W13 float8 with block scales S13 [E, rows
        / SCALE_ROWS, D / GROUP], x in FP8 with a scale per row and GROUP = BLOCK_K columns (XS);
        W16: x as it is, W13 widened (`fp8_gemm.widen`)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
        e, start, end = _group(OFFS, GROUP_E, shift, n_local, si_t, K, PER_PAIR)
        if PER_PAIR:  # weight 0 (a padding row): no weights read, the down kernel writes its 0
            end = tl.where(_pair_weight(WTS, sw_t, K) == 0, start, end)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < INTER
        w_base = W13 + e.to(tl.int64) * sw_e + offs_n[None, :] * sw_n
        s_gate = S13 + e.to(tl.int64) * ss_e + (offs_n // SCALE_ROWS) * ss_r  # FP8: each column's scale row
        s_up = S13 + e.to(tl.int64) * ss_e + ((INTER + offs_n) // SCALE_ROWS) * ss_r
        n0 = tl.program_id(1) * BLOCK_N  # TILE_SCALE: the tile's one block row of scales
        s_gate0 = S13 + e.to(tl.int64) * ss_e + (n0 // SCALE_ROWS) * ss_r
        s_up0 = S13 + e.to(tl.int64) * ss_e + ((INTER + n0) // SCALE_ROWS) * ss_r
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < end
            if PER_PAIR:
                rows = offs_m // K
            else:
                rows = tl.load(ORDER + offs_m, mask=m_ok, other=0) // K
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < D
                a = tl.load(X + rows[:, None] * sx_t + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                            other=0.0)
                wm = k_ok[:, None] & n_ok[None, :]
                wg = tl.load(w_base + offs_k[:, None], mask=wm, other=0.0)
                wu = tl.load(w_base + INTER * sw_n + offs_k[:, None], mask=wm, other=0.0)
                if FP8:
                    a_s = tl.load(XS + rows * sxs_t + k0 // BLOCK_K, mask=m_ok, other=0.0)
                    if TILE_SCALE:
                        acc_g += fp8_dot(a, wg) * (a_s * tl.load(s_gate0 + k0 // BLOCK_K))[:, None]
                        acc_u += fp8_dot(a, wu) * (a_s * tl.load(s_up0 + k0 // BLOCK_K))[:, None]
                    else:
                        sg = tl.load(s_gate + k0 // BLOCK_K, mask=n_ok, other=0.0)
                        su = tl.load(s_up + k0 // BLOCK_K, mask=n_ok, other=0.0)
                        acc_g += fp8_dot(a, wg) * a_s[:, None] * sg[None, :]
                        acc_u += fp8_dot(a, wu) * a_s[:, None] * su[None, :]
                elif W16:
                    acc_g = tl.dot(a, widen(wg, s_gate, k0, D, n_ok, BLOCK_K, GROUP).to(a.dtype), acc_g)
                    acc_u = tl.dot(a, widen(wu, s_up, k0, D, n_ok, BLOCK_K, GROUP).to(a.dtype), acc_u)
                else:
                    acc_g = tl.dot(a, wg, acc_g)
                    acc_u = tl.dot(a, wu, acc_u)
            if PDL:
                tl.extra.cuda.gdc_launch_dependents()
            act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
            tl.store(ACT + offs_m[:, None].to(tl.int64) * sa_p + offs_n[None, :], act.to(ACT.dtype.element_ty),
                     mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _grouped_down(ACT, AS, W2, ORDER, OFFS, GROUP_E, WTS, Y, shift, n_local, si_t, sw_t, sa_p, sas_p, sw_e, sw_n,
                      sy_p,
                      S2, ss_e, ss_r, D: tl.constexpr, INTER: tl.constexpr, K: tl.constexpr, PER_PAIR: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILE_SCALE: tl.constexpr,
                      PDL: tl.constexpr, FP8: tl.constexpr, W16: tl.constexpr, SCALE_ROWS: tl.constexpr,
                      GROUP: tl.constexpr):
        """y[pair] = w_pair * (act[j] @ W2[e].T) for the pairs j of group program_id(0), one tile of D
        (weights [T, K] with row stride sw_t). FP8: act in FP8 with a scale per row and BLOCK_K columns (AS)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
        e, start, end = _group(OFFS, GROUP_E, shift, n_local, si_t, K, PER_PAIR)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < D
        if PER_PAIR:  # a local pair of weight 0 (a padding row) reads no weights: its output is 0
            zero = (end > start) & (_pair_weight(WTS, sw_t, K) == 0)
            if zero:
                tl.store(Y + tl.program_id(0).to(tl.int64) * sy_p + offs_n, tl.zeros([BLOCK_N], dtype=tl.float32),
                         mask=n_ok)
            end = tl.where(zero, start, end)
        w_base = W2 + e.to(tl.int64) * sw_e + offs_n[None, :] * sw_n
        s_base = S2 + e.to(tl.int64) * ss_e + (offs_n // SCALE_ROWS) * ss_r
        s_tile = S2 + e.to(tl.int64) * ss_e + (tl.program_id(1) * BLOCK_N // SCALE_ROWS) * ss_r  # TILE_SCALE
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < end
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, INTER, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < INTER
                a = tl.load(ACT + offs_m[:, None].to(tl.int64) * sa_p + offs_k[None, :],
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                wm = k_ok[:, None] & n_ok[None, :]
                w = tl.load(w_base + offs_k[:, None], mask=wm, other=0.0)
                if FP8:
                    a_s = tl.load(AS + offs_m.to(tl.int64) * sas_p + k0 // BLOCK_K, mask=m_ok, other=0.0)
                    if TILE_SCALE:
                        acc += fp8_dot(a, w) * (a_s * tl.load(s_tile + k0 // BLOCK_K))[:, None]
                    else:
                        sw = tl.load(s_base + k0 // BLOCK_K, mask=n_ok, other=0.0)
                        acc += fp8_dot(a, w) * a_s[:, None] * sw[None, :]
                elif W16:
                    acc = tl.dot(a, widen(w, s_base, k0, INTER, n_ok, BLOCK_K, GROUP).to(a.dtype), acc)
                else:
                    acc = tl.dot(a, w, acc)
            if PDL:
                tl.extra.cuda.gdc_launch_dependents()
            if PER_PAIR:
                pairs = offs_m
            else:
                pairs = tl.load(ORDER + offs_m, mask=m_ok, other=0)
            wt = tl.load(WTS + (pairs // K) * sw_t + pairs % K, mask=m_ok, other=0.0).to(tl.float32)
            tl.store(Y + pairs[:, None].to(tl.int64) * sy_p + offs_n[None, :], acc * wt[:, None],
                     mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _select(logit, offs_e, E: tl.constexpr, BLOCK_E: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                RENORM: tl.constexpr):
        """Rows of logits [R, BLOCK_E] (-inf past E) -> (weights [R, KP], ids [R, KP]): softmax,
        top-k (lowest index among ties), renormalisation; a row with a NaN gets NaN weights.
        Each step is one max over keys packing (probability bits, reversed index): probabilities
        are >= 0, so their bits order as the values do (slots past E hold -1: below them all)."""
        ex = tl.exp(logit - tl.max(logit, 1)[:, None])
        total = tl.sum(ex, 1)
        prob = tl.where(offs_e[None, :] < E, ex / total[:, None], -1.0)
        key = (prob.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (BLOCK_E - 1 - offs_e)[None, :]
        slot = tl.arange(0, KP)[None, :]
        sel_w = tl.zeros([logit.shape[0], KP], dtype=tl.float32)
        sel_i = tl.zeros([logit.shape[0], KP], dtype=tl.int32)
        for k in tl.static_range(K):
            best = tl.max(key, 1)[:, None]
            value = (best >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            idx = tl.minimum(BLOCK_E - 1 - (best & 0xFFFFFFFF).to(tl.int32), E - 1)
            sel_w = tl.where(slot == k, value, sel_w)
            sel_i = tl.where(slot == k, idx, sel_i)
            key = tl.where(key == best, -9223372036854775807, key)
        if RENORM:
            sel_w = sel_w / tl.sum(sel_w, 1)[:, None]
        return tl.where((total != total)[:, None], float("nan"), sel_w), sel_i

    @triton.jit
    def _store_selected(W, IDS, MASK, real, offs_t, t_ok, sel_w, sel_i, sw_t, si_t, K: tl.constexpr,
                        KP: tl.constexpr, HAS_MASK: tl.constexpr):
        """Weight 0 for padding rows (mask False, or index >= real without a mask); W and IDS have
        row strides sw_t, si_t (views into a dispatcher's packed buffer, or plain [T, K])."""
        if HAS_MASK:
            keep = tl.load(MASK + offs_t, mask=t_ok, other=0) != 0
        else:
            keep = offs_t < real
        sel_w = tl.where(keep[:, None], sel_w, 0.0)
        slot = tl.arange(0, KP)[None, :]
        ok = t_ok[:, None] & (slot < K)
        tl.store(W + offs_t[:, None] * sw_t + slot, sel_w.to(W.dtype.element_ty), mask=ok)
        tl.store(IDS + offs_t[:, None] * si_t + slot, sel_i.to(IDS.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=["T", "real"])  # one compiled kernel for any row count
    def _route_kernel(L, W, IDS, MASK, T, real, sl_t, sw_t, si_t, E: tl.constexpr, BLOCK_E: tl.constexpr,
                      K: tl.constexpr, KP: tl.constexpr, RENORM: tl.constexpr, HAS_MASK: tl.constexpr):
        """Two rows per program."""
        offs_t = tl.program_id(0) * 2 + tl.arange(0, 2)
        t_ok = offs_t < T
        offs = tl.arange(0, BLOCK_E)
        logit = tl.load(L + offs_t[:, None].to(tl.int64) * sl_t + offs[None, :],
                        mask=t_ok[:, None] & (offs[None, :] < E), other=-float("inf")).to(tl.float32)
        sel_w, sel_i = _select(logit, offs, E, BLOCK_E, K, KP, RENORM)
        _store_selected(W, IDS, MASK, real, offs_t, t_ok, sel_w, sel_i, sw_t, si_t, K, KP, HAS_MASK)

    @triton.jit
    def _gate_route_kernel(X, G, PARTIAL, W, IDS, MASK, COUNT, T, real, sx_t, sg_e, sw_t, si_t, D: tl.constexpr,
                           E: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
                           BE: tl.constexpr, SPLITS: tl.constexpr, BK: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                           RENORM: tl.constexpr, HAS_MASK: tl.constexpr, NPROG: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_wait()
        offs_t = tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        offs_e = tl.program_id(0) * BE + tl.arange(0, BE)
        e_ok = offs_e < E
        split = tl.program_id(1)
        lo = split * (D // SPLITS)
        hi = tl.where(split == SPLITS - 1, D, lo + D // SPLITS)
        acc = rows_times_columns(X, G, sx_t, sg_e, offs_t, t_ok, offs_e, e_ok, lo, hi, BLOCK_T, BE, BK)
        tl.store(PARTIAL + (split * T + offs_t[:, None]) * E + offs_e[None, :], acc, mask=t_ok[:, None] & e_ok[None, :])
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        # all of this program's stores before its (one-thread) release; acq_rel then makes every
        # program's partial logits visible to the last one
        tl.debug_barrier()
        if tl.atomic_add(COUNT, 1) == NPROG - 1:
            rows = tl.arange(0, BLOCK_R)
            r_ok = rows < T
            offs = tl.arange(0, BLOCK_E)
            ok = r_ok[:, None] & (offs[None, :] < E)
            logit = tl.zeros([BLOCK_R, BLOCK_E], dtype=tl.float32)
            for s in tl.static_range(SPLITS):
                logit += tl.load(PARTIAL + (s * T + rows[:, None]) * E + offs[None, :], mask=ok, other=0.0,
                                 cache_modifier=".cg")
            logit = tl.where(ok, logit.to(X.dtype.element_ty).to(tl.float32), -float("inf"))
            sel_w, sel_i = _select(logit, offs, E, BLOCK_E, K, KP, RENORM)
            _store_selected(W, IDS, MASK, real, rows, r_ok, sel_w, sel_i, sw_t, si_t, K, KP, HAS_MASK)
            tl.atomic_xchg(COUNT, 0)

    @triton.jit
    def _combine_kernel(Y, W, IDS, INV, OUT, sy_p, si_t, so_t, first, n_local, GATHER: tl.constexpr,
                        ALL_LOCAL: tl.constexpr, D: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr,
                        PDL: tl.constexpr):
        """out[t] = sum over k, in order (fp32), of pair (t, k)'s output: row t*K + k of y (already
        weighted: `moe_grouped`), or with GATHER row INV[t*K + k] times W[t*K + k] (`combine`). Pairs
        of other ranks' experts (ids [T, K], row stride si_t) are skipped: their rows of y are unwritten."""
        if PDL:
            tl.extra.cuda.gdc_wait()
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            if ALL_LOCAL:
                limit = D
            else:
                e = tl.load(IDS + t * si_t + k).to(tl.int32) - first
                limit = tl.where((e >= 0) & (e < n_local), D, 0)
            if GATHER:
                j = tl.load(INV + t * K + k)
                row = tl.load(Y + j * sy_p + offs, mask=offs < limit, other=0.0).to(tl.float32)
                row = row * tl.load(W + t * K + k).to(tl.float32)
            else:
                row = tl.load(Y + (t * K + k) * sy_p + offs, mask=offs < limit, other=0.0).to(tl.float32)
            acc += row
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        tl.store(OUT + t * so_t + offs, acc.to(OUT.dtype.element_ty), mask=offs < D)
