"""`epinfer bench --dp N --tp M`: the single-device measurement over a spawned DP × TP (EP) run.

Every rank builds its shard of the random-weight model; for each global batch the requests are
split over the replicas (round-robin, or `--replica-batch` per replica for imbalanced load) and the
ranks run the ordinary lockstep step (`runtime.lockstep.lockstep_step`), timing every step. Steps in which
every replica decodes all of its requests are the decode steps measured (prefill chunks make early
requests run ahead: each gets enough extra tokens for `output_len` such steps). Per batch, rank 0
gathers from every rank:

- the step times (decode tok/s = global batch ÷ the median step of the slowest rank);
- padding waste from the step decisions: padding rows ÷ all rows, over the measured steps;
- collective time per step by kind (dispatch, combine, dp.sync, tp.plan, TP collectives) from the
  ledger, the median over the measured steps: the time inside the call on the host — exposed time
  on Gloo (blocking), enqueue time only on NCCL, where the CUDA breakdown below is the measure;
- per-label skew: for each collective (group, seq) in the measured steps, the spread of its start
  time over the ranks that took part, summarised per kind (median and max, ms);
- on CUDA, each rank's profiler breakdown (`profiling.breakdown`), in which NCCL kernels count as
  `comm.<kind>` — their device time includes waiting for peers, i.e. exposed communication.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from epinfer.bench.profiling import breakdown, comm_kind, steps_needed
from epinfer.bench.single import bench_model_len, check_bench_tokens, p90, shape_folder, submit_random, trace_folder
from epinfer.core.errors import UserError
from epinfer.diagnostics.ledger import Ledger
from epinfer.distributed.dp_sync import DPCoordinator
from epinfer.runtime.job import Job, RankRuntime
from epinfer.runtime.launch import launch
from epinfer.runtime.lockstep import lockstep_step


@dataclasses.dataclass
class BenchSpec:
    batches: list[int]  # global batch sizes
    input_len: int
    output_len: int
    replica_batch: list[int] | None = None  # requests per replica (overrides the round-robin split)
    with_breakdown: bool = True
    trace: str | None = None  # a folder: each rank writes its profiled steps as a Chrome trace (CPU too)


@dataclasses.dataclass
class BenchMode:
    """The runtime mode of `epinfer bench --dp/--tp` (`runtime.job`): records on rank 0."""

    spec: BenchSpec

    def __call__(self, engine, ctx, rt: RankRuntime) -> list[dict] | None:
        return run_bench_rank(engine, ctx, self.spec)


def replica_counts(batch: int, dp: int, fixed: list[int] | None) -> list[int]:
    if fixed is not None:
        return list(fixed)
    return [batch // dp + (r < batch % dp) for r in range(dp)]


def run_bench_rank(engine, ctx, spec: BenchSpec) -> list[dict] | None:
    """Runs on every rank; returns the records on rank 0."""
    groups = ctx.groups
    ledger = next(p for p in ctx.comm.plugins if isinstance(p, Ledger))
    coord = DPCoordinator(ctx)
    records = []
    batches = [sum(spec.replica_batch)] if spec.replica_batch else spec.batches
    for batch in batches:
        counts = replica_counts(batch, groups.dp, spec.replica_batch)
        if groups.tp_rank == 0:  # the replica's scheduler gets its share
            submit_random(engine, counts[groups.dp_rank], max(counts), spec.input_len, spec.output_len,
                          seed=batch * 1000 + groups.dp_rank)
        stats = _measure(engine, ctx, coord, ledger, counts, spec)
        gathered = ctx.comm.gather_object(stats, 0, groups.world_cpu, "bench.results")
        if gathered is not None:
            records.append(_record(gathered, batch, counts, spec, ctx))
    return records if groups.world_rank == 0 else None


def _measure(engine, ctx, coord, ledger, counts, spec) -> dict:

    steps, pad_rows, all_rows, parts, first_step = [], 0, 0, None, None
    profile_steps = 3
    want_parts = spec.with_breakdown and (engine.device.type == "cuda" or spec.trace is not None) \
        and spec.output_len >= 8 + steps_needed(profile_steps)
    trace = spec.trace and f"{spec.trace}/trace_b{sum(counts)}_rank{ctx.groups.world_rank}.json"
    full_streak = 0
    while True:
        if want_parts and parts is None and full_streak >= spec.output_len - steps_needed(profile_steps) - 1:
            # every rank reaches this point at the same step: the decision below is lockstep-safe
            parts = breakdown(engine, profile_steps, lambda: lockstep_step(engine, ctx, coord), trace)
            continue
        t = time.perf_counter()
        decision = lockstep_step(engine, ctx, coord)
        elapsed = time.perf_counter() - t
        if decision.done:
            break
        full = decision.run and list(decision.tokens) == counts
        full_streak = full_streak + 1 if full else 0
        if full:
            if first_step is None:
                first_step = decision.step_id  # warm-up (graph capture): not timed
                continue
            steps.append((decision.step_id, elapsed))
            pad_rows += sum(decision.rows) - sum(decision.tokens)
            all_rows += sum(decision.rows)
    timed = {s for s, _ in steps}
    per_step: dict[str, dict[int, float]] = {}  # kind -> step -> seconds in its calls
    starts: dict[tuple[str, int], tuple[str, float]] = {}
    for e in ledger.entries:
        if e["step"] in timed and e["t1"] is not None:
            kind = comm_kind(e["label"])
            by_step = per_step.setdefault(kind, {})
            by_step[e["step"]] = by_step.get(e["step"], 0.0) + (e["t1"] - e["t0"])
            starts[(e["group"], e["seq"])] = (kind, e["t0"])
    # the median step's time per kind, like the step time (one slow step, e.g. a peer compiling, would
    # swamp a mean)
    comm = {k: statistics.median([v.get(s, 0.0) for s in timed]) for k, v in per_step.items()}
    return {"rank": ctx.groups.world_rank, "steps": [t for _, t in steps], "pad_rows": pad_rows,
            "all_rows": all_rows, "comm_ms": {k: v * 1e3 for k, v in comm.items()}, "starts": starts,
            "breakdown_ms": parts}


def _record(gathered: list[dict], batch: int, counts: list[int], spec: BenchSpec, ctx) -> dict:
    medians = [statistics.median(g["steps"]) if g["steps"] else float("nan") for g in gathered]
    slowest = max(medians)
    skew: dict[str, list[float]] = {}
    keys = set().union(*(g["starts"] for g in gathered))
    for key in keys:
        seen = [g["starts"][key] for g in gathered if key in g["starts"]]
        if len(seen) > 1:
            times = [t for _, t in seen]
            skew.setdefault(seen[0][0], []).append(max(times) - min(times))
    g0 = gathered[0]
    groups = ctx.groups
    rec = {"batch": batch, "replica_batch": counts, "dp": groups.dp, "tp": groups.tp,
           "ep": groups.ep_group.size if ctx.expert_parallel else 1,
           "dispatch": "tp-allreduce" if ctx.replicated_moe else ctx.dispatch,  # (DP = 1: no dispatcher)
           "dp_padding": ctx.dp_padding, "decode_steps": len(g0["steps"]),
           "decode_tok_s": round(batch / slowest, 1), "step_ms_median": round(slowest * 1e3, 3),
           "step_ms_p90": round(p90(gathered[medians.index(slowest)]["steps"]) * 1e3, 3),  # the slowest rank's
           "step_ms_by_rank": [round(m * 1e3, 3) for m in medians],
           "pad_waste": round(g0["pad_rows"] / max(1, g0["all_rows"]), 4),
           "collective_ms_by_rank": [{k: round(v, 3) for k, v in sorted(g["comm_ms"].items())} for g in gathered],
           "skew_ms": {k: {"median": round(statistics.median(v) * 1e3, 3), "max": round(max(v) * 1e3, 3)}
                       for k, v in sorted(skew.items())}}
    if any(g["breakdown_ms"] for g in gathered):
        rec["breakdown_ms_by_rank"] = [g["breakdown_ms"] for g in gathered]
    return rec


def bench_parallel(job: Job, shape: str, batches: list[int], input_len: int, output_len: int,
                   layers: int | None, replica_batch: list[int] | None = None, trace: str | None = None) -> list[dict]:
    """The single-process measurement on the job's dp × tp spawned ranks; one record per batch.
    `job`: the run description from the command line (layout, dispatcher, padding, EP on / off, device,
    dtype, graphs, async scheduling); its model becomes the shape with random weights.
    `trace`: a folder for each batch's profiled steps, one Chrome trace of all ranks (`trace_b{B}.json`)."""
    dp, tp = job.dp, job.tp
    if replica_batch is not None and len(replica_batch) != dp:
        raise UserError(f"--replica-batch needs {dp} counts (one per DP replica), got {len(replica_batch)}")
    if replica_batch is not None and (min(replica_batch) < 0 or not any(replica_batch)):
        raise UserError(f"--replica-batch {replica_batch}: counts must be >= 0 (an idle replica is 0), not all 0")
    top = max(replica_batch) if replica_batch else max(-(-b // dp) for b in batches)
    trace = trace_folder(trace)
    check_bench_tokens(top * dp * (input_len + output_len))  # (every replica holds at most `top` requests)
    with tempfile.TemporaryDirectory() as tmp:
        folder = shape_folder(shape, layers, tmp, job.engine.fp8_weights)
        ecfg = dataclasses.replace(job.engine, model=str(folder), random_weights=True, max_num_seqs=max(1, top),
                                   max_model_len=bench_model_len(folder, input_len + output_len, 64),
                                   max_num_batched_tokens=max(16384, input_len))
        spec = BenchSpec(batches, input_len, output_len, replica_batch, trace=trace)
        records = launch(dataclasses.replace(job, engine=ecfg, mode=BenchMode(spec)))
        depth = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    if trace:
        from epinfer.diagnostics.timeline import merge_traces

        for rec in records:
            merge_traces(sorted(Path(trace).glob(f"trace_b{rec['batch']}_rank*.json")),
                         Path(trace) / f"trace_b{rec['batch']}.json")
    for rec in records:
        rec.update(shape=shape, layers=depth, input_len=input_len, output_len=output_len, dtype=job.engine.dtype,
                   async_scheduling=job.engine.async_scheduling)
        ep = "" if job.expert_parallel else " no-ep"
        print(f"epinfer bench: dp={dp} tp={tp}{ep} batch {rec['batch']} {rec['replica_batch']}: decode "
              f"{rec['decode_tok_s']} tok/s, step {rec['step_ms_median']} ms, pad waste {rec['pad_waste']:.1%}",
              file=sys.stderr, flush=True)
    return records
