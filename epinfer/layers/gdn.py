"""Gated DeltaNet token mixer (Qwen3-Next / Qwen3.5 "linear_attention" layers).

Input projections in the Qwen3.5 layout (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`);
the loader rewrites Qwen3-Next's grouped `in_proj_qkvz` / `in_proj_ba` into it. Then a causal
depthwise conv (kernel K) over q|k|v with silu, the gated delta rule, a gated RMS norm with z,
and `out_proj`.

Per-sequence state lives in the cache at the sequence's `state_slot`: the conv state (the last K-1
conv inputs, `[C, K-1]`) and the recurrent state (`[Hv, dk, dv]`, fp32). A sequence whose
`context_len` is 0 starts from zero state whatever the slot holds. Padding rows belong to no
sequence: nothing is computed, read or written for them, and their output is zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from epinfer.config import ModelConfig
from epinfer.layers.gdn_ops import chunk_gated_delta_rule, recurrent_gated_delta_step
from epinfer.layers.linear import Linear
from epinfer.layers.norm import GatedRMSNorm
from epinfer.runner.batch import ForwardBatch


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_k_heads = cfg.linear_num_key_heads
        self.num_v_heads = cfg.linear_num_value_heads
        self.dk = cfg.linear_key_head_dim
        self.dv = cfg.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.dk
        self.value_dim = self.num_v_heads * self.dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel = cfg.linear_conv_kernel
        D = cfg.hidden_size
        self.in_proj_qkv = Linear(D, self.conv_dim)
        self.in_proj_z = Linear(D, self.value_dim)
        self.in_proj_b = Linear(D, self.num_v_heads)
        self.in_proj_a = Linear(D, self.num_v_heads)
        self.conv1d = nn.Module()
        self.conv1d.weight = nn.Parameter(torch.empty(self.conv_dim, 1, self.kernel))
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_v_heads))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, D)

    def forward(
        self, x_TD: torch.Tensor, batch: ForwardBatch, state: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        conv_state, ssm_state = state  # [slots, C, K-1], [slots, Hv, dk, dv]
        T = x_TD.shape[0]
        qkv_TC = self.in_proj_qkv(x_TD)
        z = self.in_proj_z(x_TD).view(T, self.num_v_heads, self.dv)
        beta_TH = torch.sigmoid(self.in_proj_b(x_TD))
        a = self.in_proj_a(x_TD)
        g_TH = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        w_CK = self.conv1d.weight[:, 0, :]
        core = x_TD.new_zeros(T, self.num_v_heads, self.dv)

        decode_ids = set(batch.decode_seq_ids)
        for i, seq in enumerate(batch.seqs):
            if i in decode_ids:
                continue
            rows = slice(seq.start, seq.start + seq.num_new)
            fresh = seq.context_len == 0
            prev = qkv_TC.new_zeros(self.conv_dim, self.kernel - 1) if fresh \
                else conv_state[seq.state_slot].to(qkv_TC.dtype)
            full_CL = torch.cat([prev, qkv_TC[rows].T], dim=1)  # [C, K-1+N]
            conv_state[seq.state_slot] = full_CL[:, -(self.kernel - 1):].to(conv_state.dtype)
            conv = F.silu(F.conv1d(full_CL[None], self.conv1d.weight, groups=self.conv_dim)[0].T)
            q, k, v = self._split_heads(conv)
            init = None if fresh else ssm_state[seq.state_slot]
            out, final = chunk_gated_delta_rule(q, k, v, g_TH[rows], beta_TH[rows], init)
            ssm_state[seq.state_slot] = final
            core[rows] = out

        if batch.decode_seq_ids:
            rows, slots = batch.decode_rows, batch.decode_state_slots
            prev = conv_state[slots].to(qkv_TC.dtype)  # [B, C, K-1]
            full_BCK = torch.cat([prev, qkv_TC[rows][:, :, None]], dim=2)
            conv_state[slots] = full_BCK[:, :, 1:].to(conv_state.dtype)
            conv = F.silu((full_BCK * w_CK[None]).sum(-1))  # [B, C]
            q, k, v = self._split_heads(conv)
            out, new_state = recurrent_gated_delta_step(
                q, k, v, g_TH[rows], beta_TH[rows], ssm_state[slots]
            )
            ssm_state[slots] = new_state
            core[rows] = out

        normed = self.norm(core.reshape(-1, self.dv), z.reshape(-1, self.dv))
        return self.out_proj(normed.view(T, self.value_dim))

    def _split_heads(self, conv_NC: torch.Tensor):
        N = conv_NC.shape[0]
        q, k, v = torch.split(conv_NC, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        return (q.reshape(N, self.num_k_heads, self.dk), k.reshape(N, self.num_k_heads, self.dk),
                v.reshape(N, self.num_v_heads, self.dv))
