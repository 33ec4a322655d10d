"""Cache accounting (pure Python): free lists of KV blocks and GDN state slots. A sequence reserves
every block it can ever need when it is admitted (see `runner.cache` for the layout and tensors)."""

from __future__ import annotations

from epinfer.runner.cache import CacheLayout


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
