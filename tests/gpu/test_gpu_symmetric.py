"""Two GPUs: the communicator's symmetric-memory path (EPINFER_SYMM_MEM=1, `distributed/symmetric.py`)
gives bitwise NCCL's results for every op the MoE and TP layers use — all-gather (bf16, packed
bytes), the size-checked v-variants, reduce-scatter and all-reduce (bf16, fp32) — eagerly and
replayed in a CUDA graph with new inputs each time (a race between ranks would show as stale data).
With two ranks a sum is one addition whatever the order, so NCCL's result is exact to compare with."""

from __future__ import annotations

import pytest
import torch

from tests.spawn import run_spawned

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


def _compare(rank: int, world: int, _payload) -> int:
    import torch.distributed as dist

    from epinfer.distributed.communicator import Communicator
    from epinfer.distributed.groups import Group

    device = torch.device("cuda", rank)
    cpu = dist.new_group(backend="gloo")
    group = Group("ep", tuple(range(world)), rank, dist.group.WORLD, cpu)
    plain, fast = Communicator(), Communicator()
    fast.enable_symmetric([group], device, 1 << 20, 60.0)
    assert group.name in fast.fast
    paths: list[str] = []

    class Paths:
        def before(self, call):
            paths.append(call.path)

        def after(self, call):
            pass

    fast.add_plugin(Paths())
    gen = torch.Generator(device=device).manual_seed(rank)
    checked = 0

    def ops(comm, x, full, sizes):
        mine = x[: sizes[rank]]
        return [comm.all_gather(x, group, "g"), comm.all_gatherv(mine, sizes, group, "gv"),
                comm.all_gather(x.view(torch.uint8), group, "bytes"), comm.reduce_scatter(full, group, "rs"),
                comm.reduce_scatterv(full[: sum(sizes)], sizes, group, "rsv"),
                comm.all_reduce(x.clone(), group, "ar"), comm.all_reduce(x.float(), group, "ar32")]

    for rows, sizes in ((1, [1, 1]), (3, [3, 2]), (64, [64, 64])):
        x = torch.randn(rows, 2048, device=device, generator=gen).bfloat16()
        full = torch.randn(world * rows, 2048, device=device, generator=gen).bfloat16()
        want, got = ops(plain, x, full, sizes), ops(fast, x, full, sizes)
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True)), f"eager, {rows} rows"
        assert paths == ["symm"] * 7, paths  # every op really took the symmetric path
        paths.clear()
        checked += len(want)
        # the same in a CUDA graph, replayed with fresh inputs
        sx, sfull = x.clone(), full.clone()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            ops(fast, sx, sfull, sizes)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outs = ops(fast, sx, sfull, sizes)
        paths.clear()
        for _ in range(10):
            sx.copy_(torch.randn(sx.shape, device=device, generator=gen).bfloat16())
            sfull.copy_(torch.randn(sfull.shape, device=device, generator=gen).bfloat16())
            graph.replay()
            want = ops(plain, sx, sfull, sizes)
            assert all(torch.equal(a, b) for a, b in zip(want, outs, strict=True)), f"graph, {rows} rows"
            checked += len(want)
        graph.reset()
    fast.release_symmetric()
    return checked


@pytest.mark.timeout(240)
def test_symmetric_path_equals_nccl():
    checked = run_spawned(_compare, 2, None, timeout=200, backend="nccl")
    assert checked == [7 * 33] * 2
