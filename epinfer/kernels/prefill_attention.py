"""Causal attention of prompt chunks over the paged KV cache, every chunk of a step in one kernel.

`prefill_attention(q, k_cache, v_cache, block_table, tiles, chunks, scale, out)`: chunk c has
`lens[c]` new rows starting at batch row `starts[c]`, after `ctx[c]` tokens already cached, and
reads its blocks through block-table row `slots[c]`; its keys and values, the new ones included,
are in the cache already. Query i of the chunk attends to the first `ctx[c] + i + 1` tokens (causal,
aligned to the end: a fresh prompt and a chunk that starts mid-sequence are the same case). Rows
of other chunks and padding rows of `out` are left as they are.

FlashAttention-2 form: a program (query tile, head group) holds BLOCK_M queries of one chunk (or, `PACK` > 1,
BLOCK_M / PACK queries of PACK heads that share a KV head) and streams the keys up to its last
query's position in BLOCK_N steps: unmasked up to the tile's first position, causally masked past
it (running max, sum and weighted accumulator in float32, exp2; with `lazy`, the running max and
the accumulator's scale move only when a row's max grew by more than 2^8). Each key's cache row is
looked up through the block table, so no gathered copy of the context is made and the block size
is free. Tiles come from the host, where the chunk lengths are known (`tile_map`, heaviest first):
one launch per layer, whatever the chunks. The head is the grid's fast part, so a tile's heads run
together (its keys are read from L2 by all but the first) and the heaviest tiles of every head
start first.

Shape suffixes: T rows, H query heads, KVH key/value heads, hd head dim, C chunks.
"""

from __future__ import annotations

import torch

from epinfer.core.env import SWITCHES

try:  # Triton is optional: CPU installs don't have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None

LOG2E = 1.4426950408889634
# the accumulator rescaled only when a row's maximum grew past 2^8: off, 6-12 % slower at head dim 256 on an
# H200 (RESULTS.md, kernel sweeps); kept for the sweep to try at other shapes
LAZY_RESCALE = False


def usable(q_THd: torch.Tensor) -> bool:
    """bf16 / fp16 on CUDA unless EPINFER_CHUNK_ATTENTION=0 (float32 runs keep SDPA's arithmetic,
    which transformers shares)."""
    return (SWITCHES.chunk_attention and triton is not None and q_THd.is_cuda
            and q_THd.dtype in (torch.bfloat16, torch.float16))


def blocks_for(hd: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, PACK) for a head dim. Head dim 256 (8 warps, 2 stages), 16384 rows after
    16384 cached on an H200: 128 x 64 tiles ran at 498 TFLOP/s, 64 x 32 at 163, 128 x 32 at 332, 64 x
    64 at 216 (SDPA's flash on the same keys: 313). Up to 128 dims: 64 x 64 (not yet swept). PACK:
    query heads of one KV head a program holds (its BLOCK_M rows are PACK heads x BLOCK_M / PACK
    queries, each key tile read once for them all); 1 until a sweep shows more pays."""
    return (64, 64, 1) if hd <= 128 else (128, 64, 1)


def tile_rows(hd: int, pack: int | None = None) -> int:
    """Queries of one chunk a tile holds (what `tile_map` takes): BLOCK_M / PACK."""
    block_m, _, default = blocks_for(hd)
    return block_m // (pack or default)


def tile_map(lens: list[int], block_m: int, ctx: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(chunk of each query tile, the tile's first query within its chunk); `block_m`: `tile_rows`.
    With `ctx` (each chunk's cached tokens) the tiles come heaviest first, by the keys they read
    (programs start in tile order, so the last to start are the shortest and the step's tail is
    short, as in longest-processing-time-first scheduling); else in chunk order."""
    tiles = [(c, m0) for c, n in enumerate(lens) for m0 in range(0, n, block_m)]
    if ctx is not None:
        tiles.sort(key=lambda t: -(ctx[t[0]] + min(t[1] + block_m, lens[t[0]])))
    return [c for c, _ in tiles], [m0 for _, m0 in tiles]


def prefill_attention(q_THd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                      tiles: tuple[torch.Tensor, torch.Tensor], chunks: tuple[torch.Tensor, ...], scale: float,
                      out_THd: torch.Tensor, pack: int | None = None, lazy: bool = LAZY_RESCALE) -> torch.Tensor:
    """`tiles`: (chunk, first query) per tile (device, from `tile_map` with `tile_rows(hd, pack)`);
    `chunks`: (starts, lens, ctx, slots) per chunk (device). Writes the chunks' rows of `out_THd`
    and returns it. `pack`: query heads a program holds (`blocks_for`'s when None; it must divide
    the query heads of a KV head). `lazy`: the accumulator rescaled only when a maximum grew by more
    than 2^8 (`_keys`)."""
    T, H, hd = q_THd.shape
    _, bs, KVH, _ = k_cache.shape
    tile_chunk, tile_first = tiles
    starts, lens, ctx, slots = chunks
    n_tiles = tile_chunk.shape[0]
    if n_tiles == 0:
        return out_THd
    block_m, block_n, default = blocks_for(hd)
    pack = pack or default
    if (H // KVH) % pack:
        raise ValueError(f"{pack} query heads a program do not divide the {H // KVH} of a KV head")
    _prefill_kernel[(n_tiles * (H // pack),)](
        q_THd, k_cache, v_cache, out_THd, block_table, tile_chunk, tile_first, starts, lens, ctx, slots,
        scale * LOG2E, q_THd.stride(0), q_THd.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out_THd.stride(0), out_THd.stride(1),
        block_table.stride(0), BS=bs, REP=H // KVH, HD=hd, HD_P=max(16, triton.next_power_of_2(hd)),
        BLOCK_M=block_m, BLOCK_N=block_n, PACK=pack, GROUPS=H // pack, LAZY=lazy, num_warps=4 if hd <= 128 else 8,
        num_stages=2)
    return out_THd


if triton is not None:

    @triton.jit
    def _keys(q, K, V, BT, slot, sbt, kvh, k0, end, q_pos, offs_d, d_ok, m_i, l_i, acc, qk_scale,
              sk0, sk1, sk2, sv0, sv1, sv2, BS: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              LAZY: tl.constexpr):
        """One BLOCK_N step of keys from k0 (online softmax); `CAUSAL`: the step reaches the tile's
        own positions (or the end), so keys past each query, or past `end`, are masked. `LAZY`: the
        running maxima, and with them the accumulator's scale, move only when a row's maximum grew
        by more than 2^8 (else the weights exp2(s - m) stay under 256, exact to float32 rounding in
        the accumulator and the sum): most steps then skip rescaling the [M, HD] accumulator."""
        offs_n = k0 + tl.arange(0, BLOCK_N)
        if CAUSAL:
            key_ok = offs_n < end
            page = tl.load(BT + slot * sbt + offs_n // BS, mask=key_ok, other=0).to(tl.int64)
            kv_mask = key_ok[:, None] & d_ok[None, :]
        else:
            page = tl.load(BT + slot * sbt + offs_n // BS).to(tl.int64)
            kv_mask = d_ok[None, :]
        at = page[:, None] * sk0 + (offs_n % BS)[:, None] * sk1 + kvh * sk2 + offs_d[None, :]
        k = tl.load(K + at, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [M, N], base 2
        if CAUSAL:
            s = tl.where((offs_n[None, :] <= q_pos[:, None]) & key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if LAZY:
            grew = tl.max(tl.where(m_new > m_i, m_new - m_i, 0.0), 0)  # (inf for a row's first keys)
            if grew > 8.0:
                alpha = tl.exp2(m_i - tl.where(m_new == float("-inf"), 0.0, m_new))
                acc = acc * alpha[:, None]
                l_i = l_i * alpha
                m_i = m_new
            m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)  # a row that has seen nothing yet
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i + tl.sum(p, 1)
            m_new = m_i
        else:
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + page[:, None] * sv0 + (offs_n % BS)[:, None] * sv1 + kvh * sv2 + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if LAZY:
            acc += tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _prefill_kernel(Q, K, V, Out, BT, TILE_C, TILE_M, STARTS, LENS, CTX, SLOTS, qk_scale,
                        sq0, sq1, sk0, sk1, sk2, sv0, sv1, sv2, so0, so1, sbt,
                        BS: tl.constexpr, REP: tl.constexpr, HD: tl.constexpr, HD_P: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PACK: tl.constexpr, GROUPS: tl.constexpr,
                        LAZY: tl.constexpr):
        """Program tile x GROUPS + head group (a 1-D grid, the head group its fast part): BLOCK_M rows,
        PACK query heads (of one KV head) x QM queries."""
        QM: tl.constexpr = BLOCK_M // PACK  # queries of the chunk in this tile
        group = tl.program_id(0) % GROUPS
        tile = tl.program_id(0) // GROUPS
        c = tl.load(TILE_C + tile)
        m0 = tl.load(TILE_M + tile)
        start = tl.load(STARTS + c)
        n = tl.load(LENS + c)
        context = tl.load(CTX + c)
        slot = tl.load(SLOTS + c).to(tl.int64)
        kvh = group * PACK // REP
        if PACK == 1:
            h = group
            offs_m = m0 + tl.arange(0, BLOCK_M)
        else:  # row r: head r // QM of the group, query r % QM of the tile
            r = tl.arange(0, BLOCK_M)
            h = (group * PACK + r // QM)[:, None]
            offs_m = m0 + r % QM
        offs_d = tl.arange(0, HD_P)
        row_ok = offs_m < n
        d_ok = offs_d < HD
        rows = (start + offs_m).to(tl.int64)
        q = tl.load(Q + rows[:, None] * sq0 + h * sq1 + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0)
        q_pos = context + offs_m  # each query's position: it sees keys 0 ..= q_pos
        end = context + tl.minimum(m0 + QM, n)  # keys past the tile's last query are never seen
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HD_P], tl.float32)
        # keys before the tile's first query position are seen by every query: no causal mask there
        full = (context + m0) // BLOCK_N * BLOCK_N
        for k0 in range(0, full, BLOCK_N):
            m_i, l_i, acc = _keys(q, K, V, BT, slot, sbt, kvh, k0, end, q_pos, offs_d, d_ok, m_i, l_i, acc, qk_scale,
                                  sk0, sk1, sk2, sv0, sv1, sv2, BS, BLOCK_N, False, LAZY)
        for k0 in range(full, end, BLOCK_N):
            m_i, l_i, acc = _keys(q, K, V, BT, slot, sbt, kvh, k0, end, q_pos, offs_d, d_ok, m_i, l_i, acc, qk_scale,
                                  sk0, sk1, sk2, sv0, sv1, sv2, BS, BLOCK_N, True, LAZY)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(Out + rows[:, None] * so0 + h * so1 + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
