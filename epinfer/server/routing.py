"""Which DP replica a new request goes to (decided on world rank 0, from numbers every replica
reported in `serve.sync`, so routing never waits on a replica).

Load: each replica's outstanding tokens (prompt tokens not yet prefilled + tokens still to
generate); a request adds its own to the replica it is routed to before the next one is routed.

Prefix affinity (models with prefix caching): rank 0 keeps, per replica, the hash chains of the
prompt blocks it routed there (bounded, least recently routed dropped first: an approximation of
that replica's cache, which holds what it prefilled). A request goes to the replica that holds the
longest prefix of it — unless that replica is much more loaded than the least loaded one:

    prefix replica's outstanding > 2 x least outstanding + AFFINITY_SLACK tokens  ->  least loaded

Without a cached prefix anywhere (or without prefix caching) it is the least loaded replica; ties
go to the lowest index.
"""

from __future__ import annotations

import collections
import itertools

from epinfer.engine.cache import block_hashes, reusable_blocks

AFFINITY_SLACK = 8192  # tokens: a replica this much busier than twice the lightest one loses affinity


def pick_replica(outstanding: list[int]) -> int:
    """The replica with the fewest outstanding tokens; ties go to the lowest index."""
    return min(range(len(outstanding)), key=lambda r: (outstanding[r], r))


def too_loaded(load: int, lightest: int) -> bool:
    return load > 2 * lightest + AFFINITY_SLACK


class Router:
    """`prefix_blocks`: how many block hashes to remember per replica (0: route by load only)."""

    def __init__(self, dp: int, block_size: int, prefix_blocks: int = 0) -> None:
        self.block_size = block_size
        self.capacity = prefix_blocks
        self.known: list[collections.OrderedDict[int, None]] = [collections.OrderedDict() for _ in range(dp)]

    def cached_blocks(self, replica: int, hashes: list[int]) -> int:
        return sum(1 for _ in itertools.takewhile(lambda h: h in self.known[replica], hashes))

    def route(self, outstanding: list[int], requests: list[tuple]) -> list[int]:
        """Replica per request (items `(rid, ids, params, logprobs)`), in arrival order."""
        load = list(outstanding)
        replicas = []
        for _, ids, params, _ in requests:
            hashes = block_hashes(ids, self.block_size)[:reusable_blocks(len(ids), self.block_size)] \
                if self.capacity else []
            lightest = pick_replica(load)
            r = lightest
            if hashes:
                held = [self.cached_blocks(i, hashes) for i in range(len(load))]
                best = max(range(len(load)), key=lambda i: (held[i], -load[i], -i))
                if held[best] and not too_loaded(load[best], load[lightest]):
                    r = best
                self.remember(r, hashes)
            load[r] += len(ids) + params.max_tokens
            replicas.append(r)
        return replicas

    def remember(self, replica: int, hashes: list[int]) -> None:
        known = self.known[replica]
        for h in hashes:
            known[h] = None
            known.move_to_end(h)
        while len(known) > self.capacity:
            known.popitem(last=False)
