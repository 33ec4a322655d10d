"""Run a function on N spawned Gloo ranks (or NCCL ranks, one GPU each) with a hard timeout (a hang
fails the test, it never stalls CI). Spawning costs seconds, so tests pass many cases to one spawn."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import pickle
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


def _entry(rank: int, world: int, port: int, fn, payload, out_dir: str, pg_timeout: float,
           backend: str = "gloo") -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    extra = {}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        extra["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=pg_timeout), **extra)
    try:
        result = ("ok", fn(rank, world, payload))
    except BaseException as exc:  # reported to the test, which fails with it
        result = ("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    dist.destroy_process_group()


def run_spawned(fn, world: int, payload, timeout: float = 300.0, pg_timeout: float = 60.0,
                backend: str = "gloo") -> list:
    """Returns each rank's return value; raises AssertionError on an error or a timeout."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_entry, args=(r, world, store.port, fn, payload, out_dir, pg_timeout, backend))
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.time() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.time()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for r in range(world):
            path = Path(out_dir, f"rank{r}.pkl")
            results.append(pickle.loads(path.read_bytes()) if path.exists() else ("missing", None))
    errors = [res[1] for res in results if res[0] == "error"]
    assert not errors, "\n".join(errors)
    assert not hung, f"ranks {hung} still running after {timeout} s (hang)"
    missing = [r for r, res in enumerate(results) if res[0] != "ok"]
    assert not missing, f"ranks {missing} died without a result (exit codes {[p.exitcode for p in procs]})"
    return [res[1] for res in results]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


