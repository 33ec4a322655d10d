"""Pure-torch gated delta rule, one-step recurrent form (decode), and the Triton decode kernels.
The chunked form (prefill, many sequences at once) is in `gdn_prefill`.

The torch forms work on CPU and GPU in float32 and are the reference the faster GPU kernels are checked
against. State layout: `[B, Hv, dk, dv]`, float32 in the arithmetic (the cache may store it in bf16 /
fp16: read widened, written rounded). The recurrence per token t, per value head:

    S = S * exp(g_t)
    S = S + k_t (beta_t (v_t - S^T k_t))^T
    o_t = S^T q_t          (q, k L2-normalised, q scaled by dk^-0.5)

Shape suffixes: B batch, N tokens, H value heads, K key dim, V value dim.
"""

from __future__ import annotations

import torch

from epinfer.kernels.fp8_gemm import multiprocessors
from epinfer.kernels.fused import fused

CHUNK = 64


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def prepare_qkv(q, k, v, beta, g, num_v_heads: int):
    """Expand key heads to value heads, move heads first, fp32, normalise q/k."""
    rep = num_v_heads // q.shape[-2]
    if rep > 1:
        q = q.repeat_interleave(rep, dim=-2)
        k = k.repeat_interleave(rep, dim=-2)
    q, k, v = (t.transpose(-3, -2).float().contiguous() for t in (q, k, v))  # [..., H, N, d]
    beta, g = (t.transpose(-2, -1).float().contiguous() for t in (beta, g))  # [..., H, N]
    q, k = l2norm(q), l2norm(k)
    q = q * q.shape[-1] ** -0.5
    return q, k, v, beta, g


@fused
def recurrent_gated_delta_step(
    q_BHK: torch.Tensor,
    k_BHK: torch.Tensor,
    v_BHV: torch.Tensor,
    g_BH: torch.Tensor,
    beta_BH: torch.Tensor,
    state_BHKV: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token for each of B sequences. Returns (output [B, H, V], new state [B, H, K, V] fp32)."""
    out_dtype = v_BHV.dtype
    num_heads = v_BHV.shape[-2]
    # prepare_qkv expects a token axis: add N=1 before the head axis
    q, k, v, beta, g = prepare_qkv(
        q_BHK[:, None], k_BHK[:, None], v_BHV[:, None], beta_BH[:, None], g_BH[:, None], num_heads
    )  # [B, H, 1, *]
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [B, H, d]
    beta, g = beta[:, :, 0], g[:, :, 0]  # [B, H]
    S = state_BHKV.float() * g.exp()[..., None, None]
    kv_mem = (S * k[..., None]).sum(dim=-2)  # [B, H, V]
    delta = (v - kv_mem) * beta[..., None]
    S = S + k[..., None] * delta[..., None, :]
    out = (S * q[..., None]).sum(dim=-2)
    return out.to(out_dtype), S


def recurrent_step_inplace(q_BHK, k_BHK, v_BHV, g_BH, beta_BH, state, slots_B) -> torch.Tensor:
    """`recurrent_gated_delta_step` with the state read and written in place at `state[slots_B]`
    (no gather / scatter copies); one Triton kernel on CUDA. Returns the output [B, H, V]."""
    if _triton is not None and q_BHK.is_cuda:
        return _recurrent_triton(q_BHK, k_BHK, v_BHV, g_BH, beta_BH, state, slots_B)
    out, new_state = recurrent_gated_delta_step(q_BHK, k_BHK, v_BHV, g_BH, beta_BH, state[slots_B])
    state[slots_B] = new_state.to(state.dtype)
    return out


# (BV value columns a block, SPLIT programs a head, num_warps, EARLY state loads) by the state's
# element size; H200, Qwen3.5 shape (32 value heads of 128 x 128), 200 / 512 / 1000 rows
# (`benchmarks/gdn_decode_sweep.py`): float32 229 / 567 / 1103 µs (3.8 TB/s; early loads within 1 %
# either way), bf16 with early loads 142 / 353 / 692 µs (3.0 TB/s; 152 / 383 / 746 without)
DECODE_CONFIGS = {4: (64, 2, 4, False), 2: (64, 2, 2, True)}


def _recurrent_triton(q, k, v, g, beta, state, slots, cfg: tuple | None = None):
    """`cfg`: (BV, SPLIT, num_warps, EARLY[, per_sm]); per_sm > 0: the persistent form, `per_sm`
    programs an SM, each walking tiles of BV columns (SPLIT is then DV / BV)."""
    B, Hk, DK = q.shape
    Hv, DV = v.shape[1], v.shape[2]
    out = torch.empty_like(v)
    BV, split, warps, early, *per_sm = cfg or DECODE_CONFIGS.get(state.element_size(), (32, 4, 4, False))
    if DV % (BV * split):  # (a head size the table's blocks do not divide: 32-column blocks, or one)
        BV, split, per_sm = *((32, DV // 32) if DV % 32 == 0 else (DV, 1)), []
    if per_sm and per_sm[0] and B:
        tiles = B * Hv * (DV // BV)
        grid = min(tiles, per_sm[0] * multiprocessors(q.device))
        _gdn_decode_persistent[(grid,)](
            q, k, v, g, beta, state, slots, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), g.stride(0), beta.stride(0), state.stride(0), state.stride(1),
            state.stride(2), out.stride(0), out.stride(1), DK**-0.5, tiles, Hv, REP=Hv // Hk, DK=DK, DV=DV, BV=BV,
            num_warps=warps)
        return out
    _gdn_decode_kernel[(B, Hv, split)](
        q, k, v, g, beta, state, slots, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), g.stride(0), beta.stride(0), state.stride(0), state.stride(1), state.stride(2),
        out.stride(0), out.stride(1), DK**-0.5, REP=Hv // Hk, DK=DK, DV=DV, BV=BV, SPLIT=split, EARLY=early,
        num_warps=warps)
    return out


def conv_triton(state, slots, x, w):
    """`gdn.conv_step_inplace` on CUDA: program (row, channel block) reads its K-1 state columns,
    the new input and the weights once, writes the shifted state back and silu(conv)."""
    B, C = x.shape
    K = w.shape[1]
    out = torch.empty_like(x)
    BLOCK_C = 256
    _conv_step_kernel[(B, _triton.cdiv(C, BLOCK_C))](
        state, slots, x, w, out, state.stride(0), state.stride(1), state.stride(2), x.stride(0), w.stride(0),
        out.stride(0), C, K=K, KP=_triton.next_power_of_2(K), BLOCK_C=BLOCK_C, num_warps=4)
    return out


try:  # Triton is optional: CPU installs don't have it
    import triton as _triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    _triton = None
HAVE_TRITON = _triton is not None

if _triton is not None:

    @_triton.jit
    def _gdn_decode_kernel(Q, K, V, G, BETA, S, SLOTS, OUT, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sg_b, sbeta_b,
                           ss_slot, ss_h, ss_k, so_b, so_h, scale,
                           REP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
                           SPLIT: tl.constexpr, EARLY: tl.constexpr):
        """Program (row b, value head h, split): its DV / SPLIT value columns in [DK, BV] state
        tiles, each read once, decayed, delta-updated and written back; the output is the updated
        tile times q. `EARLY`: the first tile's load is issued right after the slot's, before the
        q / k loads and their norms (its latency overlaps theirs), and each later tile's one tile
        ahead."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_k = tl.arange(0, DK)
        hk = h // REP
        slot = tl.load(SLOTS + b).to(tl.int64)
        tile = S + slot * ss_slot + h * ss_h + offs_k[:, None] * ss_k
        lo = tl.program_id(2) * (DV // SPLIT)
        hi = lo + DV // SPLIT
        v_row = V + b * sv_b + h * sv_h
        if EARLY:
            first = lo + tl.arange(0, BV)
            next_s = tl.load(tile + first[None, :])
            next_v = tl.load(v_row + first)
        q, k = _unit_qk(tl.load(Q + b * sq_b + hk * sq_h + offs_k), tl.load(K + b * sk_b + hk * sk_h + offs_k), scale)
        decay = tl.exp(tl.load(G + b * sg_b + h).to(tl.float32))
        beta = tl.load(BETA + b * sbeta_b + h).to(tl.float32)
        for v0 in tl.range(lo, hi, BV):
            offs_v = v0 + tl.arange(0, BV)
            if EARLY:
                v = next_v.to(tl.float32)
                s = next_s.to(tl.float32) * decay
                ahead = offs_v + BV
                more = ahead < hi
                next_s = tl.load(tile + ahead[None, :], mask=more[None, :], other=0.0)
                next_v = tl.load(v_row + ahead, mask=more, other=0.0)
            else:
                v = tl.load(v_row + offs_v).to(tl.float32)
                s = tl.load(tile + offs_v[None, :]).to(tl.float32) * decay
            s, o = _delta_rule(s, v, q, k, beta)
            tl.store(tile + offs_v[None, :], s.to(S.dtype.element_ty))
            tl.store(OUT + b * so_b + h * so_h + offs_v, o.to(OUT.dtype.element_ty))

    @_triton.jit
    def _unit_qk(q, k, scale):
        """q and k in float32, each scaled to unit length (q then times `scale`)."""
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        return q * tl.rsqrt(tl.sum(q * q, 0) + 1e-6) * scale, k * tl.rsqrt(tl.sum(k * k, 0) + 1e-6)

    @_triton.jit
    def _delta_rule(s, v, q, k, beta):
        """A decayed state tile [DK, BV] (float32) updated by the delta rule for value columns v, with
        the normalised q and k: (the new tile, its output q . tile)."""
        delta = (v - tl.sum(s * k[:, None], 0)) * beta
        s = s + k[:, None] * delta[None, :]
        return s, tl.sum(s * q[:, None], 0)

    @_triton.jit
    def _gdn_tile_inputs(i, Q, K, V, G, BETA, S, SLOTS, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sg_b, sbeta_b,
                         ss_slot, ss_h, so_b, so_h, tiles, Hv, REP: tl.constexpr, DV: tl.constexpr,
                         BV: tl.constexpr, state_rows, offs_k):
        """Tile i (row b, value head h, columns offs_v): the offset of its state head (the tile is
        there + `state_rows` + the columns), its columns, its output's offsets, and its loads: the
        state tile [DK, BV], v, q, k, the decay's log and beta; all masked off past the last tile."""
        ok = i < tiles
        per_b = Hv * (DV // BV)
        b = i // per_b
        h = (i % per_b) // (DV // BV)
        offs_v = (i % (DV // BV)) * BV + tl.arange(0, BV)
        slot = tl.load(SLOTS + b, mask=ok, other=0).to(tl.int64)
        head = slot * ss_slot + h * ss_h
        out_at = b * so_b + h * so_h + offs_v
        s = tl.load(S + head + state_rows + offs_v[None, :], mask=ok, other=0.0)
        v = tl.load(V + b * sv_b + h * sv_h + offs_v, mask=ok, other=0.0)
        q = tl.load(Q + b * sq_b + (h // REP) * sq_h + offs_k, mask=ok, other=0.0)
        k = tl.load(K + b * sk_b + (h // REP) * sk_h + offs_k, mask=ok, other=0.0)
        g = tl.load(G + b * sg_b + h, mask=ok, other=0.0)
        beta = tl.load(BETA + b * sbeta_b + h, mask=ok, other=0.0)
        return head, offs_v, out_at, s, v, q, k, g, beta

    @_triton.jit
    def _gdn_decode_persistent(Q, K, V, G, BETA, S, SLOTS, OUT, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sg_b, sbeta_b,
                               ss_slot, ss_h, ss_k, so_b, so_h, scale, tiles, Hv, REP: tl.constexpr,
                               DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
        """`_gdn_decode_kernel`'s arithmetic, a fixed grid of programs each walking the tiles
        pid, pid + programs, ...: the next tile's state and inputs are loaded before this one's
        arithmetic, so every program keeps a tile's read in flight while it computes."""
        pid = tl.program_id(0)
        step = tl.num_programs(0)
        offs_k = tl.arange(0, DK)
        state_rows = offs_k[:, None].to(tl.int64) * ss_k
        nxt = _gdn_tile_inputs(pid, Q, K, V, G, BETA, S, SLOTS, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sg_b, sbeta_b,
                               ss_slot, ss_h, so_b, so_h, tiles, Hv, REP, DV, BV, state_rows, offs_k)
        for i in range(pid, tiles, step):
            head, offs_v, out_at, s, v, q, k, g, beta = nxt
            nxt = _gdn_tile_inputs(i + step, Q, K, V, G, BETA, S, SLOTS, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sg_b,
                                   sbeta_b, ss_slot, ss_h, so_b, so_h, tiles, Hv, REP, DV, BV, state_rows, offs_k)
            q, k = _unit_qk(q, k, scale)
            s, o = _delta_rule(s.to(tl.float32) * tl.exp(g.to(tl.float32)), v.to(tl.float32), q, k,
                               beta.to(tl.float32))
            tl.store(S + head + state_rows + offs_v[None, :], s.to(S.dtype.element_ty))
            tl.store(OUT + out_at, o.to(OUT.dtype.element_ty))

    @_triton.jit
    def _conv_step_kernel(S, SLOTS, X, W, OUT, ss_slot, ss_c, ss_k, sx_b, sw_c, so_b, C,
                          K: tl.constexpr, KP: tl.constexpr, BLOCK_C: tl.constexpr):
        b = tl.program_id(0)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_k = tl.arange(0, KP)
        c_ok = offs_c < C
        slot = tl.load(SLOTS + b).to(tl.int64)
        x = tl.load(X + b * sx_b + offs_c, mask=c_ok, other=0.0)
        s_ptr = S + slot * ss_slot + offs_c[:, None] * ss_c + offs_k[None, :] * ss_k
        old_mask = c_ok[:, None] & (offs_k[None, :] < K - 1)
        prev = tl.load(s_ptr, mask=old_mask, other=0.0).to(x.dtype)  # [BLOCK_C, KP]: the K-1 older inputs
        w = tl.load(W + offs_c[:, None] * sw_c + offs_k[None, :], mask=c_ok[:, None] & (offs_k[None, :] < K),
                    other=0.0).to(tl.float32)
        last = offs_k[None, :] == K - 1
        full = tl.where(last, x[:, None], prev)  # [BLOCK_C, KP]: inputs t-K+1 .. t
        acc = tl.sum(full.to(tl.float32) * w, 1)
        out = acc / (1.0 + tl.exp(-acc))
        tl.store(OUT + b * so_b + offs_c, out.to(OUT.dtype.element_ty), mask=c_ok)
        # shifted state: column j takes input j + 1 (the new input lands in column K-2)
        nxt = tl.load(s_ptr + ss_k, mask=c_ok[:, None] & (offs_k[None, :] < K - 2), other=0.0).to(x.dtype)
        shifted = tl.where(offs_k[None, :] == K - 2, x[:, None], nxt)
        tl.store(s_ptr, shifted.to(S.dtype.element_ty), mask=old_mask)
