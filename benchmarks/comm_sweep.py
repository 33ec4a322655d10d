"""Latency of the MoE dispatch / combine collectives at decode sizes on the GPUs of one machine:
NCCL eagerly and inside a CUDA graph against PyTorch symmetric memory without multicast (peer
pointers over NVLink): the measurement behind epinfer's experimental symmetric-memory path
(EPINFER_SYMM_MEM=1).

Per rows (x [rows, D] bf16 on each rank):
  nccl_ag / nccl_rs        all_gather_into_tensor / reduce_scatter_tensor (graph-replayed)
  nccl_ag_eager            the all-gather issued from the host each time
  symm_ar                  copy into the buffer + one_shot_all_reduce_out of [world * rows, D] (a
                           reduce-scatter that keeps the whole sum: combine = this + a slice)
  symm_ag                  copy own rows into the symmetric buffer, barrier, copy every peer's rows
                           (get_buffer views), barrier (buffer reuse)
Every op is checked against NCCL's result (all-gathers exactly). Rank 0 prints one JSON record per
rows and op with µs per call (CUDA events over a graph of `--reps` calls).

    python benchmarks/comm_sweep.py [--world 2] [--rows 1,2,8,64,128] [--dim 2048]

It measures the raw primitives, so it calls torch.distributed directly (the engine never does:
its collectives go through the communicator). Runs with one GPU too (world 1: checks the APIs,
times are local copies only). Sets TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NCCL_GRAPH_REGISTER=0 (as
epinfer's workers) unless the caller set them.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn, reps: int) -> float:
    """µs per call of fn, replayed `reps` times in one CUDA graph (warm-up and capture first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    graph.reset()
    return start.elapsed_time(end) * 1e3 / (5 * reps)


def _eager(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def _one_size(rank: int, world: int, rows: int, D: int, buf: torch.Tensor, hdl, reps: int) -> dict:
    group = dist.group.WORLD
    name = group.group_name
    torch.manual_seed(rows + rank)
    device = buf.device
    x = torch.randn(rows, D, device=device).bfloat16()
    full = torch.randn(world * rows, D, device=device).bfloat16()
    ag = torch.empty(world * rows, D, dtype=x.dtype, device=device)
    rs = torch.empty(rows, D, dtype=x.dtype, device=device)
    peers = [hdl.get_buffer(r, (rows, D), x.dtype, r * rows * D) for r in range(world)]
    out_ag = torch.empty_like(ag)

    def nccl_ag():
        dist.all_gather_into_tensor(ag, x, group=group)

    def nccl_rs():
        dist.reduce_scatter_tensor(rs, full, group=group)

    staging, summed = buf[: full.numel()].view_as(full), torch.empty_like(full)

    def symm_ar():  # as epinfer's symmetric path: copy in, then the one-shot sum (no copy-in race)
        staging.copy_(full)
        return torch.ops.symm_mem.one_shot_all_reduce_out(staging, "sum", name, summed)

    def symm_ag():
        peers[rank].copy_(x)
        hdl.barrier(channel=0, timeout_ms=10_000)  # a lost peer traps instead of spinning forever
        for r in range(world):
            out_ag[r * rows: (r + 1) * rows].copy_(peers[r])
        hdl.barrier(channel=1, timeout_ms=10_000)

    nccl_ag()
    nccl_rs()
    want_ag, want_rs = ag.clone(), rs.clone()
    symm_ag()
    got_rs = symm_ar()[rank * rows: (rank + 1) * rows]
    torch.cuda.synchronize()
    checks = {"symm_ag_exact": torch.equal(out_ag, want_ag),
              "symm_ar_max_err": (got_rs.float() - want_rs.float()).abs().max().item()}
    times = {"nccl_ag": _timed(nccl_ag, reps), "nccl_rs": _timed(nccl_rs, reps), "nccl_ag_eager": _eager(nccl_ag, reps),
             "symm_ar": _timed(symm_ar, reps), "symm_ag": _timed(symm_ag, reps)}
    return {"rows": rows, "bytes": x.numel() * 2, **{k: round(v, 2) for k, v in times.items()}, **checks}


def run(rank: int, world: int, port: int, args) -> None:
    faulthandler.dump_traceback_later(60, repeat=True)
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device,
                            init_method=f"tcp://127.0.0.1:{port}", timeout=datetime.timedelta(seconds=60))
    import torch.distributed._symmetric_memory as symm_mem

    name = dist.group.WORLD.group_name
    if hasattr(symm_mem, "enable_symm_mem_for_group"):  # a no-op (or absent) in newer torch
        symm_mem.enable_symm_mem_for_group(name)
    rows_list = [int(r) for r in args.rows.split(",")]
    D = args.dim
    cap = world * max(rows_list) * D
    buf = symm_mem.empty(cap, dtype=torch.bfloat16, device=device)
    hdl = symm_mem.rendezvous(buf, name)
    say = (lambda rec: print(json.dumps(rec), flush=True)) if rank == 0 else (lambda rec: None)
    say({"world": world, "multicast": bool(getattr(hdl, "multicast_ptr", 0)), "torch": torch.__version__})
    for rows in rows_list:
        say(_one_size(rank, world, rows, D, buf, hdl, args.reps))
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=0, help="ranks (default: every visible GPU)")
    ap.add_argument("--rows", default="1,2,8,64,128")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    world = args.world or torch.cuda.device_count()
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NCCL_GRAPH_REGISTER", "0")  # as epinfer's workers run captured NCCL
    mp.spawn(run, args=(world, _free_port(), args), nprocs=world, join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
