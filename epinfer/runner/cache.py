"""The cache layout and tensors: sizes per token and per state slot, and the per-layer tensors.

KV cache: paged, `[num_blocks, block_size, kv_heads, head_dim]` per attention layer; a sequence
reserves all the blocks it can ever need (prompt + max_tokens, capped by the max model length)
when it is admitted, so a running sequence never waits for memory and nothing is preempted.
GDN state: one slot per running sequence (`[slots, C, K-1]` conv, `[slots, Hv, dk, dv]` recurrent,
in the compute dtype unless --mamba-ssm-cache-dtype says otherwise). Blocks and slots are returned
when a sequence ends, and its state slot is zeroed ("reset"), so the next owner can't see stale
state even if a kernel forgot to ignore it. With prefix caching of a hybrid model, rows past the
scratch slot hold snapshots of a sequence's state at a block boundary (`engine.cache`), copied in
and out of running slots.
"""

from __future__ import annotations

import dataclasses

import torch

from epinfer.core.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    block_size: int
    num_blocks: int
    num_state_slots: int
    num_snapshots: int = 0  # GDN state snapshots at block boundaries (prefix caching of hybrid models)
    state_dtype: torch.dtype = torch.float32  # the GDN recurrent state's (the conv state is in the compute dtype)

    @property
    def capacity_tokens(self) -> int:
        return self.block_size * self.num_blocks

    def snapshot_row(self, index: int) -> int:
        """The state row of snapshot `index`: after the running slots and the scratch slot."""
        return self.num_state_slots + 1 + index


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, tp: int = 1) -> int:
    """KV bytes per token on one rank (KV heads are split over TP, at least one per rank)."""
    attn_layers = sum(t == "attention" for t in cfg.layer_types)
    return attn_layers * 2 * max(1, cfg.num_kv_heads // tp) * cfg.head_dim * dtype.itemsize


def state_bytes_per_slot(cfg: ModelConfig, dtype: torch.dtype, tp: int = 1,
                         state_dtype: torch.dtype = torch.float32) -> int:
    """GDN conv (`dtype`) + recurrent (`state_dtype`) state bytes per sequence on one rank (heads
    split over TP)."""
    gdn_layers = sum(t == "linear_attention" for t in cfg.layer_types)
    conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + \
        cfg.linear_num_value_heads * cfg.linear_value_head_dim
    conv = conv_dim * (cfg.linear_conv_kernel - 1) * dtype.itemsize
    ssm = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * state_dtype.itemsize
    return gdn_layers * (conv + ssm) // tp


class CacheTensors:
    """Per-layer cache tensors of this rank's shard: (k, v) for attention layers, (conv, ssm) for
    GDN layers. With `poison` (`--poison-pads`) never-written entries hold NaN instead of 0, so a
    kernel that reads what it shouldn't produces NaN instead of a plausible wrong answer.

    One block and one state slot past the allocator's range are scratch: padding rows of the
    decode fast path (fixed-size, CUDA-graph friendly) write there, and nothing ever reads it."""

    def __init__(self, model, layout: CacheLayout, dtype: torch.dtype, device: torch.device,
                 poison: bool = False) -> None:
        self.fill = float("nan") if poison else 0.0
        self.device = device
        self.per_layer: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.gdn_layers: list[int] = []
        for i, layer in enumerate(model.model.layers):
            if layer.mixer_type == "attention":
                attn = layer.self_attn
                shape = (layout.num_blocks + 1, layout.block_size, attn.num_kv_heads, attn.head_dim)
                self.per_layer.append((torch.full(shape, self.fill, dtype=dtype, device=device),
                                       torch.full(shape, self.fill, dtype=dtype, device=device)))
            else:
                gdn = layer.linear_attn
                slots = layout.num_state_slots + 1 + layout.num_snapshots
                conv = torch.full((slots, gdn.conv_dim, gdn.kernel - 1), self.fill, dtype=dtype,
                                  device=device)
                ssm = torch.full((slots, gdn.num_v_heads, gdn.dk, gdn.dv), self.fill,
                                 dtype=layout.state_dtype, device=device)
                self.per_layer.append((conv, ssm))
                self.gdn_layers.append(i)
        self.states = [t for i in self.gdn_layers for t in self.per_layer[i]]  # conv, recurrent per GDN layer

    def copy_states(self, pairs: list[tuple[int, int]]) -> None:
        """State rows `src` (conv and recurrent, every GDN layer) into rows `dst`, for each pair in
        order (snapshots taken or restored), as one gather and one scatter a tensor: a step of the
        throughput profile takes about 16 snapshots, 60 tensors each. A row written twice keeps the
        later pair's (a step that takes more snapshots than there are rows evicts its own earlier
        ones); no destination may be another pair's source."""
        if not pairs or not self.states:
            return
        last = {dst: src for src, dst in pairs}
        srcs, dsts = tuple(last.values()), tuple(last)
        assert not set(dsts) & set(srcs), f"a state copy's destination is another's source: {pairs}"
        src, dst = self._rows(srcs), self._rows(dsts)
        for t in self.states:
            t.index_copy_(0, dst, t.index_select(0, src))

    def reset_slots(self, slots: list[int]) -> None:
        """State rows `slots` back to the fill value (zeros, or NaN when poisoned)."""
        if slots and self.states:
            rows = self._rows(slots)
            for t in self.states:
                t.index_fill_(0, rows, self.fill)

    def _rows(self, rows) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
