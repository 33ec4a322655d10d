"""MoE experts in Triton (bf16 / fp16 on CUDA), for decode-sized batches (the router: `moe_router`).

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

Pairs routed to another rank's expert (expert parallelism) produce zeros. One group per pair at one
to a few rows runs on the CUDA cores instead where the tile table says so (`moe_gemv`).
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
except ImportError:  # pragma: no cover
    triton = None


def usable(x: torch.Tensor) -> bool:
    """The Triton kernels run here (bf16 / fp16 on CUDA, with Triton; rows of unit inner stride: the
    kernels take a row stride only)."""
    return triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.stride(-1) == 1


GROUPED = SWITCHES.moe_triton  # EPINFER_MOE_TRITON=0: cuBLAS grouped GEMM (A/B)


def enabled(x: torch.Tensor) -> bool:
    """`usable`, and the Triton MoE kernels not switched off (EPINFER_MOE_TRITON=0)."""
    return GROUPED and usable(x)


def grouped_usable(x: torch.Tensor, pairs: int, num_local: int) -> bool:
    """moe_grouped up to EPINFER_MOE_TRITON_MAX pairs per expert on average (96); beyond, cuBLAS's
    grouped GEMM."""
    return enabled(x) and pairs <= SWITCHES.moe_triton_max * num_local


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


def permute(ids_TK: torch.Tensor, first: int, n: int) -> tuple[torch.Tensor, ...]:
    """`layers.moe.permute_pairs` in one program, for up to PERMUTE_MAX_PAIRS pairs on CUDA: (order
    int64, offs int32, rows int64, active int32), the same values. Each pair's key (local expert,
    then its index) sorted in registers (`tl.sort`: a stable order, since the index breaks ties),
    each expert's pairs counted by a histogram, their running sum the group ends."""
    T, K = ids_TK.shape
    P = T * K
    ids_TK = ids_TK if ids_TK.stride(1) == 1 else ids_TK.contiguous()
    order = torch.empty(P, dtype=torch.int64, device=ids_TK.device)
    rows = torch.empty_like(order)
    offs = torch.empty(n, dtype=torch.int32, device=ids_TK.device)
    slots = min(P, n)
    active = torch.empty(slots, dtype=torch.int32, device=ids_TK.device)
    if P:
        pb = max(256, triton.next_power_of_2(P))  # (few variants to compile: 3 up to 1024 pairs)
        _permute_kernel[(1,)](ids_TK, order, rows, offs, active, first, n, P, slots, ids_TK.stride(0), K=K, PB=pb,
                              NP=triton.next_power_of_2(n + 2), num_warps=4 if pb <= 1024 else 8,
                              **pdl.kwargs(ids_TK.device))
    return order, offs, rows, active


# sorted in one program up to here: on an H100 4.5 against 12.7 µs for the compiled torch form at 512 pairs,
# 23.2 against 20.0 at 1600 and 78 against 38 at 4096 (RESULTS.md)
PERMUTE_MAX_PAIRS = 1024
PERMUTE = SWITCHES.permute_kernel  # read once, as GROUPED: `permute_pairs` runs every MoE layer


def permute_usable(ids_TK: torch.Tensor, n: int) -> bool:
    """`permute` for these ids and `n` local experts: on CUDA with Triton, up to PERMUTE_MAX_PAIRS
    pairs (their sort keys in int32), unless switched off (EPINFER_PERMUTE_KERNEL=0)."""
    return (PERMUTE and triton is not None and ids_TK.is_cuda and 0 < ids_TK.numel() <= PERMUTE_MAX_PAIRS
            and (n + 2) * PERMUTE_MAX_PAIRS < 2**31)


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
    # a group's column tiles next to each other in the grid (`_tile_ids`); not per pair (axis 1 would
    # hold every pair, at most 65,535). "split": a group's row blocks shared by slices of programs, about
    # that many blocks each at an even spread of the pairs over the experts (a static count per batch
    # size: CUDA-graph safe), instead of one program walking them all
    nf = bool(cfg.get("n_fast")) and not per_pair
    slices = 1 if per_pair or not cfg.get("split") else max(1, triton.cdiv(triton.cdiv(ids_TK.numel(), n),
                                                                          bm * cfg["split"]))
    groups *= slices
    bn, bk, stages, warps = cfg["up"]
    bk = block[1] if quant["FP8"] else bk
    tma = bool(cfg.get("tma")) and not per_pair and ids_TK.numel() > 0 and all(  # (what a descriptor asserts:
        w.data_ptr() % 16 == 0 and w.stride(2) == 1 and  # a 16-byte aligned base, unit last stride, row
        all(w.stride(i) * w.element_size() % 16 == 0 for i in (0, 1)) for w in (w13, w2))  # strides of 16 bytes)
    # "sorted_rows" (with "tma"): the up kernel's input rows (and their scales) copied once in the pairs'
    # sorted order, so that its row tiles load by descriptor too
    tma_x = tma and bool(cfg.get("sorted_rows")) and D * x_in.element_size() % 16 == 0
    if tma_x:
        rows = order // K
        x_in = x_in.view(torch.uint8)[rows].view(x_in.dtype) if x_in.element_size() == 1 else x_in[rows]
        x_s = x_s[rows] if quant["FP8"] else x_in
    _grouped_up[(triton.cdiv(inter, bn), groups) if nf else (groups, triton.cdiv(inter, bn))](
        x_in, x_s, w13, order, offs, group_e, weights_TK, act, shift, n, slices, ids_TK.stride(0), weights_TK.stride(0),
        x_in.stride(0), x_s.stride(0), w13.stride(0), w13.stride(1), act.stride(0), s13, s13.stride(0),
        s13.stride(1), _tiles(w13, (1, bn, bk), tma), _tiles(x_in, (bm, bk), tma_x), D=D, INTER=inter, K=K,
        PER_PAIR=per_pair, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, TMA=tma, TMA_X=tma_x,
        TILE_SCALE=tile_scale and block[0] % bn == 0 and inter % bn == 0, N_FAST=nf,
        num_stages=stages, num_warps=warps, **quant, **pdl.kwargs(x_TD.device))
    act_in, act_s = quantize_activations(act, block[1]) if quant["FP8"] else (act, act)
    tma_a = tma and act_in.stride(0) * act_in.element_size() % 16 == 0
    bn, bk, stages, warps = cfg["down"]
    bk = block[1] if quant["FP8"] else bk
    _grouped_down[(triton.cdiv(D, bn), groups) if nf else (groups, triton.cdiv(D, bn))](
        act_in, act_s, w2, order, offs, group_e, weights_TK, y, shift, n, slices, ids_TK.stride(0),
        weights_TK.stride(0), act_in.stride(0), act_s.stride(0), w2.stride(0), w2.stride(1), y.stride(0), s2,
        s2.stride(0), s2.stride(1), _tiles(w2, (1, bn, bk), tma), _tiles(act_in, (bm, bk), tma_a), D=D, INTER=inter,
        K=K, PER_PAIR=per_pair, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, TMA=tma, TMA_A=tma_a,
        TILE_SCALE=tile_scale and block[0] % bn == 0, N_FAST=nf, num_stages=stages, num_warps=warps, **quant,
        **pdl.kwargs(x_TD.device))


def _tiles(t: torch.Tensor, block: tuple[int, ...], tma: bool):
    """With "tma" (one group per expert), a tensor-memory-accelerator descriptor of `t` in tiles of
    `block` (the expert weights [E, rows, K] in [1, BLOCK_N, BLOCK_K], rows in the pairs' sorted order
    in [BLOCK_M, BLOCK_K]), so that each K step's tile is one bulk copy rather than per-thread loads;
    else `t` itself (unread)."""
    if not tma:
        return t
    from triton.tools.tensor_descriptor import TensorDescriptor  # (Triton 3.3 on: only where asked)

    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block))


if triton is not None:

    @triton.jit
    def _expert_keys(IDS, j, P, first, n, si_t, K: tl.constexpr):
        """Each pair's local expert, n for another rank's, n + 1 past the last pair."""
        e = tl.load(IDS + (j // K) * si_t + j % K, mask=j < P, other=0).to(tl.int32) - first
        return tl.where(j < P, tl.where((e >= 0) & (e < n), e, n), n + 1)

    @triton.jit
    def _permute_kernel(IDS, ORDER, ROWS, OFFS, ACTIVE, first, n, P, slots, si_t, K: tl.constexpr, PB: tl.constexpr,
                        NP: tl.constexpr, PDL: tl.constexpr):
        """One program: the PB >= P pairs' keys (expert, index) sorted, then the experts' counts."""
        if PDL:
            tl.extra.cuda.gdc_wait()
        i = tl.arange(0, PB)
        key = _expert_keys(IDS, i, P, first, n, si_t, K)  # (n + 1 past the last pair: sorted last)
        j = tl.sort(key * PB + i) % PB  # the pair at each sorted place
        counts = tl.histogram(key, NP)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        tl.store(ORDER + i, j.to(tl.int64), mask=i < P)
        tl.store(ROWS + i, (j // K).to(tl.int64), mask=i < P)
        e = tl.arange(0, NP)
        tl.store(OFFS + e, tl.cumsum(counts, 0), mask=e < n)
        used = (counts > 0) & (e < n)
        slot = tl.cumsum(used.to(tl.int32), 0) - 1  # used experts before it
        tl.store(ACTIVE + slot, e, mask=used)
        tl.store(ACTIVE + e, tl.full([NP], -1, tl.int32), mask=(e >= tl.sum(used.to(tl.int32), 0)) & (e < slots))

    @triton.jit
    def _group(g, OFFS, GROUP_E, shift, n_local, si_t, K: tl.constexpr, PER_PAIR: tl.constexpr):
        """(expert, first sorted pair, end) of group g; an empty range for a group without a local
        expert (another rank's, or an unused slot). Per pair, GROUP_E is the ids [T, K] with row
        stride si_t."""
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
    def _pair_weight(g, WTS, sw_t, K: tl.constexpr):
        """Routing weight of pair g (one group per pair)."""
        return tl.load(WTS + (g // K) * sw_t + g % K)

    @triton.jit
    def _tile_ids(N_FAST: tl.constexpr, slices):
        """(group, column tile, slice) of this program: the grid is (groups x slices, column tiles), or
        with N_FAST (column tiles, groups x slices), so that a group's column tiles run together and
        share its rows in L2; slice s of a group takes its row blocks s, s + slices, ..."""
        if N_FAST:
            gs, tile = tl.program_id(1), tl.program_id(0)
        else:
            gs, tile = tl.program_id(0), tl.program_id(1)
        return gs // slices, tile, gs % slices

    @triton.jit
    def _grouped_up(X, XS, W13, ORDER, OFFS, GROUP_E, WTS, ACT, shift, n_local, slices, si_t, sw_t, sx_t, sxs_t,
                    sw_e, sw_n, sa_p, S13, ss_e, ss_r, W13_TILES, X_TILES, D: tl.constexpr, INTER: tl.constexpr,
                    K: tl.constexpr, PER_PAIR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, TILE_SCALE: tl.constexpr, PDL: tl.constexpr, FP8: tl.constexpr,
                    W16: tl.constexpr, SCALE_ROWS: tl.constexpr, GROUP: tl.constexpr, N_FAST: tl.constexpr,
                    TMA: tl.constexpr, TMA_X: tl.constexpr):
        """act[j] = silu(x[row] @ W13[e, :I].T) * (x[row] @ W13[e, I:].T) for the pairs j of group
        g (expert e), on one column tile of I (`_tile_ids`). FP8: W13 float8 with block scales S13 [E, rows
        / SCALE_ROWS, D / GROUP], x in FP8 with a scale per row and GROUP = BLOCK_K columns (XS);
        W16: x as it is, W13 widened (`fp8_gemm.widen`). TMA: the weight tiles through W13_TILES
        (`_tiles`); TMA_X: X and XS hold the rows in sorted order, their tiles through X_TILES."""
        if PDL:
            tl.extra.cuda.gdc_wait()
        g, tile, part = _tile_ids(N_FAST, slices)
        e, start, end = _group(g, OFFS, GROUP_E, shift, n_local, si_t, K, PER_PAIR)
        if PER_PAIR:  # weight 0 (a padding row): no weights read, the down kernel writes its 0
            end = tl.where(_pair_weight(g, WTS, sw_t, K) == 0, start, end)
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < INTER
        w_base = W13 + e.to(tl.int64) * sw_e + offs_n[None, :] * sw_n
        s_gate = S13 + e.to(tl.int64) * ss_e + (offs_n // SCALE_ROWS) * ss_r  # FP8: each column's scale row
        s_up = S13 + e.to(tl.int64) * ss_e + ((INTER + offs_n) // SCALE_ROWS) * ss_r
        n0 = tile * BLOCK_N  # TILE_SCALE: the tile's one block row of scales
        s_gate0 = S13 + e.to(tl.int64) * ss_e + (n0 // SCALE_ROWS) * ss_r
        s_up0 = S13 + e.to(tl.int64) * ss_e + ((INTER + n0) // SCALE_ROWS) * ss_r
        for m0 in range(start + part * BLOCK_M, end, BLOCK_M * slices):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < end
            if PER_PAIR:
                rows = offs_m // K
            elif TMA_X:
                rows = offs_m
            else:
                rows = tl.load(ORDER + offs_m, mask=m_ok, other=0) // K
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < D
                if TMA_X:
                    a = X_TILES.load([m0, k0])
                else:
                    a = tl.load(X + rows[:, None] * sx_t + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                                other=0.0)
                if TMA:  # (rows past INTER: the up half's, their columns never stored; past 2 * INTER: zeros)
                    wg = tl.reshape(W13_TILES.load([e, n0, k0]), (BLOCK_N, BLOCK_K)).T
                    wu = tl.reshape(W13_TILES.load([e, INTER + n0, k0]), (BLOCK_N, BLOCK_K)).T
                else:
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
    def _grouped_down(ACT, AS, W2, ORDER, OFFS, GROUP_E, WTS, Y, shift, n_local, slices, si_t, sw_t, sa_p, sas_p,
                      sw_e, sw_n, sy_p, S2, ss_e, ss_r, W2_TILES, ACT_TILES, D: tl.constexpr, INTER: tl.constexpr,
                      K: tl.constexpr, PER_PAIR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, TILE_SCALE: tl.constexpr, PDL: tl.constexpr, FP8: tl.constexpr,
                      W16: tl.constexpr, SCALE_ROWS: tl.constexpr, GROUP: tl.constexpr, N_FAST: tl.constexpr,
                      TMA: tl.constexpr, TMA_A: tl.constexpr):
        """y[pair] = w_pair * (act[j] @ W2[e].T) for the pairs j of group g, one column tile of D
        (weights [T, K] with row stride sw_t). FP8: act in FP8 with a scale per row and BLOCK_K columns (AS).
        TMA: the weight tiles through W2_TILES (`_tiles`); TMA_A: the act tiles through ACT_TILES (rows
        past the group's end are the next group's or zeros: their products are never stored)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
        g, tile, part = _tile_ids(N_FAST, slices)
        e, start, end = _group(g, OFFS, GROUP_E, shift, n_local, si_t, K, PER_PAIR)
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < D
        if PER_PAIR:  # a local pair of weight 0 (a padding row) reads no weights: its output is 0
            zero = (end > start) & (_pair_weight(g, WTS, sw_t, K) == 0)
            if zero:
                tl.store(Y + g.to(tl.int64) * sy_p + offs_n, tl.zeros([BLOCK_N], dtype=tl.float32),
                         mask=n_ok)
            end = tl.where(zero, start, end)
        w_base = W2 + e.to(tl.int64) * sw_e + offs_n[None, :] * sw_n
        s_base = S2 + e.to(tl.int64) * ss_e + (offs_n // SCALE_ROWS) * ss_r
        s_tile = S2 + e.to(tl.int64) * ss_e + (tile * BLOCK_N // SCALE_ROWS) * ss_r  # TILE_SCALE
        for m0 in range(start + part * BLOCK_M, end, BLOCK_M * slices):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < end
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, INTER, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < INTER
                if TMA_A:
                    a = ACT_TILES.load([m0, k0])
                else:
                    a = tl.load(ACT + offs_m[:, None].to(tl.int64) * sa_p + offs_k[None, :],
                                mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                if TMA:
                    w = tl.reshape(W2_TILES.load([e, tile * BLOCK_N, k0]), (BLOCK_N, BLOCK_K)).T
                else:
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
