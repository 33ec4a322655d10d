"""`--check-collectives`: a communicator plugin that compares every device collective across the
group before it is issued.

Ranks exchange (op, label, dtypes, shapes, sizes) over the group's CPU twin first; on any
difference every rank raises the same `CollectiveMismatch` naming the differing ranks and fields,
an error instead of a hang. It is part of the communicator's stack (the one bare CPU exchange it
makes is the check itself) and costs a CPU round trip per collective: a debugging mode, which
also rules out CUDA graphs (it must see every collective).
"""

from __future__ import annotations

import torch.distributed as dist


class CollectiveMismatch(RuntimeError):
    """Raised on every rank by the pre-flight check when ranks disagree about a collective."""


class FingerprintCheck:

    def before(self, call) -> None:
        if not call.device:
            return
        shapes = [s[1:] for s in call.shapes] if call.op == "all_to_all" else call.shapes
        mine = (call.op, call.label, call.dtypes, shapes, None if call.op == "all_to_all" else call.sizes)
        prints: list = [None] * call.group.size
        dist.all_gather_object(prints, mine, group=call.group.cpu_group)
        if all(p == prints[0] for p in prints):
            return
        keys = [repr(p) for p in prints]
        majority = max(set(keys), key=keys.count)
        odd = [call.group.ranks[i] for i, k in enumerate(keys) if k != majority]
        fields = ("op", "label", "dtypes", "shapes", "sizes")
        ref = prints[keys.index(majority)]
        diffs = []
        for i, p in enumerate(prints):
            if keys[i] != majority:
                diffs += [f"rank {call.group.ranks[i]} {f}={p[j]!r} (others {ref[j]!r})"
                          for j, f in enumerate(fields) if p[j] != ref[j]]
        raise CollectiveMismatch(f"collective mismatch in {call.group.name} before {ref[1]}: ranks {odd} "
                                 f"differ: {'; '.join(diffs[:4])}")
