"""Gated DeltaNet token mixer (Qwen3-Next / Qwen3.5 "linear_attention" layers).

Input projections in the Qwen3.5 layout (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`);
the loader rewrites Qwen3-Next's grouped `in_proj_qkvz` / `in_proj_ba` into it. Then a causal
depthwise conv (kernel K) over q|k|v with silu, the gated delta rule, a gated RMS norm with z,
and `out_proj`.

Per-sequence state lives in the cache at the sequence's `state_slot`: the conv state (the last K-1
conv inputs, `[C, K-1]`) and the recurrent state (`[Hv, dk, dv]`, kept in the
compute dtype unless --mamba-ssm-cache-dtype says otherwise; always updated in float32). A sequence whose
`context_len` is 0 starts from zero state whatever the slot holds. Padding rows belong to no
sequence: nothing is computed, read or written for them, and their output is zero.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from epinfer.core.config import ModelConfig
from epinfer.core.forward import ForwardBatch, aligned_device_rows
from epinfer.distributed.parallel import ParallelContext
from epinfer.kernels.fused import fused
from epinfer.kernels.gdn_ops import HAVE_TRITON, conv_triton, recurrent_step_inplace
from epinfer.kernels.gdn_prefill import (
    causal_conv_varlen,
    chunk_rule_varlen,
    conv_norm_fusable,
    conv_taps,
    fla_usable,
    varlen_index,
)
from epinfer.layers.attention import head_rows
from epinfer.layers.linear import Linear, Stacked, row_parallel, set_shard, stack_linears
from epinfer.layers.norm import GatedRMSNorm


@fused
def gdn_gates(a_TH: torch.Tensor, b_TH: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor):
    """(log decay g, fp32; write strength beta)."""
    return -A_log.float().exp() * F.softplus(a_TH.float() + dt_bias), torch.sigmoid(b_TH)


def conv_step_inplace(conv_state: torch.Tensor, slots_B: torch.Tensor, new_BC: torch.Tensor,
                      w_CK: torch.Tensor) -> torch.Tensor:
    """One decode step of the causal depthwise conv, silu(conv) [B, C], shifting `new_BC` into
    `conv_state[slots_B]` in place (one Triton kernel for bf16 / fp16 on CUDA)."""
    if HAVE_TRITON and new_BC.is_cuda and new_BC.dtype in (torch.bfloat16, torch.float16):
        return conv_triton(conv_state, slots_B, new_BC, w_CK)
    full = torch.cat([conv_state[slots_B].to(new_BC.dtype), new_BC[:, :, None]], dim=2)  # [B, C, K]
    conv_state[slots_B] = full[:, :, 1:].to(conv_state.dtype)
    return F.silu((full * w_CK[None]).sum(-1))


class GatedDeltaNet(nn.Module):
    """Key and value heads are split over the TP group; out_proj is row-parallel."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, layer_idx: int) -> None:
        super().__init__()
        tp, rank = ctx.tp_size, ctx.tp_rank
        nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.num_k_heads, self.num_v_heads = nk // tp, nv // tp
        self.dk = dk = cfg.linear_key_head_dim
        self.dv = dv = cfg.linear_value_head_dim
        self.key_dim = self.num_k_heads * dk
        self.value_dim = self.num_v_heads * dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel = cfg.linear_conv_kernel
        D = cfg.hidden_size
        k_heads = range(rank * self.num_k_heads, (rank + 1) * self.num_k_heads)
        v_heads = range(rank * self.num_v_heads, (rank + 1) * self.num_v_heads)
        sharded = tp > 1
        # q | k | v blocks of the full projection, each restricted to this rank's heads
        qkv_rows = head_rows(k_heads, dk) + [nk * dk + r for r in head_rows(k_heads, dk)] + \
            [2 * nk * dk + r for r in head_rows(v_heads, dv)]
        full_conv = 2 * nk * dk + nv * dv
        self.in_proj_qkv = Linear(D, full_conv, out_index=qkv_rows if sharded else None)
        self.in_proj_z = Linear(D, nv * dv, out_index=head_rows(v_heads, dv) if sharded else None)
        self.in_proj_b = Linear(D, nv, out_index=v_heads if sharded else None)
        self.in_proj_a = Linear(D, nv, out_index=v_heads if sharded else None)
        self.conv1d = nn.Module()
        self.conv1d.weight = nn.Parameter(torch.empty(self.conv_dim, 1, self.kernel))
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_v_heads))
        if sharded:
            set_shard(self.conv1d.weight, 0, qkv_rows)
            set_shard(self.A_log, 0, v_heads)
            set_shard(self.dt_bias, 0, v_heads)
        self.norm = GatedRMSNorm(dv, cfg.rms_norm_eps)
        self.out_proj = row_parallel(nv * dv, D, ctx, "linear-attention value dim",
                                     f"layer.{layer_idx}.gdn.out_proj")
        self.out_proj.small_rows = True
        self.in_proj: Stacked | None = None

    def stack(self) -> None:
        """The four input projections read the same rows: one GEMM (low precision only; with FP8
        weights qkv and z, while a and b stay in the compute dtype, `models.fp8`)."""
        self.in_proj = stack_linears([self.in_proj_qkv, self.in_proj_z, self.in_proj_a, self.in_proj_b])

    def project(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """qkv [T, conv_dim], z [T, value_dim], a and b [T, Hv]."""
        if self.in_proj is not None:
            return self.in_proj(x_TD)
        return self.in_proj_qkv(x_TD), self.in_proj_z(x_TD), self.in_proj_a(x_TD), self.in_proj_b(x_TD)

    def forward(
        self, x_TD: torch.Tensor, batch: ForwardBatch, state: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        return self.out_proj(self.mix(x_TD, batch, state))

    def mix(self, x_TD: torch.Tensor, batch: ForwardBatch, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Everything before `out_proj`: its input [T, value_dim] (the rule's output, normed and gated)."""
        conv_state, ssm_state = state  # [slots, C, K-1], [slots, Hv, dk, dv]
        T = x_TD.shape[0]
        qkv_TC, z_TV, a_TH, b_TH = self.project(x_TD)  # (views of one GEMM's output in low precision)
        g_TH, beta_TH = gdn_gates(a_TH, b_TH, self.A_log, self.dt_bias)
        slots = batch.decode_state_slots
        if batch.decode is not None:  # every row decodes, in order (padding rows on the scratch slot): no gathers
            core = self._decode_step(qkv_TC, g_TH, beta_TH, conv_state, ssm_state, slots)
            core = torch.where(batch.decode.row_mask_T[:, None, None], core, 0.0)  # padding rows: zero
        else:
            core = x_TD.new_zeros(T, self.num_v_heads, self.dv)
            self._prefill(batch, qkv_TC, g_TH, beta_TH, conv_state, ssm_state, core)
            if batch.decode_seq_ids:
                rows = batch.decode_rows
                core[rows] = self._decode_step(qkv_TC[rows], g_TH[rows], beta_TH[rows], conv_state, ssm_state, slots)
        normed = self.norm(core, z_TV.view(T, self.num_v_heads, self.dv))
        return normed.view(T, self.value_dim)

    def _decode_step(self, qkv_BC, g_BH, beta_BH, conv_state, ssm_state, slots_B) -> torch.Tensor:
        """One token for each of B sequences, their conv and recurrent states updated in place."""
        conv = conv_step_inplace(conv_state, slots_B, qkv_BC, self.conv1d.weight[:, 0, :])
        q, k, v = self._split_heads(conv)
        return recurrent_step_inplace(q, k, v, g_BH, beta_BH, ssm_state, slots_B)

    def _prefill(self, batch: ForwardBatch, qkv_TC, g_TH, beta_TH, conv_state, ssm_state, core) -> None:
        """Every prompt chunk of the step at once (varlen conv, then the chunked gated delta rule),
        into `core`; their conv and recurrent states updated."""
        meta = batch.prefill
        if meta is None:
            return
        key = ("gdn_conv", self.kernel)
        if key not in meta.memo:
            meta.memo[key] = tuple(t.to(qkv_TC.device, non_blocking=True) for t in conv_taps(meta.lens, self.kernel))
        taps, state_rows = meta.memo[key]
        slots, fresh = meta.state_slots, meta.fresh
        prev = torch.where(fresh[:, None, None], 0.0, conv_state[slots].to(qkv_TC.dtype))
        fused = conv_norm_fusable(qkv_TC, self.key_dim, self.dk)  # q / k L2-normalised in the conv kernel
        x_PC = qkv_TC[meta.rows]
        (q, k, v), new_conv = causal_conv_varlen(x_PC, prev, self.conv1d.weight[:, 0, :], taps,
                                                 state_rows, 2 * self.key_dim if fused else 0, self.dk,
                                                 (self.key_dim, self.key_dim, self.value_dim))
        conv_state.index_copy_(0, slots, new_conv.to(conv_state.dtype))
        if meta.captures:  # a snapshot's conv state: the K-1 inputs before its row
            conv_rows, snapshot_rows = self._capture_rows(meta, x_PC.device)
            conv_state.index_copy_(0, snapshot_rows, x_PC[conv_rows].transpose(1, 2).to(conv_state.dtype))
        q, k, v = self._heads(q, k, v)
        init = torch.where(fresh[:, None, None, None], 0.0, ssm_state[slots])
        capture = [(j, r) for j, r, _ in meta.captures]
        if fla_usable(v) and "fla" not in meta.memo:
            meta.memo["fla"] = varlen_index(meta.lens, v.device, capture)
        out, final, captured = chunk_rule_varlen(q, k, v, g_TH[meta.rows], beta_TH[meta.rows], meta.lens,
                                                 meta.memo.get("fla"), init, fused, capture)
        ssm_state.index_copy_(0, slots, final.to(ssm_state.dtype))
        if captured is not None:
            ssm_state.index_copy_(0, snapshot_rows, captured.to(ssm_state.dtype))
        core[meta.rows] = out.to(core.dtype)

    def _capture_rows(self, meta, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """For the states captured inside this step's chunks: the packed rows of each one's last K-1
        conv inputs [M, K-1] and the state rows they go to [M] (built once a step)."""
        key = ("gdn_capture", self.kernel)
        if key not in meta.memo:
            starts = [0, *itertools.accumulate(meta.lens)]
            k1 = self.kernel - 1
            conv, rows = aligned_device_rows([[starts[j] + r - k1 + m for j, r, _ in meta.captures for m in range(k1)],
                                              [row for *_, row in meta.captures]], device)
            meta.memo[key] = (conv.view(-1, k1), rows)
        return meta.memo[key]

    def _split_heads(self, conv_NC: torch.Tensor):
        return self._heads(*torch.split(conv_NC, [self.key_dim, self.key_dim, self.value_dim], dim=-1))

    def _heads(self, q_NC, k_NC, v_NC):
        """q, k, v [N, columns] as [N, heads, head dim]."""
        N = q_NC.shape[0]
        return (q_NC.reshape(N, self.num_k_heads, self.dk), k_NC.reshape(N, self.num_k_heads, self.dk),
                v_NC.reshape(N, self.num_v_heads, self.dv))
