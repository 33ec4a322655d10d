"""The engine ranks of `epinfer serve`, seen from the server process.

Like `launch.launch`, this process hosts the rendezvous store and spawns one process per rank
(`world = dp × tp`, also for 1: the HTTP server never shares a process with the model). Unlike
it, the ranks run until told to stop, so the pieces are separate calls: `start`, `wait_ready`
(the first message of rank 0's serving loop, or the error that stopped a rank on the way),
`stop` (a joint stop through rank 0's inbox), and `drain_after_failure` (the launcher's
`drain`: the abort key makes every live rank's watchdog dump and exit 3). A monitor thread
watches the exit codes and calls `on_failure(message)` once when a rank ends unasked.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import signal
import tempfile
import threading
import time

import torch.distributed as dist

from epinfer.core.errors import RunFailed, UserError
from epinfer.core.layout import check_layout
from epinfer.diagnostics.watchdog import EXIT_FAULT, READY_KEY
from epinfer.runtime.job import Job
from epinfer.runtime.launch import (
    describe_exit,
    drain,
    failure_line,
    keep_rank_logs,
    prepare_dump_dir,
    rank_errors,
    spawned_rank,
    terminate,
)
from epinfer.server.engine_loop import ServeChannels, ServeMode


class RankSet:
    def __init__(self, job: Job) -> None:
        check_layout(job.dp, job.tp)
        self.job = job
        self.world = job.dp * job.tp
        self.procs: list = []
        self.store = None
        self.stopping = False  # a stop we asked for: exits are expected
        self.failed = threading.Event()
        self.tmp = tempfile.mkdtemp(prefix="epinfer-serve-")

    @property
    def dump_dir(self) -> str:
        return self.job.dump_dir or self.job.failure_dir

    def start(self) -> None:
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
        prepare_dump_dir(self.job)
        self.job.store_addr = ("127.0.0.1", self.store.port)
        ctx = mp.get_context("spawn")
        self.channels = ServeChannels(ctx.Queue(), [ctx.Queue() for _ in range(self.world)])
        self.job.mode = ServeMode(self.channels)
        result = os.path.join(self.tmp, "outputs.pkl")
        self.procs = [ctx.Process(target=spawned_rank, args=(r, self.world, self.store.port, self.job, result),
                                  name=f"epinfer-rank{r}") for r in range(self.world)]
        for p in self.procs:
            p.start()

    def wait_ready(self, interrupted=lambda: False) -> dict:
        """Rank 0's engine info once every rank is in the serving loop; raises `UserError`
        (a bad flag or checkpoint, exit 2) or `RunFailed` when a rank stops first."""
        while True:
            try:
                msg = self.channels.outboxes[0].get(timeout=0.1)
            except queue.Empty:
                msg = None
            if msg is not None and msg[0] == "ready":
                return msg[1]
            codes = [p.exitcode for p in self.procs]
            if interrupted():
                raise KeyboardInterrupt
            if any(c not in (None, 0) for c in codes) or all(c is not None for c in codes):
                first = next(c for c in codes if c is not None)
                code = drain(self.procs, self.store, first, grace=10.0) if first != 0 else first
                messages = rank_errors(self.store, self.world)
                if code == 2 and messages:
                    raise UserError(messages[0])
                logs = keep_rank_logs(self.tmp, self.dump_dir)
                raise RunFailed(EXIT_FAULT if code in (EXIT_FAULT, -9) else code or 1,
                                failure_line((codes.index(first), first), messages, self.dump_dir, logs,
                                             "the engine did not start"))

    def monitor(self, on_failure) -> None:
        """Starts the thread that reports the first unasked rank exit."""
        def watch() -> None:
            while not self.stopping:
                exited = [(rank, p.exitcode) for rank, p in enumerate(self.procs) if p.exitcode is not None]
                if exited and not self.stopping:
                    # a rank that stopped on a fault (exit 3) usually reacts to another's death:
                    # name the others first
                    exited.sort(key=lambda rc: (rc[1] == EXIT_FAULT, rc[0]))
                    self.failed.set()
                    on_failure("engine failure: " + "; ".join(describe_exit(r, c) for r, c in exited))
                    return
                time.sleep(0.05)

        threading.Thread(target=watch, name="epinfer-rank-monitor", daemon=True).start()

    def forward_usr1(self) -> None:
        """`kill -USR1 <server pid>`: every ready rank dumps its ledger now, without stopping."""
        for rank, p in enumerate(self.procs):
            if p.is_alive() and self.store.check([f"{READY_KEY}{rank}"]):
                os.kill(p.pid, signal.SIGUSR1)

    def stop(self, timeout: float = 30.0) -> bool:
        """Joint stop (the ranks leave the loop in the same iteration); True if all exit 0."""
        self.stopping = True
        self.channels.inbox.put(("stop",))
        deadline = time.time() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.time()))
        ok = all(p.exitcode == 0 for p in self.procs)
        self.close()
        return ok

    def drain_after_failure(self) -> None:
        """A rank failed: every live rank dumps and exits (bounded), then the rest are stopped."""
        self.stopping = True
        first = next((p.exitcode for p in self.procs if p.exitcode not in (None, 0)), 1)
        drain(self.procs, self.store, first)
        keep_rank_logs(self.tmp, self.dump_dir)  # (the ranks' own stderr, with the dumps)
        self.close()

    def errors(self) -> list[str]:
        return rank_errors(self.store, self.world) if self.store is not None else []

    def close(self) -> None:
        self.stopping = True
        terminate(self.procs)
        for q in [self.channels.inbox, *self.channels.outboxes] if self.procs else []:
            q.cancel_join_thread()  # never block exit on a queue whose reader is gone
        shutil.rmtree(self.tmp, ignore_errors=True)
