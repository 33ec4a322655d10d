"""Communicator semantics on Gloo with 3 ranks and uneven sizes (zero rows included): the
variable-size ops built from the uniform ones, all-to-all, objects, and the size check."""

from __future__ import annotations

import torch
import torch.distributed as dist

from epinfer.distributed.communicator import Communicator
from epinfer.distributed.groups import Group
from tests.spawn import run_spawned

SIZES = [2, 0, 3]


def _check(rank: int, world: int, _payload) -> list[str]:
    group = Group("ep", tuple(range(world)), rank, dist.group.WORLD, dist.group.WORLD)
    comm = Communicator()
    seen = []

    class Hook:
        def before(self, call):
            seen.append(call.label)

        def after(self, call):
            pass

    comm.hooks.append(Hook())
    rows = SIZES[rank]
    x = torch.arange(rows * 3, dtype=torch.float32).view(rows, 3) + 100 * rank
    gathered = comm.all_gatherv(x, SIZES, group, "t.gatherv")
    want = torch.cat([torch.arange(n * 3, dtype=torch.float32).view(n, 3) + 100 * r
                      for r, n in enumerate(SIZES)])
    assert torch.equal(gathered, want)
    full = torch.full((sum(SIZES), 2), float(rank + 1))
    mine = comm.reduce_scatterv(full, SIZES, group, "t.rsv")
    assert mine.shape == (rows, 2) and torch.all(mine == 6.0)
    uni = comm.all_gather(torch.full((2, 2), float(rank)), group, "t.gather")
    assert torch.equal(uni[:, 0], torch.tensor([0.0, 0, 1, 1, 2, 2]))
    rs = comm.reduce_scatter(torch.ones(world * 2, 1) * (rank + 1), group, "t.rs")
    assert torch.all(rs == 6.0)
    send = [r + rank for r in range(world)]  # rank sends r + rank rows to rank r
    payload = torch.full((sum(send), 1), float(rank))
    got = comm.all_to_all(payload, send, [rank + s for s in range(world)], group, "t.a2a")
    assert got.view(-1).tolist() == [float(s) for s in range(world) for _ in range(rank + s)]
    obj = comm.broadcast_object({"x": 1} if rank == 1 else None, 1, group, "t.bcast")
    assert obj == {"x": 1}
    try:
        comm.all_gatherv(x, [9, 9, 9], group, "t.bad")
    except RuntimeError as exc:
        assert "t.bad" in str(exc) and "rows" in str(exc)
    else:
        raise AssertionError("size mismatch not detected")
    return seen


def test_communicator_ops():
    seen = run_spawned(_check, 3, None, timeout=120, pg_timeout=30)
    assert seen[0] == ["t.gatherv", "t.rsv", "t.gather", "t.rs", "t.a2a", "t.bcast"]
