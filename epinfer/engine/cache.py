"""Cache accounting (pure Python) and cache tensors.

KV cache: paged, `[num_blocks, block_size, kv_heads, head_dim]` per attention layer; a sequence
reserves all the blocks it can ever need (prompt + max_tokens, capped by the max model length)
when it is admitted, so a running sequence never waits for memory and nothing is preempted.
GDN state: one slot per running sequence (`[slots, C, K-1]` conv, `[slots, Hv, dk, dv]` fp32
recurrent). Blocks and slots are returned when a sequence ends, and its state slot is zeroed
("reset"), so the next owner can't see stale state even if a kernel forgot to ignore it.
"""

from __future__ import annotations

import dataclasses

import torch

from epinfer.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    block_size: int
    num_blocks: int
    num_state_slots: int

    @property
    def capacity_tokens(self) -> int:
        return self.block_size * self.num_blocks


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    attn_layers = sum(t == "attention" for t in cfg.layer_types)
    return attn_layers * 2 * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


def state_bytes_per_slot(cfg: ModelConfig, dtype: torch.dtype) -> int:
    gdn_layers = sum(t == "linear_attention" for t in cfg.layer_types)
    conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + \
        cfg.linear_num_value_heads * cfg.linear_value_head_dim
    conv = conv_dim * (cfg.linear_conv_kernel - 1) * dtype.itemsize
    ssm = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
    return gdn_layers * (conv + ssm)


class CacheAllocator:
    """Free lists of KV blocks and state slots."""

    def __init__(self, layout: CacheLayout) -> None:
        self.layout = layout
        self.free_blocks = list(range(layout.num_blocks - 1, -1, -1))
        self.free_slots = list(range(layout.num_state_slots - 1, -1, -1))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.layout.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return bool(self.free_slots) and self.blocks_for(num_tokens) <= len(self.free_blocks)

    def allocate(self, num_tokens: int) -> tuple[list[int], int]:
        assert self.can_allocate(num_tokens)
        blocks = [self.free_blocks.pop() for _ in range(self.blocks_for(num_tokens))]
        return blocks, self.free_slots.pop()

    def free(self, blocks: list[int], slot: int) -> None:
        self.free_blocks.extend(reversed(blocks))
        self.free_slots.append(slot)


class CacheTensors:
    """Per-layer cache tensors: (k, v) for attention layers, (conv, ssm) for GDN layers."""

    def __init__(self, cfg: ModelConfig, layout: CacheLayout, dtype: torch.dtype,
                 device: torch.device, fill: float = 0.0) -> None:
        self.per_layer: list[tuple[torch.Tensor, torch.Tensor]] = []
        for kind in cfg.layer_types:
            if kind == "attention":
                shape = (layout.num_blocks, layout.block_size, cfg.num_kv_heads, cfg.head_dim)
                self.per_layer.append((torch.full(shape, fill, dtype=dtype, device=device),
                                       torch.full(shape, fill, dtype=dtype, device=device)))
            else:
                conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + \
                    cfg.linear_num_value_heads * cfg.linear_value_head_dim
                conv = torch.zeros(layout.num_state_slots, conv_dim, cfg.linear_conv_kernel - 1,
                                   dtype=dtype, device=device)
                ssm = torch.zeros(layout.num_state_slots, cfg.linear_num_value_heads,
                                  cfg.linear_key_head_dim, cfg.linear_value_head_dim,
                                  dtype=torch.float32, device=device)
                self.per_layer.append((conv, ssm))
        self.layer_types = cfg.layer_types

    def reset_slot(self, slot: int) -> None:
        for kind, (a, b) in zip(self.layer_types, self.per_layer, strict=True):
            if kind == "linear_attention":
                a[slot].zero_()
                b[slot].zero_()
