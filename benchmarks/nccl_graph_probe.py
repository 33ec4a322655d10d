"""Do decode steps with the MoE collectives captured in CUDA graphs complete on NCCL? Stage by
stage, with a timestamped line per phase and every thread's Python stack if a stage stalls:

  1. c10d all-gather + reduce-scatter eager (the dispatcher's pattern, bf16, NCCL)
  2. the same captured in a CUDA graph (capture_error_mode from --mode), replayed 3 times
  3. (--epinfer CKPT) epinfer itself, tiny checkpoint, dp=2, EPINFER_PARALLEL_GRAPHS=1

    python benchmarks/nccl_graph_probe.py [--mode thread_local|global|relaxed] [--graph-register 0|1]
        [--epinfer CKPT]

`--graph-register 0` sets NCCL_GRAPH_REGISTER=0 (NCCL registers captured buffers with the peers
otherwise), one suspect when a captured collective never completes.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STALL_S = 30.0


def say(rank: int, text: str) -> None:
    os.write(2, f"[{time.strftime('%H:%M:%S')}] rank {rank}: {text}\n".encode())


def probe(rank: int, world: int, port: int, mode: str) -> None:
    faulthandler.dump_traceback_later(STALL_S, repeat=True)  # stacks of a stalled rank
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device,
                            init_method=f"tcp://127.0.0.1:{port}", timeout=datetime.timedelta(seconds=120))
    group = dist.new_group(list(range(world)), backend="nccl")
    x = torch.randn(64, 2048, device=device, dtype=torch.bfloat16)
    w = torch.randn(2048, 2048, device=device, dtype=torch.bfloat16)

    def step() -> torch.Tensor:
        gathered = torch.empty(world * x.shape[0], x.shape[1], device=device, dtype=x.dtype)
        dist.all_gather_into_tensor(gathered, x, group=group)
        y = gathered @ w
        out = torch.empty_like(x)
        dist.reduce_scatter_tensor(out, y, group=group)
        return out

    eager = step()
    torch.cuda.synchronize()
    say(rank, f"1. eager ok ({eager.float().norm():.3f})")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    say(rank, "2. side-stream warm-up enqueued; capture begins")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode=mode):
        captured = step()
    say(rank, "2. capture ended")
    for i in range(3):
        graph.replay()
        torch.cuda.synchronize()
        say(rank, f"2. replay {i} ok, equal to eager: {torch.equal(captured, eager)}")
    del graph, captured  # before the group: NCCL waits for graphs holding its collectives to go
    dist.destroy_process_group()
    say(rank, "3. process group destroyed")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="thread_local", choices=["thread_local", "global", "relaxed"])
    ap.add_argument("--graph-register", default=None, choices=["0", "1"])
    ap.add_argument("--epinfer", default=None, help="tiny checkpoint: also run epinfer dp=2 with graphs")
    args = ap.parse_args()
    if args.graph_register is not None:
        os.environ["NCCL_GRAPH_REGISTER"] = args.graph_register
    port = 29000 + os.getpid() % 1000
    mp.spawn(probe, args=(2, port, args.mode), nprocs=2, join=True)
    if args.epinfer:
        os.environ["EPINFER_STACKS_AFTER"] = str(STALL_S)
        from epinfer import SamplingParams
        from epinfer.engine.engine import EngineConfig
        from epinfer.runtime.job import Job
        from epinfer.runtime.launch import launch
        from epinfer.runtime.lockstep import GenerateMode

        params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)] * 2
        job = Job(EngineConfig(model=args.epinfer, dtype="float32", device="cuda", parallel_graphs=True), 2, 1,
                  "agrs", "uniform", collective_timeout=20, mode=GenerateMode([[1, 2, 3], [4, 5]], params))
        outs = launch(job)
        say(0, f"3. epinfer dp=2 with graphs: {[o.token_ids for o in outs]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
