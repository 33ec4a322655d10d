"""Rank side of the lockstep stress test: random per-replica load on 4 Gloo ranks (dp=2 tp=2).

Each round gives every replica its own random list of requests — none at all (an idle replica),
prompts of 1-40 tokens, 1-10 new tokens, stop ids that end requests at random steps, greedy and
seeded sampling — with a small token budget (chunked prefill) and few sequence slots (requests
queue and join mid-run); half the rounds with async scheduling (inputs fed from the device, the TP
peers get the leader's sampled tokens through `tp.tokens`). Every rank runs the ordinary lockstep
step and records its ledger; the test compares, group by group, that every member issued the same
collectives in the same order, and that every request's tokens equal the single-process run.
"""

from __future__ import annotations

import dataclasses

from epinfer.diagnostics.ledger import Ledger
from epinfer.distributed.dp_sync import DPCoordinator
from epinfer.engine.engine import Engine, EngineConfig
from epinfer.runtime.job import Job
from epinfer.runtime.lockstep import lockstep_step
from epinfer.runtime.worker import make_context


@dataclasses.dataclass
class Round:
    dispatch: str
    padding: str
    per_replica: list[list[tuple[int, list[int], object]]]  # replica -> [(request id, prompt, params)]
    max_num_seqs: int
    max_num_batched_tokens: int
    async_scheduling: bool = False


def run_stress(rank: int, world: int, payload) -> dict:
    model, rounds = payload
    variants = sorted({(r.dispatch, r.padding) for r in rounds})
    contexts, ledgers = {}, {}
    for dispatch, padding in variants:  # group creation is collective: same order on every rank
        ctx = make_context(Job(EngineConfig(), 2, 2, dispatch, padding), "gloo")
        ledger = Ledger({"rank": rank})
        ctx.comm.add_plugin(ledger)
        contexts[(dispatch, padding)] = ctx
        ledgers[(dispatch, padding)] = ledger
    outputs = {}
    for rnd in rounds:
        ctx = contexts[(rnd.dispatch, rnd.padding)]
        engine = Engine(EngineConfig(model=model, dtype="float32", device="cpu", max_num_seqs=rnd.max_num_seqs,
                                     max_num_batched_tokens=rnd.max_num_batched_tokens,
                                     async_scheduling=rnd.async_scheduling), ctx)
        seqs = []
        if ctx.groups.tp_rank == 0:
            for rid, prompt, params in rnd.per_replica[ctx.groups.dp_rank]:
                seq = engine.make_request(prompt, params, rid)
                engine.submit(seq)
                seqs.append(seq)
        coord = DPCoordinator(ctx)
        while not lockstep_step(engine, ctx, coord).done:
            pass
        mine = [(s.index, list(s.output_ids)) for s in seqs]
        gathered = ctx.comm.gather_object(mine, 0, ctx.groups.world_cpu, "stress.outputs")
        if gathered is not None:
            outputs.update({rid: ids for part in gathered for rid, ids in part})
    # per variant and group (names carry the member ranks: "tp[0,1]", "dp[1,3]", "ep", ...)
    record = {variant: {} for variant in ledgers}
    for variant, ledger in ledgers.items():
        for e in ledger.entries:
            # an all-to-all's split sizes and shapes are per rank by nature; everything else must match
            a2a = e["op"] == "all_to_all"
            record[variant].setdefault(e["group"], []).append(
                (e["seq"], e["op"], e["label"], e["step"], None if a2a else e["sizes"],
                 [sh[1:] for sh in e["shapes"]] if a2a else e["shapes"]))
    return {"outputs": outputs, "ledger": record}
