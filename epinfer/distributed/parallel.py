"""`ParallelContext`: what a layer needs to know about parallelism — its TP / EP position, the
communicator, and the chosen dispatcher and padding mode. One object, passed explicitly; the
single-process context has no groups and issues no collectives."""

from __future__ import annotations

import dataclasses

from epinfer.core.errors import UserError
from epinfer.core.layout import DISPATCHERS, PADDING_MODES
from epinfer.distributed.communicator import Communicator
from epinfer.distributed.groups import ParallelGroups


@dataclasses.dataclass
class ParallelContext:
    groups: ParallelGroups | None = None
    comm: Communicator | None = None
    expert_parallel: bool = True
    dispatch: str = "agrs"
    dp_padding: str = "uniform"
    poison_pads: bool = False
    eager_only: bool = False  # a diagnostic runs Python per layer or per collective: no CUDA graphs

    def __post_init__(self) -> None:
        if self.dispatch not in DISPATCHERS:
            raise UserError(f"unknown dispatcher {self.dispatch!r}; valid: {', '.join(DISPATCHERS)}")
        if self.dp_padding not in PADDING_MODES:
            raise UserError(f"unknown --dp-padding {self.dp_padding!r}; valid: {', '.join(PADDING_MODES)}")

    @property
    def tp_size(self) -> int:
        return self.groups.tp if self.groups else 1

    @property
    def tp_rank(self) -> int:
        return self.groups.tp_rank if self.groups else 0

    @property
    def dp_size(self) -> int:
        return self.groups.dp if self.groups else 1

    @property
    def dp_rank(self) -> int:
        return self.groups.dp_rank if self.groups else 0

    @property
    def ep_size(self) -> int:
        return self.groups.world_size if (self.groups and self.expert_parallel) else 1

    @property
    def ep_rank(self) -> int:
        return self.groups.world_rank if (self.groups and self.expert_parallel) else 0

    @property
    def sequence_parallel(self) -> bool:
        """MoE runs on a 1/TP slice of the rows when TP > 1, DP > 1 and EP is on."""
        return self.expert_parallel and self.tp_size > 1 and self.dp_size > 1

    @property
    def replicated_moe(self) -> bool:
        """EP over the TP ranks of a single replica (DP = 1): every rank already holds all the rows, so
        each runs its own experts on them and one TP all-reduce sums the partial outputs — no
        dispatch, no row slicing or padding, 2 collectives a layer instead of 4."""
        return self.expert_parallel and self.tp_size > 1 and self.dp_size == 1


def split_evenly(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` when `total` items are split over `parts`, the first
    `total % parts` parts holding one more."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def shard_range(total: int, tp_size: int, tp_rank: int, what: str) -> range:
    if total % tp_size:
        raise UserError(f"{what} ({total}) is not divisible by --tp {tp_size}")
    size = total // tp_size
    return range(tp_rank * size, (tp_rank + 1) * size)
