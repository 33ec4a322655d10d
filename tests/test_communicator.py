"""Communicator semantics on Gloo with 3 ranks and uneven sizes (zero rows included): the
variable-size ops built from the uniform ones, all-to-all, objects, and the size check; then the
same ops routed to a group's symmetric buffer (EPINFER_SYMM_MEM's path, a Gloo stand-in here: the
buffer's kernels need GPUs) and back to the plain path for what it declines."""

from __future__ import annotations

import torch
import torch.distributed as dist

from epinfer.distributed import communicator, symmetric
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

    comm.add_plugin(Hook())
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
    _check_symmetric_routing(rank, world, group, comm, x, want)
    return seen


class GlooSymmetric:
    """`symmetric.SymmetricBuffer`'s contract (can_gather / can_sum / all_gather / sum) on Gloo."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def can_gather(self, x):
        return x.numel() > 0

    def can_sum(self, x):
        return x.dtype in symmetric.SUM_DTYPES

    def all_gather(self, x, out):
        self.calls.append("gather")
        communicator._all_gather_tensor(out, x.contiguous(), group=dist.group.WORLD)

    def sum(self, x, out=None):
        self.calls.append("sum")
        y = x.clone()
        dist.all_reduce(y, group=dist.group.WORLD)
        return y if out is None else out.copy_(y)


def _check_symmetric_routing(rank, world, group, comm, x, want) -> None:
    fast = comm.fast[group.name] = GlooSymmetric()
    paths = {}

    class PathHook:
        def before(self, call):
            paths[call.label] = call.path

        def after(self, call):
            pass

    comm.add_plugin(PathHook())
    assert torch.equal(comm.all_gatherv(x, SIZES, group, "s.gatherv"), want)
    full = torch.arange(sum(SIZES) * 2, dtype=torch.float32).view(-1, 2) * (rank + 1)
    mine = comm.reduce_scatterv(full, SIZES, group, "s.rsv")
    lo = sum(SIZES[:rank])
    assert torch.equal(mine, torch.arange(sum(SIZES) * 2, dtype=torch.float32).view(-1, 2)[lo:lo + SIZES[rank]] * 6)
    uni = comm.all_gather(torch.full((2, 2), float(rank)), group, "s.gather")
    assert torch.equal(uni[:, 0], torch.tensor([0.0, 0, 1, 1, 2, 2]))
    assert torch.all(comm.reduce_scatter(torch.ones(world * 2, 1) * (rank + 1), group, "s.rs") == 6.0)
    summed = torch.full((2, 2), float(rank + 1))
    assert comm.all_reduce(summed, group, "s.ar") is summed and torch.all(summed == 6.0)  # in place
    ints = torch.full((2,), rank + 1, dtype=torch.int64)  # no int sum kernel: the plain path
    assert torch.all(comm.all_reduce(ints, group, "s.ar_int") == 6)
    assert fast.calls == ["gather", "sum", "gather", "sum", "sum"], fast.calls
    assert paths == {"s.gatherv": "symm", "s.rsv": "symm", "s.gather": "symm", "s.rs": "symm", "s.ar": "symm",
                     "s.ar_int": "nccl"}, paths
    comm.release_symmetric()
    assert not comm.fast


def test_communicator_ops():
    seen = run_spawned(_check, 3, None, timeout=120, pg_timeout=30)
    assert seen[0] == ["t.gatherv", "t.rsv", "t.gather", "t.rs", "t.a2a", "t.bcast",
                       "s.gatherv", "s.rsv", "s.gather", "s.rs", "s.ar", "s.ar_int"]


def test_symmetric_only_where_possible():
    """--symm-mem takes effect on CUDA only; enabling is a no-op elsewhere (Gloo runs)."""
    cpu = torch.device("cpu")
    assert not symmetric.available(cpu)
    comm = Communicator()
    comm.enable_symmetric([Group("ep", (0, 1), 0, None, None)], cpu, 1 << 20, 60.0)
    assert comm.fast == {}
