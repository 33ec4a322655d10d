"""Runs many parallel-engine cases inside one spawned group of 4 Gloo ranks.

All layouts' groups are created up front on every rank (group creation is collective over the
world, in the same order everywhere); each case then runs on its layout's member ranks while the
other ranks move on. Returns, per case, the outputs seen on the case's first member.
"""

from __future__ import annotations

import contextlib
import dataclasses

from epinfer.engine.engine import Engine, EngineConfig
from epinfer.runtime.job import Job
from epinfer.runtime.lockstep import run_requests
from epinfer.runtime.worker import make_context

# (dp, tp) -> member ranks of the 4-rank world
LAYOUTS = {(1, 1): [0], (2, 1): [0, 1], (1, 2): [2, 3], (2, 2): [0, 1, 2, 3]}


@dataclasses.dataclass
class Case:
    name: str
    model: str
    dp: int
    tp: int
    prompts: list[list[int]]
    params: list  # SamplingParams per prompt
    dispatch: str = "agrs"
    dp_padding: str = "uniform"
    expert_parallel: bool = True
    poison_pads: bool = False
    fast_decode: bool = False  # the decode fast path (normally CUDA only) on CPU
    budget: int = 96  # tokens a step (--max-num-batched-tokens): prompts split into chunks of it
    pieces: bool = False  # prefill / mixed steps as graph pieces (plain calls on CPU; forwards without collectives)
    fp8_weights: bool = False  # an FP8 checkpoint kept in FP8 (the kernels' quantisation, in torch on CPU)
    max_num_seqs: int = 0  # sequences a replica runs at once (0: the engine's default)
    cudnn_chunks: bool = False  # `kernels.cudnn_attention` at stand-in sizes, its torch form for cuDNN


def run_cases(rank: int, world: int, cases: list[Case]) -> dict[str, list[list[int]]]:
    contexts = {}
    variants = sorted({(c.dp, c.tp, c.dispatch, c.dp_padding, c.expert_parallel, c.poison_pads)
                       for c in cases})
    # groups depend only on the layout; build them once per layout, in a fixed order
    groups_by_layout = {}
    for layout in sorted(LAYOUTS):
        dp, tp = layout
        job = Job(EngineConfig(), dp, tp)
        groups_by_layout[layout] = make_context(job, "gloo", LAYOUTS[layout])
    for dp, tp, dispatch, padding, ep, poison in variants:
        base = groups_by_layout[(dp, tp)]
        if base is not None:
            contexts[(dp, tp, dispatch, padding, ep, poison)] = dataclasses.replace(
                base, dispatch=dispatch, dp_padding=padding, expert_parallel=ep, poison_pads=poison)
    results = {}
    for case in cases:
        ctx = contexts.get((case.dp, case.tp, case.dispatch, case.dp_padding, case.expert_parallel,
                            case.poison_pads))
        if ctx is None:
            continue
        with cudnn_stand_in(case.cudnn_chunks) as calls:
            engine = Engine(EngineConfig(model=case.model, dtype="float32", device="cpu",
                                         max_num_batched_tokens=case.budget, piecewise_graphs=case.pieces,
                                         fp8_weights=case.fp8_weights,
                                         **({"max_num_seqs": case.max_num_seqs} if case.max_num_seqs else {})), ctx)
            engine.runner.fast_decode = case.fast_decode
            assert (engine.runner.pieces is not None) == case.pieces, "graph pieces where a forward has collectives"
            requests = [(p, sp) for p, sp in zip(case.prompts, case.params, strict=True)]
            outputs = run_requests(engine, ctx, requests)
        if outputs is not None:
            results[case.name] = [o.token_ids for o in outputs]
            if any(o.prompt_logprobs is not None for o in outputs):
                results[f"{case.name}:prompt_logprobs"] = [o.prompt_logprobs for o in outputs]
            results[f"{case.name}:hits"] = engine.scheduler.allocator.hit_tokens  # (this replica's)
            results[f"{case.name}:captures"] = engine.scheduler.allocator.snapshot_captures
            results[f"{case.name}:cudnn"] = len(calls)
    return results


@contextlib.contextmanager
def cudnn_stand_in(on: bool):
    """With `on`, long chunks through `cudnn_attention` on the CPU: chunks of 16 rows or more,
    contexts of multiples of 16, rows padded to multiples of 8, the torch form in cuDNN's place;
    yields the list its calls are counted in."""
    from epinfer.kernels import cudnn_attention as ca

    calls: list[int] = []
    saved = {name: getattr(ca, name) for name in ("usable", "cudnn", "MIN_ROWS", "ALIGN", "PAD", "_SHAPES")}
    if on:
        ca.usable, ca.MIN_ROWS, ca.ALIGN, ca.PAD, ca._SHAPES = (lambda q: True), 16, 16, 8, set()
        ca.cudnn = lambda *args: calls.append(1) or ca.reference(*args)
    try:
        yield calls
    finally:
        for name, value in saved.items():
            setattr(ca, name, value)
