"""One rank of a parallel run, start to finish: the process group, the parallel context, the
diagnostics (ledger, watchdog, fault injection, numerics) attached as plugins and hooks, the
engine, then the job's mode (`runtime.job`); teardown stays watched.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import re
import signal

import torch
import torch.distributed as dist

from epinfer.core.env import SWITCHES
from epinfer.core.errors import UserError
from epinfer.diagnostics.faults import FaultInjector
from epinfer.diagnostics.ledger import Ledger
from epinfer.diagnostics.numerics import NumericsMonitor
from epinfer.diagnostics.watchdog import READY_KEY, Watchdog, log_line, write_dumps
from epinfer.distributed.communicator import Communicator
from epinfer.distributed.fingerprint import FingerprintCheck
from epinfer.distributed.groups import build_groups
from epinfer.distributed.parallel import ParallelContext
from epinfer.engine.device import async_default, resolve_device
from epinfer.engine.engine import Engine, freeze_heap
from epinfer.runtime.job import Job, RankRuntime

TEARDOWN_S = 60.0  # longest wait for the process group to shut down once the run is over


def make_context(job: Job, backend: str, members: list[int] | None = None) -> ParallelContext | None:
    groups = build_groups(job.dp, job.tp, backend, members)
    if groups is None:
        return None
    eager_only = bool(job.check_collectives or job.check_numerics or job.fault)  # diagnostics run per layer / call
    return ParallelContext(groups, Communicator(), job.expert_parallel, job.dispatch, job.dp_padding,
                           job.poison_pads, eager_only)


# what changes the collective schedule: every rank must have the same (flags and environment alike)
AGREED = ("dispatch", "dp_padding", "expert_parallel", "check_collectives", "symm_mem", "symm_mem_bytes",
          "engine.parallel_graphs", "engine.cuda_graphs", "engine.async_scheduling")


def agree_settings(ctx: ParallelContext, job: Job, device: torch.device) -> None:
    """One all-reduce at start-up (`settings.agree`) of every AGREED setting and its square: each
    rank sees the same sums, so every rank finds the same differences and raises the same one-line
    error (all values equal iff world * sum(v^2) == sum(v)^2)."""
    def value(name: str) -> int:
        obj = job.engine if name.startswith("engine.") else job
        v = getattr(obj, name.removeprefix("engine."))
        if name == "engine.async_scheduling":
            v = async_default(job.engine, device)
        return {"agrs": 0, "alltoall": 1, "naive": 2, "uniform": 0, "none": 1}.get(v, v) if isinstance(v, str) \
            else int(v)

    mine = [value(name) for name in AGREED]
    sums = ctx.comm.all_reduce_cpu(torch.tensor(mine + [v * v for v in mine], dtype=torch.int64),
                                   ctx.groups.world_cpu, "settings.agree").tolist()
    world, n = ctx.groups.world_size, len(AGREED)
    differ = [name for i, name in enumerate(AGREED) if world * sums[n + i] != sums[i] ** 2]
    if differ:
        flags = ", ".join("--" + name.removeprefix("engine.").replace("_", "-") for name in differ)
        raise UserError(f"the ranks of this run disagree on {flags}: give every rank the same flags "
                        "(and EPINFER_PARALLEL_GRAPHS / EPINFER_SYMM_MEM / EPINFER_SYMM_MEM_BYTES alike)")


def backend_for(device: torch.device) -> str:
    return {"cuda": "nccl", "xpu": "xccl"}.get(device.type, "gloo")


def rank_device(name: str, local_rank: int) -> torch.device:
    """One device per rank: accelerator `local_rank` of this host."""
    device = resolve_device(name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type == "xpu":
        device = torch.device("xpu", local_rank)
    return device


class JoinTimeout(RuntimeError):
    """The ranks never all reached the process group: one stuck, stopped or lost while starting."""


def join_process_group(kwargs: dict) -> None:
    """`init_process_group`, its rendezvous timeout said plainly: the store's own error names only
    the key it waited for."""
    try:
        dist.init_process_group(**kwargs)
    except RuntimeError as exc:  # (torch's DistStoreError)
        if "timeout" not in str(exc).lower():
            raise
        seconds = kwargs["timeout"].total_seconds()
        raise JoinTimeout(f"the {kwargs['world_size']} ranks did not all join the process group within "
                          f"{seconds:.0f} s: a rank stuck, stopped or lost while starting") from None


def worker_main(rank: int, world_size: int, local_rank: int, job: Job, store=None) -> list | None:
    """Runs one rank to completion; returns the outputs on rank 0. `store`: the launcher's
    rendezvous store (spawned ranks); None under torchrun (env:// rendezvous)."""
    threads = max(1, (os.cpu_count() or 1) // max(1, min(world_size, os.cpu_count() or 1)))
    torch.set_num_threads(threads)
    device = rank_device(job.engine.device, local_rank)
    backend = backend_for(device)
    timeout = job.collective_timeout or (600.0 if device.type != "cpu" else 60.0)
    # the backend's own timeout is a last resort: the watchdog fires first and says why
    kwargs = dict(backend=backend, rank=rank, world_size=world_size,
                  timeout=datetime.timedelta(seconds=2 * timeout + 60))
    if store is not None:
        kwargs["store"] = store
    else:
        kwargs["init_method"] = "env://"
    if device.type != "cpu":
        kwargs["device_id"] = device
        if job.engine.parallel_graphs:  # no NCCL buffer registration at capture:
            os.environ.setdefault("NCCL_GRAPH_REGISTER", "0")  # graph-captured outputs come from a pool
    join_process_group(kwargs)
    ctx = make_context(job, backend)
    ledger, watchdog, dump_dir = start_diagnostics(rank, ctx, job, timeout, device)
    if SWITCHES.stacks_after:  # debugging a hang: every thread's stack, repeatedly
        faulthandler.dump_traceback_later(SWITCHES.stacks_after, repeat=True)
    try:
        agree_settings(ctx, job, device)
        groups = ctx.groups  # --symm-mem: symmetric buffers for the small TP / EP collectives,
        if job.symm_mem and not job.fault:  # (a mis-sized collective under fault injection would pair stray signals)
            ctx.comm.enable_symmetric([groups.tp_group, groups.ep_group], device, job.symm_mem_bytes, timeout)
        engine = Engine(job.engine, ctx, device)
        engine.runner.agree_graphs(ctx)
        attach_forward_hooks(engine.runner.model, ctx)
        freeze_heap()  # this rank's engine lives as long as the process
        outputs = job.mode(engine, ctx, RankRuntime(rank, watchdog, job.progress))
    except UserError:
        watchdog.stop()
        raise
    except Exception as exc:  # a backend error, a mismatch caught by the pre-check, a bug
        cur = ledger.current
        where = f" in {cur['label']} ({cur['group']} seq {cur['seq']}, step {ledger.step})" if cur else ""
        text = " ".join(str(exc).split()).split(" This is typically")[0]
        text = re.sub(r"\[[^\]\s]*\.(?:cc|cpp|h|hpp):\d+\] ", "", text)[:300]  # no backend source paths
        watchdog.fire(f"{type(exc).__name__}{where}: {text}", status="error")  # the doctor's `error` verdict
        watchdog.await_exit()  # the watchdog thread was already firing (a peer's abort): it exits the process
    if job.dump_dir:
        try:
            ledger.dump(dump_dir, "ok")
        except OSError as exc:  # the run itself succeeded: its results still count
            log_line(f"epinfer: rank {rank}: warning: could not write its ledger to {dump_dir}: {exc.strerror or exc}")
    for line in finish_reports(ctx, ledger):
        log_line(f"epinfer: rank {rank}: {line}")
    # teardown stays watched: graphs holding NCCL collectives go first (NCCL waits for them), and a
    # process group that still does not shut down is reported instead of hanging silently
    watchdog.tearing_down(min(timeout, TEARDOWN_S))
    if engine.runner.graphs is not None:
        engine.runner.graphs.release()
    ctx.comm.release_symmetric()
    dist.destroy_process_group()
    watchdog.stop()
    return outputs


def start_diagnostics(rank: int, ctx: ParallelContext, job: Job, timeout: float, device=None):
    """Ledger (always), fault injector and numerics monitor (when asked), watchdog, SIGUSR1 dump."""
    groups = ctx.groups
    info = {"rank": rank, "world": groups.world_size, "dp": groups.dp, "tp": groups.tp,
            "dp_rank": groups.dp_rank, "tp_rank": groups.tp_rank,
            "groups": {g.name: list(g.ranks) for g in (groups.tp_group, groups.dp_group, groups.ep_group)}
            | {"graph": list(groups.world_cpu.ranks)},  # CUDA graph replays: every rank at the same steps
            "dispatch": ctx.dispatch, "dp_padding": ctx.dp_padding,
            "node": int(os.environ.get("GROUP_RANK", "0") or 0)}  # the host, under torchrun
    ledger = Ledger(info)
    if job.check_collectives:  # before the ledger: a mismatch stops the call before it is recorded
        ctx.comm.add_plugin(FingerprintCheck())
    ctx.comm.add_plugin(ledger)
    if job.fault and rank == job.fault_rank:
        ctx.comm.add_plugin(FaultInjector(job.fault, job.fault_step, job.fault_delay))
    if job.check_numerics:
        ctx.comm.add_plugin(NumericsMonitor())  # (it attaches to the model as forward hooks)
    dump_dir = job.dump_dir or job.failure_dir
    host, port = job.store_addr or (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    client = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=30))
    watchdog = Watchdog(ledger, client, rank, groups.world_size, timeout, dump_dir, info["groups"], device=device,
                        store_addr=f"the rendezvous store at {host}:{port}")
    watchdog.start()
    signal.signal(signal.SIGUSR1, lambda *_: write_dumps(ledger, dump_dir, "running", "SIGUSR1"))
    client.set(f"{READY_KEY}{rank}", "1")  # the launcher forwards SIGUSR1 only to ready ranks
    return ledger, watchdog, dump_dir


def attach_forward_hooks(model, ctx: ParallelContext) -> None:
    """Diagnostics that watch the forward itself: NaN checks per layer, the leak-pad fault."""
    for plugin in ctx.comm.plugins:
        if isinstance(plugin, NumericsMonitor):
            plugin.attach(model)
        elif isinstance(plugin, FaultInjector) and plugin.kind == "leak-pad":
            first_moe = next((layer.mlp for layer in model.model.layers if getattr(layer.mlp, "first_moe", False)),
                             None)
            if first_moe is not None:
                first_moe.register_forward_pre_hook(plugin.leak_pads)


def finish_reports(ctx: ParallelContext, ledger: Ledger) -> list[str]:
    lines = []
    for plugin in ctx.comm.plugins:
        if isinstance(plugin, FaultInjector) and (msg := plugin.report(ledger.step)):
            lines.append(msg)
        elif isinstance(plugin, NumericsMonitor):
            lines += plugin.report()
    return lines
