"""Full (softmax) attention over a paged KV cache, for mixed prefill + decode batches.

Covers every family's variant: q/k/v bias (Qwen2-MoE), per-head q/k norm (Qwen3), q/k norm over
all heads (OLMoE), clip_qkv (OLMoE), partial rotary and a sigmoid output gate carried in the query
projection (Qwen3-Next / Qwen3.5). Each real row is written to the cache at `kv_slots_T`; padding
rows (slot -1) are neither written nor attended, and their output rows are zero.

On GPUs the decode rows of a mixed step all go through one batched paged-decode kernel
(`paged_attention.py`). Each prompt chunk is one SDPA call (a fresh prompt its own keys with a
causal flag, a later chunk its cached context with a bottom-right causal bias), or, in bf16 / fp16
on GPUs (unless EPINFER_CHUNK_ATTENTION=0), every chunk of the step goes through one kernel over the
paged cache (`prefill_attention.py`: fresh prompts and chunks after cached context alike), except the
long chunks whose shapes repeat, which take cuDNN's attention (`cudnn_attention.py`; unless
EPINFER_CUDNN_CHUNKS=0).
Decode-only steps on the fast path (`batch.decode`) run the paged-decode kernel for all rows, and
in low precision the q/k norm, rotary and cache writes before it are one kernel too
(`rope_to_cache`). On the CPU every sequence takes the SDPA reference (float32: the same arithmetic
as transformers).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right

from epinfer.core.config import ModelConfig
from epinfer.core.forward import ForwardBatch, aligned_device_rows
from epinfer.distributed.parallel import ParallelContext
from epinfer.kernels import cudnn_attention, paged_attention, prefill_attention
from epinfer.kernels.fused import fused
from epinfer.kernels.paged_attention import decode_attention, rope_to_cache, rope_to_cache_usable
from epinfer.layers.linear import Linear, Stacked, row_parallel, stack_linears
from epinfer.layers.norm import RMSNorm, rms_norm
from epinfer.layers.rotary import apply_rotary


@fused
def head_norm_rope(q_THd, k_THd, cos_TR, sin_TR, q_w, k_w, eps: float, zero_centered: bool):
    """Per-head q / k RMS norm (when the weights are given), then rotary: one fused kernel on GPUs."""
    if q_w is not None:
        q_THd = rms_norm.__wrapped__(q_THd, q_w, eps, zero_centered)
        k_THd = rms_norm.__wrapped__(k_THd, k_w, eps, zero_centered)
    return apply_rotary.__wrapped__(q_THd, cos_TR, sin_TR), apply_rotary.__wrapped__(k_THd, cos_TR, sin_TR)


@fused
def sigmoid_gate(attn: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return attn * torch.sigmoid(gate)


def head_rows(heads: range, width: int) -> list[int]:
    """Global rows of a projection whose output is `width` rows per head, for `heads`."""
    return [h * width + j for h in heads for j in range(width)]


class Attention(nn.Module):
    """Heads are split over the TP group (q/k/v column-parallel, o row-parallel); with fewer KV
    heads than TP ranks each KV head is replicated on TP / KVH ranks."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, layer_idx: int) -> None:
        super().__init__()
        tp, rank = ctx.tp_size, ctx.tp_rank
        self.num_heads = cfg.num_heads // tp
        self.num_kv_heads = max(1, cfg.num_kv_heads // tp)
        self.head_dim = hd = cfg.head_dim
        self.gated = cfg.attn_output_gate
        self.clip_qkv = cfg.clip_qkv
        heads = range(rank * self.num_heads, (rank + 1) * self.num_heads)
        kv_first = rank * cfg.num_kv_heads // tp if cfg.num_kv_heads < tp else rank * self.num_kv_heads
        kv_heads = range(kv_first, kv_first + self.num_kv_heads)
        q_width = hd * (2 if self.gated else 1)
        sharded = tp > 1
        D, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = Linear(D, cfg.num_heads * q_width, bias,
                             out_index=head_rows(heads, q_width) if sharded else None)
        kv_index = head_rows(kv_heads, hd) if sharded else None
        self.k_proj = Linear(D, cfg.num_kv_heads * hd, bias, out_index=kv_index)
        self.v_proj = Linear(D, cfg.num_kv_heads * hd, bias, out_index=kv_index)
        o_bias = cfg.attention_bias and cfg.family != "qwen2_moe"
        self.o_proj = row_parallel(cfg.num_heads * hd, D, ctx, "attention heads",
                                   f"layer.{layer_idx}.attn.o_proj", bias=o_bias)
        self.o_proj.small_rows = True
        self.qk_norm = cfg.qk_norm
        self.norm_eps, self.norm_zc = cfg.rms_norm_eps, cfg.zero_centered_norm
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.zero_centered_norm)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.zero_centered_norm)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(cfg.num_heads * hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.num_kv_heads * hd, cfg.rms_norm_eps)
        self.qkv: Stacked | None = None

    def stack(self) -> None:
        self.qkv = stack_linears([self.q_proj, self.k_proj, self.v_proj])

    def forward(self, *args) -> torch.Tensor:
        """`mix`'s arguments: (x, batch, KV cache, (cos, sin)); the layer's output [T, D]."""
        return self.o_proj(self.mix(*args))

    def mix(
        self,
        x_TD: torch.Tensor,
        batch: ForwardBatch,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        cos_sin: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Everything before `o_proj`: its input [T, H * hd] (the attention, gated)."""
        T = x_TD.shape[0]
        H, KVH, hd = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv is not None:
            q, k, v = self.qkv(x_TD)
        else:
            q, k, v = self.q_proj(x_TD), self.k_proj(x_TD), self.v_proj(x_TD)
        gate = None
        if self.gated:
            q, gate = q.view(T, H, 2 * hd).chunk(2, dim=-1)  # [T, H, hd] each
            gate = gate.reshape(T, H * hd)
        if self.qk_norm == "full":
            q, k = self.q_norm(q.reshape(T, H * hd)), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q_THd = q.reshape(T, H, hd)
        k_THd = k.view(T, KVH, hd)
        v_THd = v.view(T, KVH, hd)
        head_norm = self.qk_norm == "head"
        q_w = self.q_norm.weight if head_norm else None
        k_w = self.k_norm.weight if head_norm else None
        k_cache, v_cache = kv_cache  # [blocks, block_size, KVH, hd]
        flat_k = k_cache.view(-1, KVH, hd)
        flat_v = v_cache.view(-1, KVH, hd)
        scale = hd**-0.5
        meta = batch.decode
        one_kernel = meta is not None and rope_to_cache_usable(q_THd)  # norm, rotary and the cache writes
        if one_kernel:
            q_THd = rope_to_cache(q_THd, k_THd, v_THd, *cos_sin, q_w, k_w, self.norm_eps, self.norm_zc, flat_k,
                                  flat_v, batch.kv_slots_T)
        else:
            q_THd, k_THd = head_norm_rope(q_THd, k_THd, *cos_sin, q_w, k_w, self.norm_eps, self.norm_zc)
        if meta is not None:  # decode fast path: padding rows write the scratch block, attend to nothing
            if not one_kernel:
                flat_k.index_copy_(0, batch.kv_slots_T, k_THd.to(k_cache.dtype))
                flat_v.index_copy_(0, batch.kv_slots_T, v_THd.to(v_cache.dtype))
            out = decode_attention(q_THd, k_cache, v_cache, meta.block_table, meta.state_slots_T,
                                   meta.seq_lens_T, scale)
        else:
            real = batch.num_real_rows
            slots = batch.kv_slots_T[:real]
            flat_k[slots] = k_THd[:real].to(k_cache.dtype)
            flat_v[slots] = v_THd[:real].to(v_cache.dtype)
            out = q_THd.new_zeros(T, H, hd)
            batched = batch.decode_seq_ids and q_THd.is_cuda and paged_attention.triton is not None
            if batched:  # the mixed step's decode rows: one paged-decode kernel for all of them
                rows = batch.decode_rows
                out[rows] = decode_attention(q_THd[rows], k_cache, v_cache, batch.block_table,
                                             batch.decode_state_slots, batch.decode_seq_lens, scale)
            chunks = list(batch.prefill.seq_ids if batch.prefill else []) if batched else range(len(batch.seqs))
            if chunks and cudnn_attention.usable(q_THd):  # long chunks in shapes that repeat: cuDNN
                chunks = self._cudnn_chunks(batch, list(chunks), q_THd, k_THd, v_THd, kv_cache, scale, out)
            if chunks and prefill_attention.usable(q_THd):  # every prompt chunk (or row): one kernel
                prefill_attention.prefill_attention(q_THd, k_cache, v_cache, batch.block_table,
                                                    *chunk_tables(batch, list(chunks), hd), scale, out)
                chunks = []
            for i in chunks:
                seq = batch.seqs[i]
                rows = slice(seq.start, seq.start + seq.num_new)
                out[rows] = _seq_attention(q_THd[rows], k_THd[rows], v_THd[rows], k_cache, v_cache, seq, scale)
        return self._gate(out.reshape(T, H * hd), gate)

    @staticmethod
    def _cudnn_chunks(batch, chunks, q_THd, k_THd, v_THd, kv_cache, scale, out) -> list[int]:
        """Writes the rows of the chunks `cudnn_attention` takes; returns the other chunks."""
        rest = []
        for i in chunks:
            seq = batch.seqs[i]
            if not (cudnn_attention.eligible(seq.num_new, seq.context_len) and cudnn_attention.usable(q_THd)):
                rest.append(i)
                continue
            rows = slice(seq.start, seq.start + seq.num_new)
            k_cache = kv_cache[0]
            try:
                out[rows] = cudnn_attention.chunk_attention(
                    q_THd[rows], k_THd[rows].to(k_cache.dtype), v_THd[rows].to(k_cache.dtype),
                    *cudnn_attention.context(*kv_cache, seq.block_ids, seq.context_len), scale)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as exc:  # cuDNN refused the shape (before launching anything)
                cudnn_attention.give_up(exc)
                rest.append(i)
        return rest

    @staticmethod
    def _gate(attn: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        return sigmoid_gate(attn, gate) if gate is not None else attn


def chunk_tables(batch: ForwardBatch, seq_ids: list[int], hd: int) -> tuple[tuple[torch.Tensor, ...], ...]:
    """The prefill kernel's tiles and per-chunk (start row, rows, cached context, block-table row)
    for the sequences `seq_ids`, on the device: made once per step, shared by every attention layer."""
    block_m = prefill_attention.tile_rows(hd)
    key = ("attention", block_m, tuple(seq_ids))
    if key not in batch.memo:
        pre = [batch.seqs[i] for i in seq_ids]
        lens = [s.num_new for s in pre]
        ctx = [s.context_len for s in pre]
        rows = aligned_device_rows([*prefill_attention.tile_map(lens, block_m, ctx), [s.start for s in pre], lens,
                                    ctx, [s.state_slot for s in pre]],
                                   batch.input_ids_T.device)
        batch.memo[key] = (tuple(rows[:2]), tuple(rows[2:]))
    return batch.memo[key]


def _seq_attention(q_NHd, k_NKd, v_NKd, k_cache, v_cache, seq, scale: float) -> torch.Tensor:
    """One sequence's new rows: a fresh prompt attends to its own keys (causal, no cache read);
    otherwise the cached context plus the new keys are read from its blocks."""
    if seq.context_len == 0:
        return _sdpa(q_NHd, k_NKd.to(q_NHd.dtype), v_NKd.to(q_NHd.dtype), 0, scale)
    keys, values = paged_attention.cached_tokens(k_cache, v_cache, seq.block_ids, seq.total_len)
    return _sdpa(q_NHd, keys, values, seq.context_len, scale)


# cuDNN's attention builds a plan per new shape (about 1 ms of host time a call: prompt chunks come
# in every length); flash and memory-efficient kernels launch at once
_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q_NHd, k_LKd, v_LKd, context_len: int, scale: float) -> torch.Tensor:
    """Causal attention of N new queries (positions context_len..) over L = context_len + N keys."""
    N, H, hd = q_NHd.shape
    L, KVH = k_LKd.shape[0], k_LKd.shape[1]
    rep = H // KVH
    # [1, H, N, hd]: the fused (flash / memory-efficient) kernels take 4-D inputs only; with 3-D ones
    # SDPA falls back to the math kernel, which runs bf16 in float32 (7.8 % of the matmul rate in prefill)
    q = q_NHd.transpose(0, 1)[None]
    k, v = k_LKd.transpose(0, 1)[None], v_LKd.transpose(0, 1)[None]  # [1, KVH, L, hd]
    low = q.dtype not in (torch.float32, torch.float64)
    mask, causal = None, False
    if N > 1 and context_len == 0:
        causal = True  # square causal: lets SDPA pick a flash kernel on GPUs
    elif N > 1 and low:  # a chunk after cached context: causal aligned to the last key (flash too)
        mask = causal_lower_right(N, L)
    elif N > 1:
        key_pos = torch.arange(L, device=q.device)
        query_pos = context_len + torch.arange(N, device=q.device)
        mask = key_pos[None, :] <= query_pos[:, None]  # [N, L]
    # the flash kernel shares KV heads itself (no copies) but takes no boolean mask; float32 keeps
    # the reference arithmetic (heads repeated, as transformers does)
    gqa = rep > 1 and low and (mask is None or isinstance(mask, CausalBias))
    if rep > 1 and not gqa:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    with sdpa_kernel(_NO_CUDNN) if q.is_cuda else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=causal,
                                             scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)  # [N, H, hd]
