"""The decoder-only MoE language model shared by every supported family.

The families differ only in flags carried by `ModelConfig` (token mixer per layer, q/k norm kind,
output gate, zero-centred norms, shared expert, dense layers), so one model class serves all of
them; parameter names follow the Hugging Face module tree so checkpoints map one to one.

It does not schedule, sample or own caches: it computes hidden states for a `ForwardBatch` and
logits for chosen rows.
"""

from __future__ import annotations

import torch
from torch import nn

from epinfer.core.config import ModelConfig
from epinfer.core.forward import ForwardBatch
from epinfer.distributed.parallel import ParallelContext
from epinfer.layers.attention import Attention
from epinfer.layers.gdn import GatedDeltaNet
from epinfer.layers.linear import GatedMLP, Linear
from epinfer.layers.moe import MoEBlock
from epinfer.layers.norm import RMSNorm
from epinfer.layers.rotary import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer_type = cfg.layer_types[layer_idx]
        if self.mixer_type == "attention":
            self.self_attn = Attention(cfg, ctx, layer_idx)
        else:
            self.linear_attn = GatedDeltaNet(cfg, ctx, layer_idx)
        if cfg.mlp_types[layer_idx] == "moe":
            self.mlp = MoEBlock(cfg, ctx, layer_idx)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, ctx, f"layer.{layer_idx}.mlp")
        zc = cfg.zero_centered_norm
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, zc)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, zc)

    def forward(self, x_TD, residual_TD, batch: ForwardBatch, cache, cos_sin):
        """(x, mlp output): the caller adds them, fused with the next norm. `residual_TD`: the
        previous layer's mlp output, None for the first layer; [T, K, D] when it is the experts'
        unsummed per-pair outputs (MoEBlock)."""
        x_TD, h = self.enter(x_TD, residual_TD)
        if self.mixer_type == "attention":  # (the modules' own calls: diagnostics hook them)
            h = self.self_attn(h, batch, cache, cos_sin)
        else:
            h = self.linear_attn(h, batch, cache)
        return self.finish(x_TD, h, batch)

    def enter(self, x_TD, residual_TD):
        """(x + residual, its input norm)."""
        if residual_TD is None:
            return x_TD, self.input_layernorm(x_TD)
        return self.input_layernorm.add_forward(x_TD, residual_TD)

    def mix(self, h_TD, batch: ForwardBatch, cache, cos_sin):
        """The token mixer up to its output projection: the part that reads the step's sequences
        and caches (graph pieces run it eagerly, `runner.piecewise`)."""
        if self.mixer_type == "attention":
            return self.self_attn.mix(h_TD, batch, cache, cos_sin)
        return self.linear_attn.mix(h_TD, batch, cache)

    def leave(self, x_TD, mixed, batch: ForwardBatch):
        """The mixer's output projection, the residual add and norm, and the mlp: per row only."""
        return self.finish(x_TD, self.mixer_out_proj(mixed), batch)

    def finish(self, x_TD, mixer_out, batch: ForwardBatch):
        x_TD, h = self.post_attention_layernorm.add_forward(x_TD, mixer_out)
        if isinstance(self.mlp, MoEBlock):
            return x_TD, self.mlp(h, batch)
        return x_TD, self.mlp(h)

    @property
    def mixer_out_proj(self) -> Linear:
        return self.self_attn.o_proj if self.mixer_type == "attention" else self.linear_attn.out_proj


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        # replicated on every TP rank: a lookup needs no collective (see CausalLM)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ctx, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.zero_centered_norm)


class CausalLM(nn.Module):
    """Embeddings and LM head are replicated, not vocab-sharded: the lookup and the logits then
    need no collective, and only TP rank 0 (the replica's scheduler) computes logits at all."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext | None = None) -> None:
        super().__init__()
        ctx = ctx or ParallelContext()
        self.config = cfg
        self.ctx = ctx
        self.model = Model(cfg, ctx)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.lm_head.small_rows = True
        self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta)

    def forward(self, batch: ForwardBatch, caches: list) -> torch.Tensor:
        """Hidden states after the final norm, [T, D]; padding rows are zero on entry."""
        x, cos_sin = self.embed(batch)
        h = None
        for layer, cache in zip(self.model.layers, caches, strict=True):
            x, h = layer(x, h, batch, cache, cos_sin)
        return self.model.norm.add_forward(x, h)[1]

    def embed(self, batch: ForwardBatch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(the rows' embeddings, padding rows filled; the rotary tables of their positions)."""
        x = self.model.embed_tokens(batch.input_ids_T)
        fill = float("nan") if self.ctx.poison_pads else 0.0  # NaN proves nothing reads padding rows
        if batch.decode is not None:  # padding decided on the device (a CUDA graph replays any count)
            x = torch.where(batch.decode.row_mask_T[:, None], x, fill)
        elif batch.num_real_rows < batch.num_rows:
            x[batch.num_real_rows:] = fill
        return x, self.rotary.cos_sin(batch.positions_T, x.dtype)

    def compute_logits(self, hidden_SD: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits [S, V]; `out`: the [S, V] float32 buffer to write them into."""
        logits = self.lm_head(hidden_SD)
        return logits.float() if out is None else out.copy_(logits)
