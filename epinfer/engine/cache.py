"""Cache accounting (pure Python): KV blocks and GDN state slots. A sequence reserves every block it
can ever need when it is admitted (see `runner.cache` for the layout and tensors).

Prefix caching: a full block of prompt tokens whose KV has been computed is registered under the
hash chain of its tokens (its own tokens and its predecessor's hash), so a later request whose
prompt starts with the same blocks reuses them instead of prefilling them again. Blocks carry
reference counts; a cached block no sequence holds stays cached and is evicted least recently
released first, only when a new block is needed. A block is never written while shared: a request
reuses only whole blocks, and at least its last prompt token is always computed, into a block of
its own.

Hybrid models (Gated DeltaNet layers) also need the recurrent and conv state at the reuse point:
a bounded pool of state snapshots, each the state of some sequence right after a block boundary,
keyed by the chain hash of the block ending there and evicted least recently used first. A request
reuses the longest cached prefix that ends at a snapshot; it takes new snapshots where its prefill
passes the end of the cached KV prefix it found (where it branches off earlier prompts: the next
request with that prefix finds the state there) and at its last reusable block (for a later turn
of the same chat). Where the runner can capture a state inside a prompt chunk (`Scheduler`), a
snapshot's row is reserved when the chunk is planned and written by that step's forward; it is found
by later requests only once the step is computed (`ready`), and no other reservation evicts it
meanwhile. Snapshots are copied, never shared, so they need no reference counts. A snapshot
that a request took or started from and then passed with a later one of its own is evicted before
any other, unless a second request started from it (a shared branch point): so a pool about the
size of the chats in flight holds each chat's latest turn.
"""

from __future__ import annotations

import collections
import itertools

from epinfer.runner.cache import CacheLayout


def block_hashes(tokens: list[int], block_size: int) -> list[int]:
    """The hash chain of the full blocks of `tokens` (deterministic across processes: ints only)."""
    out: list[int] = []
    parent = 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start:start + block_size])))
        out.append(parent)
    return out


def reusable_blocks(prompt_len: int, block_size: int) -> int:
    """How many leading full blocks of a prompt may come from the cache: at least its last token is
    computed (its logits are sampled), into a block of its own."""
    return (prompt_len - 1) // block_size


class CacheAllocator:
    """Free lists of KV blocks and state slots, and with `prefix_caching` the cached blocks."""

    def __init__(self, layout: CacheLayout, prefix_caching: bool = False) -> None:
        self.layout = layout
        self.prefix_caching = prefix_caching
        self.free_blocks = list(range(layout.num_blocks - 1, -1, -1))
        self.free_slots = list(range(layout.num_state_slots - 1, -1, -1))
        self.refs = [0] * layout.num_blocks
        self.cached: dict[int, int] = {}  # chain hash -> block
        self.hash_of: dict[int, int] = {}  # block -> chain hash
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # refs 0, cached; LRU first
        self.needs_state = prefix_caching and layout.num_snapshots > 0  # hybrid: reuse needs a snapshot
        self.free_snapshots = list(range(layout.num_snapshots - 1, -1, -1))
        self.snapshots: collections.OrderedDict[int, int] = collections.OrderedDict()  # chain hash -> index; LRU first
        self.restores: dict[int, int] = {}  # chain hash -> requests that started from that snapshot
        # restored by one request only, which then snapshot further along (a chat's earlier turn): evicted first
        self.superseded: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.unready: set[int] = set()  # reserved for a state the step in flight captures
        self.reset_counters()

    def reset_counters(self) -> None:
        """The metrics back to zero (prompt tokens looked up and found, evictions)."""
        self.snapshot_evictions = 0
        self.snapshot_captures = 0  # snapshots taken inside a prompt chunk (no cut there)
        self.queried_tokens = 0  # prompt tokens looked up, and found (metrics)
        self.hit_tokens = 0
        self.evictions = 0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.layout.block_size)

    def match(self, hashes: list[int]) -> list[int]:
        """The cached blocks of the longest cached prefix of `hashes`."""
        if not self.prefix_caching:
            return []
        return [self.cached[h] for h in itertools.takewhile(lambda h: h in self.cached, hashes)]

    def with_state(self, hashes: list[int], kv_blocks: int) -> tuple[int, int | None]:
        """(k, snapshot index): the longest prefix of at most `kv_blocks` blocks whose state is kept
        (k = 0 and None when none is)."""
        for k in range(kv_blocks, 0, -1):
            index = self.snapshots.get(hashes[k - 1])
            if index is not None and hashes[k - 1] not in self.unready:
                self.snapshots.move_to_end(hashes[k - 1])
                return k, index
        return 0, None

    def restored(self, chain_hash: int) -> None:
        """A request was admitted starting from the snapshot `chain_hash` names."""
        self.restores[chain_hash] = self.restores.get(chain_hash, 0) + 1
        self.superseded.pop(chain_hash, None)  # a second taker: a shared branch point after all

    def supersede(self, chain_hash: int) -> None:
        """A request that took or started from `chain_hash` has snapshot further along its chain. If
        no other request started there, it goes first when a snapshot is needed (a chat's next turn
        starts further on; a branch point nobody else reached is worth little)."""
        if chain_hash in self.snapshots and self.restores.get(chain_hash, 0) <= 1:
            self.superseded[chain_hash] = None

    def take_snapshot(self, chain_hash: int) -> int | None:
        """A snapshot index to hold the state after the block `chain_hash` names (when none is free:
        a superseded one evicted, else the least recently used); None when that state is kept already."""
        if chain_hash in self.snapshots:
            self.snapshots.move_to_end(chain_hash)
            return None
        index = self._snapshot_row(spare_unready=False)
        self.snapshots[chain_hash] = index
        return index

    def reserve_snapshot(self, chain_hash: int) -> int | None:
        """A snapshot index for the state after the block `chain_hash` names, captured by the coming
        step's forward (`chain_hash` not kept yet); found by requests once `ready`. None when every
        index is reserved so (the caller cuts its chunk there instead)."""
        assert chain_hash not in self.snapshots
        if not self.free_snapshots and len(self.unready) >= len(self.snapshots):
            return None
        self.snapshots[chain_hash] = self._snapshot_row(spare_unready=True)
        self.unready.add(chain_hash)
        self.snapshot_captures += 1
        return self.snapshots[chain_hash]

    def ready(self, chain_hash: int) -> None:
        """The step that captured `chain_hash`'s state is computed: later requests may restore it."""
        self.unready.discard(chain_hash)

    def _snapshot_row(self, spare_unready: bool) -> int:
        """A free snapshot index, else one evicted: a superseded snapshot first, then the least
        recently used (with `spare_unready`, never one a step in flight is writing)."""
        if self.free_snapshots:
            return self.free_snapshots.pop()
        candidates = itertools.chain(self.superseded, self.snapshots)
        victim = next(h for h in candidates if not (spare_unready and h in self.unready))
        index = self.snapshots.pop(victim)
        self.superseded.pop(victim, None)
        self.restores.pop(victim, None)
        self.unready.discard(victim)
        self.snapshot_evictions += 1
        return index

    def can_allocate(self, num_tokens: int, prefix: list[int] = ()) -> bool:
        idle_reused = sum(1 for b in prefix if self.refs[b] == 0)  # evictable now, but about to be held
        room = len(self.free_blocks) + len(self.evictable) - idle_reused
        return bool(self.free_slots) and self.blocks_for(num_tokens) - len(prefix) <= room

    def allocate(self, num_tokens: int, prefix: list[int] = (), prompt_len: int = 0) -> tuple[list[int], int]:
        """Blocks for `num_tokens` (the `prefix` blocks first, shared) and a state slot; a request's
        `prompt_len` counts as looked up, its prefix as found."""
        assert self.can_allocate(num_tokens, prefix)
        if self.prefix_caching:
            self.queried_tokens += prompt_len
            self.hit_tokens += len(prefix) * self.layout.block_size
        for b in prefix:
            if self.refs[b] == 0:
                del self.evictable[b]
            self.refs[b] += 1
        blocks = list(prefix) + [self._take() for _ in range(self.blocks_for(num_tokens) - len(prefix))]
        return blocks, self.free_slots.pop()

    def _take(self) -> int:
        if self.free_blocks:
            b = self.free_blocks.pop()
        else:  # the least recently released cached block
            b, _ = self.evictable.popitem(last=False)
            del self.cached[self.hash_of.pop(b)]
            self.evictions += 1
        self.refs[b] = 1
        return b

    def register(self, block: int, chain_hash: int) -> None:
        """`block` now holds the KV of the full block `chain_hash` names."""
        if self.prefix_caching and chain_hash not in self.cached and block not in self.hash_of:
            self.cached[chain_hash] = block
            self.hash_of[block] = chain_hash

    def free(self, blocks: list[int], slot: int) -> None:
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.hash_of:
                    self.evictable[b] = None  # most recently released last
                else:
                    self.free_blocks.append(b)
        self.free_slots.append(slot)

    def clear_prefix_cache(self) -> int:
        """Forgets every cached block no sequence holds (they become free); returns how many."""
        dropped = list(self.evictable)
        for b in dropped:
            del self.cached[self.hash_of.pop(b)]
        self.evictable.clear()
        self.free_blocks.extend(dropped)
        self.forget_snapshots()
        return len(dropped)

    def forget_snapshots(self) -> None:
        """Every state snapshot freed (a step that was to write or copy some of them failed: none is
        trusted); cached KV blocks stay, and a hybrid model reuses them again once it snapshots anew."""
        self.free_snapshots.extend(self.snapshots.values())
        self.snapshots.clear()
        self.restores.clear()
        self.superseded.clear()
        self.unready.clear()

    def stats(self) -> dict:
        return {"prefix_cache_queries": self.queried_tokens, "prefix_cache_hits": self.hit_tokens,
                "cached_blocks": len(self.cached), "evictions": self.evictions,
                "state_snapshots": len(self.snapshots), "snapshot_evictions": self.snapshot_evictions,
                "snapshot_captures": self.snapshot_captures,
                "free_blocks": len(self.free_blocks) + len(self.evictable)}
