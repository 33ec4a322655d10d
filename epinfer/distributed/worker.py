"""One rank of a parallel run: the lockstep step loop and the per-rank entry point.

Every step, on every rank, in this order: the replica's TP rank 0 schedules and broadcasts the
plan to its TP peers (`tp.plan`), the DP coordinator reduces every replica's numbers
(`dp.sync`), and all ranks run the forward the decision implies (a dummy batch for an idle
replica) or all skip / stop together. Only TP rank 0 samples. Requests are read and validated on
rank 0, broadcast once (`launch.requests`), placed on replicas round-robin in input order, and the
outputs gathered back to rank 0 (`launch.outputs`). `epinfer serve` runs the same loop with
requests that arrive while it runs (`epinfer.server.engine_loop`).
"""

from __future__ import annotations

import dataclasses
import datetime
import faulthandler
import os
import signal
import time

import torch
import torch.distributed as dist

from epinfer.diagnostics.faults import FaultInjector
from epinfer.diagnostics.ledger import Ledger
from epinfer.diagnostics.numerics import NumericsMonitor
from epinfer.diagnostics.watchdog import READY_KEY, Watchdog, log_line, write_dumps
from epinfer.distributed.communicator import Communicator
from epinfer.distributed.dp_sync import DPCoordinator, StepDecision
from epinfer.distributed.groups import build_groups
from epinfer.distributed.parallel import ParallelContext
from epinfer.engine.engine import Engine, EngineConfig, RequestOutput, resolve_device
from epinfer.engine.sampling_params import SamplingParams
from epinfer.errors import UserError

PROGRESS_EVERY_S = 0.2
TEARDOWN_S = 60.0  # longest wait for the process group to shut down once the run is over


@dataclasses.dataclass
class Job:
    """Everything a rank needs; pickled to spawned ranks."""

    engine: EngineConfig
    dp: int
    tp: int
    dispatch: str = "agrs"
    dp_padding: str = "uniform"
    expert_parallel: bool = True
    poison_pads: bool = False
    collective_timeout: float | None = None
    prompts: list | None = None  # rank 0 only: prompts (str or token ids) in input order
    params: list[SamplingParams] | None = None
    dump_dir: str | None = None  # --dump-dir: every rank dumps here at exit, on success too
    failure_dir: str = "epinfer-dumps/run"  # where dumps go on failure without --dump-dir
    check_collectives: bool = False
    check_numerics: bool = False
    fault: str | None = None
    fault_rank: int = 0
    fault_step: int = 0
    fault_delay: float = 2.0
    store_addr: tuple[str, int] | None = None  # the rendezvous store, for the watchdog's client
    serve: object | None = None  # `epinfer serve`: ServeChannels (requests arrive while the loop runs)
    progress: object | None = None  # a queue for (dp_rank, requests done, tokens) when a bar is shown
    bench: object | None = None  # `epinfer bench --dp/--tp`: a bench_parallel.BenchSpec


def make_context(job: Job, backend: str, members: list[int] | None = None) -> ParallelContext | None:
    groups = build_groups(job.dp, job.tp, backend, members)
    if groups is None:
        return None
    return ParallelContext(groups, Communicator(job.check_collectives), job.expert_parallel, job.dispatch,
                           job.dp_padding, job.poison_pads)


def validate_on_rank0(engine: Engine, ctx: ParallelContext,
                      job: Job) -> list[tuple[list[int], SamplingParams]]:
    """Rank 0 tokenizes and validates every request; every rank gets the result or the error."""
    payload = None
    if ctx.groups.world_rank == 0:
        try:
            seqs = [engine.make_request(p, sp, i)
                    for i, (p, sp) in enumerate(zip(job.prompts, job.params, strict=True))]
            payload = ("ok", [(s.prompt_ids, s.params) for s in seqs])
        except UserError as exc:
            payload = ("error", str(exc))
    payload = ctx.comm.broadcast_object(payload, 0, ctx.groups.world_cpu, "launch.requests")
    if payload[0] == "error":
        raise UserError(payload[1])
    return payload[1]


def run_requests(engine: Engine, ctx: ParallelContext, requests: list[tuple[list[int], SamplingParams]],
                 progress=None) -> list[RequestOutput] | None:
    """The lockstep loop. Returns all outputs in input order on rank 0, None elsewhere.
    `progress`: a queue the leaders post (dp_rank, requests done, tokens generated) to, for the
    launcher's progress bar (a local, time-based decision: it issues no collective)."""
    groups = ctx.groups
    leader = groups.tp_rank == 0
    seqs = []
    if leader:
        for i, (ids, params) in enumerate(requests):
            if i % groups.dp == groups.dp_rank:
                seq = engine.make_request(ids, params, i)
                engine.submit(seq)
                seqs.append(seq)
    coord = DPCoordinator(ctx)
    posted = 0.0
    while not lockstep_step(engine, ctx, coord).done:
        if leader and progress is not None and time.monotonic() - posted > PROGRESS_EVERY_S:
            posted = time.monotonic()
            post_progress(progress, groups.dp_rank, seqs)
    if leader and progress is not None:
        post_progress(progress, groups.dp_rank, seqs)
    mine = [(s.index, engine.output(s)) for s in seqs]
    gathered = ctx.comm.gather_object(mine, 0, groups.world_cpu, "launch.outputs")
    if gathered is None:
        return None
    return [out for _, out in sorted((item for part in gathered for item in part), key=lambda x: x[0])]


def lockstep_step(engine: Engine, ctx: ParallelContext, coord: DPCoordinator, keep_alive: bool = False,
                  apply=None) -> StepDecision:
    """One step of the lockstep loop on this rank: plan (TP leader) and share it, the DP decision,
    then the forward the decision implies — or nothing, on every rank alike (all idle / done).
    `keep_alive`: this replica counts as having work (a server that has not been stopped);
    `apply(scheduled, logits)`: the leader's sampling step (default `engine.apply`)."""
    groups = ctx.groups
    leader = groups.tp_rank == 0
    ctx.comm.step = coord.step_id
    runner = engine.runner
    scheduled, plan = engine.plan_step() if leader else (None, None)
    plan = ctx.comm.broadcast_object(plan, 0, groups.tp_group, "tp.plan")
    decision = coord.sync(plan.num_tokens, plan.has_work or keep_alive, runner.decode_only(plan),
                          runner.shared_buckets)
    if decision.done or not decision.run:  # everybody stops / skips together, no step id used
        return decision
    if ctx.fault is not None:
        ctx.fault.at_step(decision.step_id)
    if plan.has_pending and groups.tp > 1:  # async scheduling: the leader's last sampled tokens
        mine = runner.prev_tokens.clone() if leader else \
            torch.zeros(plan.prev_sampled, dtype=torch.long, device=engine.device)
        runner.prev_tokens = ctx.comm.all_reduce(mine, groups.tp_group, "tp.tokens")
    graph = decision.graph if runner.shared_buckets is not None else None  # None: this replica's own choice
    logits = runner.execute(plan, decision.rows[groups.dp_rank], decision.moe_sizes(groups.tp, ctx.sequence_parallel),
                            want_logits=leader, step_id=decision.step_id, graph=graph)
    if leader:
        if ctx.fault is not None:
            logits = ctx.fault.at_logits(decision.step_id, logits)
        (apply or engine.apply)(scheduled, logits)
    return decision


def post_progress(progress, dp_rank: int, seqs: list) -> None:
    done = sum(s.finish_reason is not None for s in seqs)
    progress.put((dp_rank, done, sum(len(s.output_ids) for s in seqs)))


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
        if os.environ.get("EPINFER_PARALLEL_GRAPHS") == "1":  # no NCCL buffer registration at capture:
            os.environ.setdefault("NCCL_GRAPH_REGISTER", "0")  # graph-captured outputs come from a pool
    dist.init_process_group(**kwargs)
    ctx = make_context(job, backend)
    ledger, watchdog, dump_dir = start_diagnostics(rank, ctx, job, timeout, device)
    if os.environ.get("EPINFER_STACKS_AFTER"):  # debugging a hang: every thread's stack, repeatedly
        faulthandler.dump_traceback_later(float(os.environ["EPINFER_STACKS_AFTER"]), repeat=True)
    try:
        groups = ctx.groups  # EPINFER_SYMM_MEM=1: symmetric buffers for the small TP / EP collectives,
        if not job.fault:  # not under fault injection (a mis-sized collective would pair stray signals)
            ctx.comm.enable_symmetric([groups.tp_group, groups.ep_group], groups.world_cpu, device, timeout)
        engine = Engine(job.engine, ctx, device)
        engine.runner.agree_graphs(ctx)
        if job.serve is not None:
            from epinfer.server.engine_loop import serve_requests

            outputs = serve_requests(engine, ctx, job.serve, watchdog)
        elif job.bench is not None:  # `epinfer bench --dp/--tp`: records on rank 0
            from epinfer.bench_parallel import run_bench_rank

            outputs = run_bench_rank(engine, ctx, job.bench)
        else:
            requests = validate_on_rank0(engine, ctx, job)
            outputs = run_requests(engine, ctx, requests, job.progress)
    except UserError:
        watchdog.stop()
        raise
    except Exception as exc:  # a backend error, a mismatch caught by the pre-check, a bug
        cur = ledger.current
        where = f" in {cur['label']} ({cur['group']} seq {cur['seq']}, step {ledger.step})" if cur else ""
        text = " ".join(str(exc).split()).split(" This is typically")[0][:300]
        watchdog.fire(f"{type(exc).__name__}{where}: {text}", status="error")  # the doctor's `error` verdict
        watchdog.await_exit()  # the watchdog thread was already firing (a peer's abort): it exits the process
    if job.dump_dir:
        ledger.dump(dump_dir, "ok")
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
            "dispatch": ctx.dispatch, "dp_padding": ctx.dp_padding}
    ledger = Ledger(info)
    ctx.comm.hooks.append(ledger)
    if job.fault and rank == job.fault_rank:
        ctx.fault = ctx.comm.fault = FaultInjector(job.fault, job.fault_step, job.fault_delay)
    if job.check_numerics:
        ctx.numerics = NumericsMonitor()
    dump_dir = job.dump_dir or job.failure_dir
    host, port = job.store_addr or (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    client = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=30))
    watchdog = Watchdog(ledger, client, rank, groups.world_size, timeout, dump_dir, info["groups"], device=device)
    watchdog.start()
    signal.signal(signal.SIGUSR1, lambda *_: write_dumps(ledger, dump_dir, "running", "SIGUSR1"))
    client.set(f"{READY_KEY}{rank}", "1")  # the launcher forwards SIGUSR1 only to ready ranks
    return ledger, watchdog, dump_dir


def finish_reports(ctx: ParallelContext, ledger: Ledger) -> list[str]:
    lines = []
    if ctx.fault is not None and (msg := ctx.fault.report(ledger.step)):
        lines.append(msg)
    if ctx.numerics is not None:
        lines += ctx.numerics.report()
    return lines
