"""MoE experts and router in Triton (bf16 / fp16 on CUDA), for decode-sized batches.

`moe_grouped`: one program per (local expert, output tile) walks its expert's pairs (sorted by
expert, `permute_pairs`) in blocks of BLOCK_M rows. The up kernel gathers the rows by index, so there
is no gathered copy of x, and applies silu(gate) * up in registers; the down kernel scales by the
routing weight and writes each pair's output in (row, k) order, so the combine is one sum over k.
An expert with no pairs reads none of its weights: at decode sizes (one to a few dozen pairs per
expert) the step is bound by reading the used experts' weights once, and the tile sizes are chosen
for that (`benchmarks/moe_kernel_sweep.py`). On H200 this beats both cuBLAS's grouped GEMM (which
needs the gathered copy and pads every group) and per-pair GEMV kernels, from 1 to 512 rows.

  up:   act[j]  = silu(W13[e, :I] @ x[row_j]) * (W13[e, I:] @ x[row_j])      (fp32 accumulate)
  down: y[p_j]  = w_p * (W2[e] @ act[j])                                     (fp32)
  out[t]        = sum_k y[t*K + k]

Pairs routed to another rank's expert (expert parallelism) produce zeros.

`route`: softmax, top-k, renormalisation and the padding mask in one kernel.
"""

from __future__ import annotations

import json
import os

import torch

try:  # Triton is optional: CPU installs don't have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

MAX_PER_EXPERT = 96  # moe_grouped up to this many pairs per expert on average; beyond, cuBLAS grouped GEMM


def _usable(x: torch.Tensor) -> bool:
    return GROUPED[0] and triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def grouped_usable(x: torch.Tensor, pairs: int, num_local: int) -> bool:
    return _usable(x) and pairs <= MAX_PER_EXPERT * num_local


def router_usable(logits: torch.Tensor) -> bool:
    return _usable(logits) and logits.shape[1] <= 1024


GROUPED = [os.environ.get("EPINFER_MOE_TRITON", "1") != "0"]  # EPINFER_MOE_TRITON=0: cuBLAS grouped GEMM (A/B)


def route(logits_TE: torch.Tensor, top_k: int, renormalize: bool, row_mask_T: torch.Tensor | None, real: int,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The router in one kernel: softmax (fp32), top-k (descending; the lowest index among ties),
    optional renormalisation, weight 0 for padding rows (`row_mask_T` False, or index >= `real`
    when there is no mask). Returns (weights_TK in `dtype`, ids_TK int64)."""
    T, E = logits_TE.shape
    weights = torch.empty(T, top_k, dtype=dtype, device=logits_TE.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits_TE.device)
    if T:
        mask = row_mask_T if row_mask_T is not None else ids  # (unused without HAS_MASK)
        _route_kernel[(T,)](logits_TE, weights, ids, mask, real, logits_TE.stride(0), E=E,
                            BLOCK_E=triton.next_power_of_2(E), K=top_k, KP=triton.next_power_of_2(top_k),
                            RENORM=renormalize, HAS_MASK=row_mask_T is not None, num_warps=4 if E > 256 else 2)
    return weights, ids


def combine(y_PD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor, order: torch.Tensor, first: int,
            n: int) -> torch.Tensor:
    """`moe.combine_pairs` in one kernel: out[t] = sum_k w[t, k] * y[position of pair (t, k) in
    `order`], pairs of other ranks' experts skipped (their rows of y are undefined). Each program
    reads whole rows of y (coalesced) and accumulates in fp32."""
    T, K = ids_TK.shape
    D = y_PD.shape[1]
    inverse = inverse_permutation(order)
    out = torch.empty(T, D, dtype=y_PD.dtype, device=y_PD.device)
    if T:
        _combine_kernel[(T, triton.cdiv(D, 1024))](y_PD, weights_TK.reshape(-1), ids_TK.reshape(-1), inverse, out,
                                                   y_PD.stride(0), out.stride(0), first, n, D=D, K=K, BLOCK_D=1024)
    return out


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """inverse[p] = the position of pair p in `order`."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))


def grouped_config(pairs_per_expert: float) -> dict:
    """Tile sizes by the average pairs per expert (static per batch size: CUDA-graph safe).
    EPINFER_MOE_CONFIGS=file.json replaces the table (a sweep's output, same format)."""
    if "file" not in _LOADED:
        path = _LOADED["file"] = os.environ.get("EPINFER_MOE_CONFIGS")
        if path:
            with open(path) as f:
                CONFIGS[:] = [(limit, cfg) for limit, cfg in json.load(f)]
    for limit, cfg in CONFIGS:
        if pairs_per_expert <= limit:
            return cfg
    return CONFIGS[-1][1]


_LOADED: dict = {}
# (average pairs per expert up to, {up: ..., down: ...}); measured on H200 (benchmarks/moe_kernel_sweep.py)
CONFIGS = [  # H200, Qwen3-30B-A3B expert shape, 2026-11-28: 3.5-4.0 TB/s on the expert weights from 8 pairs per
    # expert up (RESULTS.md); 2.1-3 TB/s below, where few weights are read (at 1-2 rows the sweep's best
    # differ within noise, and this row was faster inside the graph)
    (12, {"BLOCK_M": 16, "up": (32, 256, 3, 4), "down": (64, 128, 3, 4)}),
    (24, {"BLOCK_M": 32, "up": (64, 128, 3, 4), "down": (64, 128, 3, 4)}),
    (1e9, {"BLOCK_M": 64, "up": (64, 128, 4, 4), "down": (128, 128, 4, 8)}),
]  # tile tuples: (BLOCK_N, BLOCK_K, num_stages, num_warps)


def moe_grouped(x_TD: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights_TK: torch.Tensor,
                order: torch.Tensor, offs: torch.Tensor, all_local: bool, cfg: dict | None = None) -> torch.Tensor:
    """Experts for pairs sorted by local expert: `order` (sorted pair indices) and `offs` (int32
    cumulative group ends), as `permute_pairs` returns them. Pairs of other ranks' experts (only
    when not `all_local`) get 0."""
    T, D = x_TD.shape
    K = weights_TK.shape[1]
    n, two_i, _ = w13.shape
    inter = two_i // 2
    P = T * K
    cfg = cfg or grouped_config(P / n)
    bm = cfg["BLOCK_M"]
    act = torch.empty(P, inter, dtype=x_TD.dtype, device=x_TD.device)
    bn, bk, stages, warps = cfg["up"]
    _grouped_up[(n, triton.cdiv(inter, bn))](
        x_TD, w13, order, offs, act, x_TD.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        D=D, INTER=inter, K=K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_stages=stages, num_warps=warps)
    y = (torch.empty if all_local else torch.zeros)(P, D, dtype=torch.float32, device=x_TD.device)
    bn, bk, stages, warps = cfg["down"]
    _grouped_down[(n, triton.cdiv(D, bn))](
        act, w2, order, offs, weights_TK.reshape(-1), y, act.stride(0), w2.stride(0), w2.stride(1),
        y.stride(0), D=D, INTER=inter, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_stages=stages, num_warps=warps)
    return y.view(T, K, D).sum(1).to(x_TD.dtype)


if triton is not None:

    @triton.jit
    def _group(OFFS, e):
        start = tl.where(e > 0, tl.load(OFFS + e - 1, mask=e > 0, other=0), 0)
        return start, tl.load(OFFS + e)

    @triton.jit
    def _grouped_up(X, W13, ORDER, OFFS, ACT, sx_t, sw_e, sw_n, sa_p,
                    D: tl.constexpr, INTER: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """act[j] = silu(x[row] @ W13[e, :I].T) * (x[row] @ W13[e, I:].T) for the sorted pairs j of
        expert e = program_id(0), on one tile of I."""
        e = tl.program_id(0)
        start, end = _group(OFFS, e)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < INTER
        w_base = W13 + e.to(tl.int64) * sw_e + offs_n[None, :] * sw_n
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < end
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
                acc_g = tl.dot(a, wg, acc_g)
                acc_u = tl.dot(a, wu, acc_u)
            act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
            tl.store(ACT + offs_m[:, None].to(tl.int64) * sa_p + offs_n[None, :], act.to(ACT.dtype.element_ty),
                     mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _grouped_down(ACT, W2, ORDER, OFFS, WTS, Y, sa_p, sw_e, sw_n, sy_p,
                      D: tl.constexpr, INTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
        """y[pair] = w_pair * (act[j] @ W2[e].T) for the sorted pairs j of expert e, one tile of D."""
        e = tl.program_id(0)
        start, end = _group(OFFS, e)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < D
        w_base = W2 + e.to(tl.int64) * sw_e + offs_n[None, :] * sw_n
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < end
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, INTER, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < INTER
                a = tl.load(ACT + offs_m[:, None].to(tl.int64) * sa_p + offs_k[None, :],
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_base + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(a, w, acc)
            pairs = tl.load(ORDER + offs_m, mask=m_ok, other=0)
            wt = tl.load(WTS + pairs, mask=m_ok, other=0.0).to(tl.float32)
            tl.store(Y + pairs[:, None].to(tl.int64) * sy_p + offs_n[None, :], acc * wt[:, None],
                     mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _route_kernel(L, W, IDS, MASK, real, sl_t, E: tl.constexpr, BLOCK_E: tl.constexpr, K: tl.constexpr,
                      KP: tl.constexpr, RENORM: tl.constexpr, HAS_MASK: tl.constexpr):
        t = tl.program_id(0)
        offs = tl.arange(0, BLOCK_E)
        logit = tl.load(L + t.to(tl.int64) * sl_t + offs, mask=offs < E, other=-float("inf")).to(tl.float32)
        ex = tl.exp(logit - tl.max(logit, 0))
        work = tl.where(offs < E, ex / tl.sum(ex, 0), -1.0)
        slot = tl.arange(0, KP)
        sel_w = tl.zeros([KP], dtype=tl.float32)
        sel_i = tl.zeros([KP], dtype=tl.int32)
        for k in tl.static_range(K):
            best = tl.max(work, 0)
            # (a NaN row matches nothing: it keeps a valid id and its NaN weight propagates, as in torch)
            idx = tl.minimum(tl.min(tl.where(work == best, offs, BLOCK_E), 0), E - 1)
            sel_w = tl.where(slot == k, best, sel_w)
            sel_i = tl.where(slot == k, idx, sel_i)
            work = tl.where(offs == idx, -2.0, work)
        if RENORM:
            sel_w = sel_w / tl.sum(sel_w, 0)
        if HAS_MASK:
            keep = tl.load(MASK + t) != 0
        else:
            keep = t < real
        sel_w = tl.where(keep, sel_w, 0.0)
        tl.store(W + t * K + slot, sel_w.to(W.dtype.element_ty), mask=slot < K)
        tl.store(IDS + t * K + slot, sel_i.to(tl.int64), mask=slot < K)

    @triton.jit
    def _combine_kernel(Y, W, IDS, INV, OUT, sy_p, so_t, first, n_local, D: tl.constexpr, K: tl.constexpr,
                        BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = offs < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            e = tl.load(IDS + t * K + k) - first
            mine = (e >= 0) & (e < n_local)
            j = tl.load(INV + t * K + k)
            w = tl.load(W + t * K + k).to(tl.float32)
            row = tl.load(Y + j * sy_p + offs, mask=offs < tl.where(mine, D, 0), other=0.0).to(tl.float32)
            acc += row * w
        tl.store(OUT + t * so_t + offs, acc.to(OUT.dtype.element_ty), mask=d_ok)
