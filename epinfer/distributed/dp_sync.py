"""DP coordinator: one small all-reduce per step over the DP CPU group → `StepDecision`.

Each rank writes [tokens, has_work, step_id + 1] into its replica's slots of a zero vector and
the sum gives every rank every replica's numbers. Everything that changes which collectives run
or their sizes (rows per replica, dummy batches, everyone-idle skip, termination) is a pure
function of that vector, so all ranks decide the same. A step-id disagreement means the lockstep
contract is broken and is raised as an error naming the replicas, never waited on.

The step id counts forwards that all replicas run (dummy batches included); skips consume none.
"""

from __future__ import annotations

import dataclasses

import torch

from epinfer.distributed.parallel import ParallelContext


class LockstepError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class StepDecision:
    step_id: int
    tokens: tuple[int, ...]  # real tokens per DP replica
    rows: tuple[int, ...]  # rows each replica runs (padding included)
    run: bool  # False: nobody has tokens this step, everybody skips the forward
    done: bool  # no replica has work left: everybody stops

    def moe_sizes(self, tp: int, sequence_parallel: bool) -> list[int]:
        """Rows each EP rank (DP-major) contributes to the MoE dispatch."""
        if sequence_parallel:
            return [r // tp for r in self.rows for _ in range(tp)]
        return [r for r in self.rows for _ in range(tp)]


def decide(tokens: list[int], has_work: list[int], step_id: int, tp: int,
           padding: str) -> StepDecision:
    if not any(has_work):
        return StepDecision(step_id, tuple(tokens), (0,) * len(tokens), False, True)
    if not any(tokens):
        return StepDecision(step_id, tuple(tokens), (0,) * len(tokens), False, False)

    def round_up(n: int) -> int:  # >= 1 row (dummy batch), a multiple of TP (sequence parallel)
        return -(-max(n, 1) // tp) * tp

    if padding == "uniform":
        rows = (round_up(max(tokens)),) * len(tokens)
    else:
        rows = tuple(round_up(t) for t in tokens)
    return StepDecision(step_id, tuple(tokens), rows, True, False)


class DPCoordinator:
    def __init__(self, ctx: ParallelContext) -> None:
        self.ctx = ctx
        self.step_id = 0
        self.applied = None  # what the leader's sampling step returned in the last step

    def sync(self, num_tokens: int, has_work: bool) -> StepDecision:
        ctx = self.ctx
        dp, me = ctx.dp_size, ctx.dp_rank
        vec = torch.zeros(3 * dp, dtype=torch.int64)
        vec[me], vec[dp + me], vec[2 * dp + me] = num_tokens, int(has_work), self.step_id + 1
        if ctx.groups is not None and dp > 1:
            ctx.comm.all_reduce_cpu(vec, ctx.groups.dp_group, "dp.sync")
        values = vec.tolist()
        tokens, work, steps = values[:dp], values[dp:2 * dp], [s - 1 for s in values[2 * dp:]]
        if len(set(steps)) != 1:
            behind = [d for d, s in enumerate(steps) if s != steps[me]]
            raise LockstepError(f"dp.sync: replica {me} is at step {steps[me]} but replicas {behind} "
                                f"report steps {[steps[d] for d in behind]}")
        decision = decide(tokens, work, self.step_id, ctx.tp_size, ctx.dp_padding)
        if decision.run:
            self.step_id += 1
        return decision
