"""The lockstep step loop, and the `generate` mode built on it.

Every step, on every rank, in this order: the replica's TP rank 0 schedules and broadcasts the
plan to its TP peers (`tp.plan`), the DP coordinator reduces every replica's numbers
(`dp.sync`), and all ranks run the forward the decision implies (a dummy batch for an idle
replica) or all skip / stop together. Only TP rank 0 samples. In `generate`, requests are read and
validated on rank 0, broadcast once (`launch.requests`), placed on replicas round-robin in input
order, and the outputs gathered back to rank 0 (`launch.outputs`). `epinfer serve` runs the same
step with requests that arrive while it runs (`server.engine_loop`).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from epinfer.core.errors import UserError
from epinfer.core.sampling_params import SamplingParams
from epinfer.distributed.dp_sync import DPCoordinator, StepDecision
from epinfer.distributed.parallel import ParallelContext
from epinfer.engine.engine import Engine, RequestOutput
from epinfer.runtime.job import RankRuntime

PROGRESS_EVERY_S = 0.2


@dataclasses.dataclass
class GenerateMode:
    """`epinfer generate` on every rank: `prompts` / `params` are read on rank 0 only."""

    prompts: list  # strings or token-id lists, in input order
    params: list[SamplingParams]

    def __call__(self, engine: Engine, ctx: ParallelContext, rt: RankRuntime) -> list[RequestOutput] | None:
        requests = validate_on_rank0(engine, ctx, self.prompts, self.params)
        return run_requests(engine, ctx, requests, rt.progress)


def validate_on_rank0(engine: Engine, ctx: ParallelContext, prompts: list,
                      params: list[SamplingParams]) -> list[tuple[list[int], SamplingParams]]:
    """Rank 0 tokenizes and validates every request; every rank gets the result or the error."""
    payload = None
    if ctx.groups.world_rank == 0:
        try:
            seqs = [engine.make_request(p, sp, i)
                    for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
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
    `progress`: a queue the leaders post (dp_rank, requests done, prompt tokens done, tokens
    generated) to, for the launcher's progress display: once with zeros as generation starts, then
    every PROGRESS_EVERY_S (a local, time-based decision: it issues no collective)."""
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
    posted = time.monotonic()
    if leader and progress is not None:
        post_progress(progress, groups.dp_rank, seqs)  # zeros: this replica starts generating
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
    for plugin in ctx.comm.at("at_step"):
        plugin.at_step(decision.step_id)
    if plan.has_pending and groups.tp > 1:  # async scheduling: the leader's last sampled tokens
        mine = runner.prev_tokens.clone() if leader else \
            torch.zeros(plan.prev_sampled, dtype=torch.long, device=engine.device)
        runner.prev_tokens = ctx.comm.all_reduce(mine, groups.tp_group, "tp.tokens")
    graph = decision.graph if runner.shared_buckets is not None else None  # None: this replica's own choice
    logits = runner.execute(plan, decision.rows[groups.dp_rank], decision.moe_sizes(groups.tp, ctx.sequence_parallel),
                            want_logits=leader, step_id=decision.step_id, graph=graph)
    if leader:
        for plugin in ctx.comm.at("at_logits"):
            logits = plugin.at_logits(decision.step_id, logits)
        (apply or engine.apply)(scheduled, logits)
    return decision


def post_progress(progress, dp_rank: int, seqs: list) -> None:
    done = sum(s.finish_reason is not None for s in seqs)
    prompt = sum(min(s.num_computed, len(s.prompt_ids)) for s in seqs)
    progress.put((dp_rank, done, prompt, sum(len(s.output_ids) for s in seqs)))
