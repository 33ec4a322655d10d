"""`Job`: the description of a run, everything a rank needs (pickled to spawned ranks).

What the ranks do once they are up is `mode(engine, ctx, rank_runtime)`: a picklable callable
(`runtime.lockstep.GenerateMode`, `server.engine_loop.ServeMode`, `bench.parallel.BenchMode`), so
the runtime never imports the server or the bench. Built once from the command line's flags
(`cli.build_job`), for generate, serve and bench alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from epinfer.core.config import EngineConfig

if TYPE_CHECKING:  # (annotations only: building a Job imports no torch)
    from epinfer.distributed.parallel import ParallelContext
    from epinfer.engine.engine import Engine


@dataclasses.dataclass
class RankRuntime:
    """What the runtime hands a mode besides the engine and the parallel context."""

    rank: int
    watchdog: object  # diagnostics.watchdog.Watchdog: a loop that idles tells it so (`idle_tick`)
    progress: object | None = None  # Job.progress


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
    dump_dir: str | None = None  # --dump-dir: every rank dumps here at exit, on success too
    failure_dir: str = "epinfer-dumps/run"  # where dumps go on failure without --dump-dir
    check_collectives: bool = False
    symm_mem: bool = False  # --symm-mem: small TP / EP collectives through symmetric memory (CUDA)
    symm_mem_bytes: int = 1 << 20  # the largest collective that path takes
    check_numerics: bool = False
    fault: str | None = None
    fault_rank: int = 0
    fault_step: int = 0
    fault_delay: float = 2.0
    store_addr: tuple[str, int] | None = None  # the rendezvous store, for the watchdog's client
    progress: object | None = None  # a queue for (dp_rank, requests done, prompt tokens, generated tokens)
    # what every rank runs once the engine is built; rank 0's result is what `launch` returns
    mode: Callable[[Engine, ParallelContext, RankRuntime], object] | None = None
