"""Small-batch MoE in two Triton kernels (bf16 / fp16 on CUDA): one program per (row, k) pair and
output tile reads exactly its expert's weights — no sort, no gather, no grouped-GEMM tiles for
empty experts. Used when there are few pairs (decode at small batch), where a grouped GEMM spends
most of its time on launch and empty groups; each pair re-reads its expert's weights, so with
many pairs per expert the grouped GEMM wins and is used instead.

  up:   act[p]  = silu(W13[e_p, :I] @ x[row_p]) * (W13[e_p, I:] @ x[row_p])      (fp32 accumulate)
  down: y[p]    = w_p * (W2[e_p] @ act[p])                                        (fp32)
  out[t]        = sum_k y[t*K + k]

Pairs routed to another rank's expert (expert parallelism) produce zeros.
"""

from __future__ import annotations

import torch

try:  # Triton is optional: CPU installs don't have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

MAX_PAIRS = 64  # above this the grouped GEMM is used (weights re-read per pair get too costly)


def usable(x: torch.Tensor, pairs: int) -> bool:
    return triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and pairs <= MAX_PAIRS


def moe_small(x_TD: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights_TK: torch.Tensor,
              ids_TK: torch.Tensor, first: int) -> torch.Tensor:
    T, D = x_TD.shape
    K = ids_TK.shape[1]
    n, two_i, _ = w13.shape
    inter = two_i // 2
    P = T * K
    ids = ids_TK.reshape(-1).contiguous()
    wts = weights_TK.reshape(-1).contiguous()
    act = torch.empty(P, inter, dtype=x_TD.dtype, device=x_TD.device)
    _up_kernel[(P, triton.cdiv(inter, 32))](
        x_TD, w13, ids, act, x_TD.stride(0), w13.stride(0), w13.stride(1), act.stride(0), first, n,
        D=D, INTER=inter, K=K, BLOCK_N=32, BLOCK_D=128, num_warps=4)
    y = torch.empty(P, D, dtype=torch.float32, device=x_TD.device)
    _down_kernel[(P, triton.cdiv(D, 64))](
        act, w2, ids, wts, y, act.stride(0), w2.stride(0), w2.stride(1), y.stride(0), first, n,
        D=D, INTER=inter, BLOCK_N=64, BLOCK_I=128, num_warps=4)
    return y.view(T, K, D).sum(1).to(x_TD.dtype)


if triton is not None:

    @triton.jit
    def _pair_expert(IDS, p, first, n_local, offs_n, N: tl.constexpr):
        """Pair p's local expert (0 when it is another rank's), the tile's in-range mask, and the
        mask of weights to read (empty for another rank's expert: nothing is loaded)."""
        e = tl.load(IDS + p).to(tl.int32) - first
        mine = (e >= 0) & (e < n_local)
        return tl.where(mine, e, 0).to(tl.int64), offs_n < N, offs_n < tl.where(mine, N, 0)

    @triton.jit
    def _up_kernel(X, W13, IDS, ACT, sx_t, sw_e, sw_n, sa_p, first, n_local,
                   D: tl.constexpr, INTER: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
        p = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        e, n_ok, w_ok = _pair_expert(IDS, p, first, n_local, offs_n, INTER)
        row = (p // K).to(tl.int64)
        acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            x = tl.load(X + row * sx_t + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            m = w_ok[:, None] & d_ok[None, :]
            base = W13 + e * sw_e + offs_d[None, :]
            wg = tl.load(base + offs_n[:, None] * sw_n, mask=m, other=0.0).to(tl.float32)
            wu = tl.load(base + (offs_n[:, None] + INTER) * sw_n, mask=m, other=0.0).to(tl.float32)
            acc_g += tl.sum(wg * x[None, :], 1)
            acc_u += tl.sum(wu * x[None, :], 1)
        act = tl.where(w_ok, acc_g / (1.0 + tl.exp(-acc_g)) * acc_u, 0.0)
        tl.store(ACT + p * sa_p + offs_n, act.to(ACT.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _down_kernel(ACT, W2, IDS, WTS, Y, sa_p, sw_e, sw_n, sy_p, first, n_local,
                     D: tl.constexpr, INTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr):
        p = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        e, n_ok, w_ok = _pair_expert(IDS, p, first, n_local, offs_n, D)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i0 in range(0, INTER, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            i_ok = offs_i < INTER
            a = tl.load(ACT + p * sa_p + offs_i, mask=i_ok, other=0.0).to(tl.float32)
            w = tl.load(W2 + e * sw_e + offs_n[:, None] * sw_n + offs_i[None, :],
                        mask=w_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * a[None, :], 1)
        wt = tl.load(WTS + p).to(tl.float32)
        tl.store(Y + p * sy_p + offs_n, tl.where(w_ok, acc * wt, 0.0), mask=n_ok)
