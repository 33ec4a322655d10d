"""Batched decode attention over the paged KV cache: one query row per sequence.

`decode_attention(q, k_cache, v_cache, block_table, state_slots, seq_lens, scale)`: row b attends
to the first `seq_lens[b]` tokens of the sequence whose block-table row is `state_slots[b]`; a row
with `seq_lens[b] == 0` (padding) gets zeros. Everything it needs is on the device, so a decode
step that uses it has no host sync and can be captured in a CUDA graph.

On CUDA it is a split-K ("flash-decoding") Triton kernel: program (b, kv head, split) streams its
share of the context for the whole GQA group at once (the group's queries share every K/V load),
keeping a running max / sum / weighted accumulator; a second kernel merges the splits. Splits are
chosen from the batch alone, so a small batch still fills the GPU. Elsewhere (CPU, no Triton) the
torch reference below computes the same thing; it is also what the kernel is tested against.

Shape suffixes: B rows, H query heads, N max blocks per sequence, hd head dim.
"""

from __future__ import annotations

import torch

from epinfer.core.forward import graph_bucket
from epinfer.kernels import pdl

try:  # Triton is optional: CPU installs don't have it
    import triton
    import triton.language as tl

    from epinfer.kernels.norm_triton import weighted
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None


def cached_tokens(k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor,
                  tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's first `tokens` keys and values from the paged cache [blocks, block_size, KVH, hd]
    through its block-table row `block_ids`, dense: ([tokens, KVH, hd], [tokens, KVH, hd])."""
    block_size, KVH, hd = k_cache.shape[1:]
    pages = block_ids[:-(-tokens // block_size)].long()
    return k_cache[pages].reshape(-1, KVH, hd)[:tokens], v_cache[pages].reshape(-1, KVH, hd)[:tokens]


def decode_attention(q_BHd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, state_slots_B: torch.Tensor, seq_lens_B: torch.Tensor,
                     scale: float) -> torch.Tensor:
    if triton is not None and q_BHd.is_cuda:
        return _decode_triton(q_BHd, k_cache, v_cache, block_table, state_slots_B, seq_lens_B, scale)
    return decode_attention_reference(q_BHd, k_cache, v_cache, block_table, state_slots_B, seq_lens_B, scale)


def rope_to_cache_usable(q: torch.Tensor) -> bool:
    return triton is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def rope_to_cache(q_THd, k_THd, v_THd, cos_TR, sin_TR, q_w, k_w, eps: float, zero_centered: bool,
                  flat_k, flat_v, slots_T) -> torch.Tensor:
    """Decode steps, in one kernel: per-head q / k RMS norm (when the weights are given), rotary
    (neox form, first R dims), and the new keys / values written to the flat cache rows
    `slots_T` (a row with slot -1 writes nothing). Returns the normed, rotated queries [T, H, hd];
    the same arithmetic as `attention.head_norm_rope` + the cache writes, rounded where they round."""
    T, H, hd = q_THd.shape
    KVH = k_THd.shape[1]
    q_out = torch.empty(T, H, hd, dtype=q_THd.dtype, device=q_THd.device)
    if T:
        norm = q_w is not None
        _rope_cache_kernel[(T, H + KVH)](
            q_THd, k_THd, v_THd, cos_TR, sin_TR, q_w if norm else cos_TR, k_w if norm else cos_TR, slots_T,
            q_out, flat_k, flat_v, eps, q_THd.stride(0), q_THd.stride(1), k_THd.stride(0), k_THd.stride(1),
            v_THd.stride(0), v_THd.stride(1), cos_TR.stride(0), q_out.stride(0), q_out.stride(1),
            flat_k.stride(0), flat_k.stride(1), flat_v.stride(0), flat_v.stride(1),
            H=H, HD=hd, HD_P=triton.next_power_of_2(hd), R=cos_TR.shape[1], NORM=norm, ZC=zero_centered,
            num_warps=1, **pdl.kwargs(q_THd.device))
    return q_out


def decode_attention_reference(q_BHd, k_cache, v_cache, block_table, state_slots_B, seq_lens_B, scale):
    """Gathers each row's blocks into a padded [B, N*bs] context and masks past its length."""
    B, H, hd = q_BHd.shape
    _, bs, KVH, _ = k_cache.shape
    pages = block_table[state_slots_B].long()  # [B, N]
    L = pages.shape[1] * bs
    keys = k_cache[pages].reshape(B, L, KVH, hd).to(q_BHd.dtype)
    values = v_cache[pages].reshape(B, L, KVH, hd).to(q_BHd.dtype)
    rep = H // KVH
    keys = keys.repeat_interleave(rep, dim=2)  # [B, L, H, hd]
    values = values.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bhd,blhd->bhl", q_BHd.float(), keys.float()) * scale
    valid = torch.arange(L, device=q_BHd.device)[None, :] < seq_lens_B[:, None]  # [B, L]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a padding row has no keys at all
    values = values.float().masked_fill(~valid[:, :, None, None], 0.0)  # never-written rows may be NaN
    return torch.einsum("bhl,blhd->bhd", probs, values).to(q_BHd.dtype)


# the split kernel's tiles and the split count's bounds: `programs` to aim for, `min_split` tokens.
# BLOCK_N by batch x KV heads up to (halved above head dim 128, to no fewer than 32). H200, 30B shape,
# ctx 1040, graph-timed (`benchmarks/attention_sweep.py`, 2026-11-29): 1 row 5.8 µs (6.4 before), 8 rows
# 8.8 (13.0), 64 rows 41.7 (48.1), 256 rows 143 (152). Qwen3.5 shape (head dim 256, 2 KV heads), H100,
# 2026-12-06: 32 keys a tile instead of 16 at 200 rows, ctx 2000: 282 µs (349); 512 rows, ctx 1100: 400 (478)
DECODE = {"BLOCK_N": [(32, 128), (256, 64), (None, 32)], "num_warps": 4, "num_stages": 2, "programs": 512,
          "max_splits": 32, "min_split": 64}


def _num_splits(batch: int, kv_heads: int, max_tokens: int, cfg: dict = DECODE) -> int:
    """Enough programs to fill the GPU (`programs`), never a split shorter than `min_split` tokens."""
    want = max(1, cfg["programs"] // max(1, batch * kv_heads))
    return int(max(1, min(want, cfg["max_splits"], max_tokens // cfg["min_split"])))


def keys_a_tile(block_n: int, hd: int) -> int:
    """The keys the split kernel loads a tile for a table BLOCK_N: half above head dim 128 (its
    registers), no fewer than 32."""
    return block_n if hd <= 128 else max(32, block_n // 2)


def _decode_triton(q, k_cache, v_cache, block_table, state_slots, seq_lens, scale, cfg: dict = DECODE):
    B, H, hd = q.shape
    _, bs, KVH, _ = k_cache.shape
    G = H // KVH
    # tiles and splits are chosen for the decode graph bucket holding B rows: the decode rows of a
    # mixed step, any count, use kernel variants the graphs' capture already compiled, so no step of
    # a run waits for a compilation
    R = graph_bucket(B)
    splits = _num_splits(R, KVH, block_table.shape[1] * bs, cfg)
    part_acc = torch.empty(B, splits, H, hd, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(B, splits, H, 2, dtype=torch.float32, device=q.device)
    HD_P = max(16, triton.next_power_of_2(hd))
    GP = max(16, triton.next_power_of_2(G))
    BLOCK_N = cfg["BLOCK_N"]
    if not isinstance(BLOCK_N, int):
        BLOCK_N = next(bn for limit, bn in BLOCK_N if limit is None or limit >= R * KVH)
    BLOCK_N = keys_a_tile(BLOCK_N, hd)
    ieee = q.dtype == torch.float32  # float32 means float32: no TF32 in tl.dot
    _split_kernel[(B, KVH, splits)](
        q, k_cache, v_cache, block_table, state_slots, seq_lens, part_acc, part_ml, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_table.stride(0), part_acc.stride(0), part_acc.stride(1), part_acc.stride(2),
        part_ml.stride(0), part_ml.stride(1), part_ml.stride(2),
        G=G, GP=GP, HD=hd, HD_P=HD_P, BS=bs, BLOCK_N=BLOCK_N, SPLITS=splits, IEEE=ieee,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl.kwargs(q.device))
    out = torch.empty_like(q)
    _merge_kernel[(B, H)](
        part_acc, part_ml, out, part_acc.stride(0), part_acc.stride(1), part_acc.stride(2),
        part_ml.stride(0), part_ml.stride(1), part_ml.stride(2), out.stride(0), out.stride(1),
        HD=hd, HD_P=HD_P, SPLITS=splits, SP=max(2, triton.next_power_of_2(splits)), num_warps=4,
        **pdl.kwargs(q.device))
    return out


if triton is not None:

    @triton.jit
    def _split_kernel(Q, K, V, BT, SLOTS, LENS, ACC, ML, scale,
                      sq_b, sq_h, sk_blk, sk_tok, sk_h, sbt, sa_b, sa_s, sa_h, sm_b, sm_s, sm_h,
                      G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr, HD_P: tl.constexpr,
                      BS: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr,
                      PDL: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_wait()
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        s = tl.program_id(2)
        seq_len = tl.load(LENS + b).to(tl.int32)
        slot = tl.load(SLOTS + b).to(tl.int64)
        chunk = tl.cdiv(tl.cdiv(seq_len, SPLITS), BLOCK_N) * BLOCK_N
        start = s * chunk
        end = tl.minimum(seq_len, start + chunk)
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, HD_P)
        heads = kvh * G + offs_g
        g_ok = offs_g < G
        d_ok = offs_d < HD
        q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + offs_d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        m = tl.full([GP], float("-inf"), dtype=tl.float32)
        l_sum = tl.zeros([GP], dtype=tl.float32)
        acc = tl.zeros([GP, HD_P], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < end
            page = tl.load(BT + slot * sbt + offs_n // BS, mask=n_ok, other=0).to(tl.int64)
            row = page * sk_blk + (offs_n % BS) * sk_tok + kvh * sk_h
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(K + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            qk = tl.where(n_ok[None, :], qk * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(qk, 1))
            p = tl.exp(qk - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l_sum = l_sum * alpha + tl.sum(p, 1)
            v = tl.load(V + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        base = b * sa_b + s * sa_s + heads[:, None] * sa_h + offs_d[None, :]
        tl.store(ACC + base, acc, mask=g_ok[:, None] & d_ok[None, :])
        ml = ML + b * sm_b + s * sm_s + heads * sm_h
        tl.store(ml, m, mask=g_ok)
        tl.store(ml + 1, l_sum, mask=g_ok)

    @triton.jit
    def _merge_kernel(ACC, ML, OUT, sa_b, sa_s, sa_h, sm_b, sm_s, sm_h, so_b, so_h,
                      HD: tl.constexpr, HD_P: tl.constexpr, SPLITS: tl.constexpr, SP: tl.constexpr,
                      PDL: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, SP)
        offs_d = tl.arange(0, HD_P)
        s_ok = offs_s < SPLITS
        ml = ML + b * sm_b + offs_s * sm_s + h * sm_h
        m = tl.load(ml, mask=s_ok, other=float("-inf"))
        l_sum = tl.load(ml + 1, mask=s_ok, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)  # empty splits (and pad rows) weigh 0
        acc = tl.load(ACC + b * sa_b + offs_s[:, None] * sa_s + h * sa_h + offs_d[None, :],
                      mask=s_ok[:, None] & (offs_d[None, :] < HD), other=0.0)
        total = tl.sum(w * l_sum, 0)
        out = tl.sum(w[:, None] * acc, 0) / tl.maximum(total, 1e-30)
        tl.store(OUT + b * so_b + h * so_h + offs_d, out.to(OUT.dtype.element_ty), mask=offs_d < HD)

    @triton.jit
    def _norm_rope(X, W, COS, SIN, eps, HD: tl.constexpr, HD_P: tl.constexpr, R: tl.constexpr,
                   NORM: tl.constexpr, ZC: tl.constexpr):
        """One head of one row: RMS norm (optional), then rotate-half rotary on the first R dims."""
        offs = tl.arange(0, HD_P)
        half = R // 2
        rot = offs < R
        partner = tl.where(offs < half, offs + half, offs - half)
        x = tl.load(X + offs, mask=offs < HD, other=0.0).to(tl.float32)
        xp = tl.load(X + partner, mask=rot, other=0.0).to(tl.float32)
        if NORM:
            rstd = tl.rsqrt(tl.sum(x * x, 0) / HD + eps)
            w = tl.load(W + offs, mask=offs < HD, other=0.0).to(tl.float32)
            wp = tl.load(W + partner, mask=rot, other=0.0).to(tl.float32)
            x = weighted(x * rstd, w, X.dtype.element_ty, ZC)
            xp = weighted(xp * rstd, wp, X.dtype.element_ty, ZC)
            x = x.to(X.dtype.element_ty).to(tl.float32)
            xp = xp.to(X.dtype.element_ty).to(tl.float32)
        cos = tl.load(COS + offs, mask=rot, other=1.0).to(tl.float32)
        sin = tl.load(SIN + offs, mask=rot, other=0.0).to(tl.float32)
        return tl.where(rot, x * cos + tl.where(offs < half, -xp, xp) * sin, x)

    @triton.jit
    def _rope_cache_kernel(Q, K, V, COS, SIN, QW, KW, SLOTS, QO, KC, VC, eps,
                           sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sc_t, so_t, so_h, skc, skc_h, svc, svc_h,
                           H: tl.constexpr, HD: tl.constexpr, HD_P: tl.constexpr, R: tl.constexpr,
                           NORM: tl.constexpr, ZC: tl.constexpr, PDL: tl.constexpr):
        """Program (row t, head h): h < H a query head, else KV head h - H (key and value)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs = tl.arange(0, HD_P)
        d_ok = offs < HD
        if h < H:
            y = _norm_rope(Q + t * sq_t + h * sq_h, QW, COS + t * sc_t, SIN + t * sc_t, eps, HD, HD_P, R, NORM, ZC)
            tl.store(QO + t * so_t + h * so_h + offs, y.to(QO.dtype.element_ty), mask=d_ok)
        else:
            j = h - H
            slot = tl.load(SLOTS + t).to(tl.int64)
            if slot >= 0:
                y = _norm_rope(K + t * sk_t + j * sk_h, KW, COS + t * sc_t, SIN + t * sc_t, eps, HD, HD_P, R, NORM,
                               ZC)
                tl.store(KC + slot * skc + j * skc_h + offs, y.to(KC.dtype.element_ty), mask=d_ok)
                v = tl.load(V + t * sv_t + j * sv_h + offs, mask=d_ok, other=0.0)
                tl.store(VC + slot * svc + j * svc_h + offs, v.to(VC.dtype.element_ty), mask=d_ok)
