"""Process groups for DP × TP attention with EP MoE, built once and passed explicitly.

Rank r has dp_rank = r // TP and tp_rank = r % TP. Groups (each with a Gloo CPU twin for control
traffic; on CPU the device group is Gloo too):
  - tp: the TP ranks of one DP replica,
  - dp: the ranks with the same tp_rank across replicas,
  - ep: all ranks, DP-major (ep_rank == global rank).
`torch.distributed.new_group` is collective over the world, so every rank creates every group in
the same order and keeps only its own.
"""

from __future__ import annotations

import dataclasses

import torch.distributed as dist

from epinfer.core.layout import check_layout


@dataclasses.dataclass(frozen=True)
class Group:
    name: str  # e.g. "tp[0,1]", "dp[1,3]", "ep"
    ranks: tuple[int, ...]
    rank: int  # this process's index inside the group
    device_group: object | None  # None when the group has one member
    cpu_group: object | None

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclasses.dataclass(frozen=True)
class ParallelGroups:
    world_rank: int  # rank inside this engine's world (== global rank unless tests nest worlds)
    world_size: int
    dp: int
    tp: int
    dp_rank: int
    tp_rank: int
    tp_group: Group
    dp_group: Group
    ep_group: Group
    world_cpu: Group

    @property
    def ep_size(self) -> int:
        return self.world_size


def _name(kind: str, ranks: list[int]) -> str:
    return f"{kind}[{','.join(map(str, ranks))}]"


def build_groups(dp: int, tp: int, device_backend: str,
                 members: list[int] | None = None) -> ParallelGroups | None:
    """Collective over the default group: every process calls it, with the same arguments.

    `members` (default: all processes) are the global ranks forming this engine's world, in
    order; processes outside it get None. Tests use it to run several layouts in one spawn."""
    members = list(range(dist.get_world_size())) if members is None else list(members)
    check_layout(dp, tp, len(members))
    me = dist.get_rank()
    rank = members.index(me) if me in members else None

    def make(kind: str, all_sets: list[list[int]]) -> Group | None:
        mine = None
        for local in all_sets:
            ranks = [members[i] for i in local]
            dev = dist.new_group(ranks, backend=device_backend) if len(ranks) > 1 else None
            cpu = (dist.new_group(ranks, backend="gloo") if device_backend != "gloo" else dev) \
                if len(ranks) > 1 else None
            if rank in local:
                name = "ep" if kind == "ep" else _name(kind, local)
                mine = Group(name, tuple(ranks), local.index(rank), dev, cpu)
        return mine

    world = len(members)
    tp_sets = [[d * tp + t for t in range(tp)] for d in range(dp)]
    dp_sets = [[d * tp + t for d in range(dp)] for t in range(tp)]
    ep_group = make("ep", [list(range(world))])
    tp_group, dp_group = make("tp", tp_sets), make("dp", dp_sets)
    if rank is None:
        return None
    world_cpu = Group("world", ep_group.ranks, ep_group.rank, ep_group.cpu_group, ep_group.cpu_group)
    dp_rank, tp_rank = divmod(rank, tp)
    return ParallelGroups(rank, world, dp, tp, dp_rank, tp_rank, tp_group, dp_group, ep_group, world_cpu)
