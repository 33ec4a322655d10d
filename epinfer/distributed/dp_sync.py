"""DP coordinator: one small all-reduce per step over the DP CPU group → `StepDecision`.

Each rank writes [tokens, has_work, step_id + 1, decode_only] into its replica's slots of a zero
vector and the sum gives every rank every replica's numbers. Everything that changes which collectives run
or their sizes (rows per replica, dummy batches, everyone-idle skip, termination) is a pure
function of that vector, so all ranks decide the same. A step-id disagreement means the lockstep
contract is broken and is raised as an error naming the replicas, never waited on.

The step id counts forwards that all replicas run (dummy batches included); skips consume none.

CUDA graphs with collectives inside: when every rank has graphs (agreed once at start-up, the
minimum wins) and every replica's step is decode-only (a dummy batch counts), all replicas pad to
the same graph bucket and replay their graph; otherwise all run eagerly. Either way the sizes of
every collective follow from the decision alone.
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
    graph: bool = False  # every rank replays its CUDA graph of `rows` rows

    def moe_sizes(self, tp: int, sequence_parallel: bool) -> list[int]:
        """Rows each EP rank (DP-major) contributes to the MoE dispatch."""
        if sequence_parallel:
            return [r // tp for r in self.rows for _ in range(tp)]
        return [r for r in self.rows for _ in range(tp)]


def decide(tokens: list[int], has_work: list[int], step_id: int, tp: int,
           padding: str, decode_only: list[int] | None = None, buckets: list[int] | None = None) -> StepDecision:
    """`tp`: rows are rounded up to a multiple of it (the TP size where the MoE is sequence-parallel,
    else 1); `decode_only[d]`: replica d's step could replay a graph; `buckets`: the graphs' row
    counts (multiples of `tp`), None without graphs."""
    if not any(has_work):
        return StepDecision(step_id, tuple(tokens), (0,) * len(tokens), False, True)
    if not any(tokens):
        return StepDecision(step_id, tuple(tokens), (0,) * len(tokens), False, False)

    def round_up(n: int) -> int:  # >= 1 row (dummy batch), a multiple of TP (sequence parallel)
        return -(-max(n, 1) // tp) * tp

    widest = round_up(max(tokens))
    if buckets and (padding == "uniform" or len(tokens) == 1) and decode_only and all(decode_only) \
            and widest <= buckets[-1]:
        rows = (next(b for b in buckets if b >= widest),) * len(tokens)
        return StepDecision(step_id, tuple(tokens), rows, True, False, graph=True)
    if padding == "uniform":
        rows = (widest,) * len(tokens)
    else:
        rows = tuple(round_up(t) for t in tokens)
    return StepDecision(step_id, tuple(tokens), rows, True, False)


class DPCoordinator:
    def __init__(self, ctx: ParallelContext) -> None:
        self.ctx = ctx
        self.step_id = 0

    def sync(self, num_tokens: int, has_work: bool, decode_only: bool = False,
             buckets: list[int] | None = None) -> StepDecision:
        """`buckets`: the graph row counts every rank has (`ModelRunner.agree_graphs`), or None."""
        ctx = self.ctx
        dp, me = ctx.dp_size, ctx.dp_rank
        vec = torch.zeros(4 * dp, dtype=torch.int64)
        vec[me], vec[dp + me], vec[2 * dp + me] = num_tokens, int(has_work), self.step_id + 1
        vec[3 * dp + me] = int(decode_only)
        if ctx.groups is not None and dp > 1:
            ctx.comm.all_reduce_cpu(vec, ctx.groups.dp_group, "dp.sync")
        values = vec.tolist()
        tokens, work = values[:dp], values[dp:2 * dp]
        steps, decode = [s - 1 for s in values[2 * dp:3 * dp]], values[3 * dp:]
        if len(set(steps)) != 1:
            behind = [d for d, s in enumerate(steps) if s != steps[me]]
            raise LockstepError(f"dp.sync: replica {me} is at step {steps[me]} but replicas {behind} "
                                f"report steps {[steps[d] for d in behind]}")
        # rows are rounded to a multiple of TP only where the MoE slices them (sequence parallel)
        multiple = ctx.tp_size if ctx.sequence_parallel else 1
        decision = decide(tokens, work, self.step_id, multiple, ctx.dp_padding, decode, buckets)
        if decision.run:
            self.step_id += 1
        return decision
