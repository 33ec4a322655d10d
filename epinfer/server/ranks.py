"""The engine ranks of `epinfer serve`, seen from the server process.

Like `launch.launch`, this process hosts the rendezvous store and spawns one process per rank
(`world = dp × tp`, also for 1: the HTTP server never shares a process with the model). Unlike
it, the ranks run until told to stop, so the pieces are separate calls: `start`, `wait_ready`
(the first message of rank 0's serving loop, or the error that stopped a rank on the way),
`stop` (a joint stop through rank 0's inbox), and `drain_after_failure` (the launcher's
`drain`: the abort key makes every live rank's watchdog dump and exit 3). A monitor thread
watches the exit codes and calls `on_failure(message)` once when a rank ends unasked.

On several hosts (`server.nodes`) each host's RankSet spawns that host's ranks; host 0's also
holds the store on --master-port and sees the other hosts' ranks through the relay.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import re
import shutil
import signal
import socket
import tempfile
import threading
import time

import torch.distributed as dist

from epinfer.core.errors import Interrupted, RunFailed, UserError
from epinfer.core.layout import check_layout
from epinfer.diagnostics.watchdog import EXIT_FAULT, READY_KEY, log_line
from epinfer.runtime.agreement import agree, start_settings
from epinfer.runtime.job import Job
from epinfer.runtime.launch import (
    Blame,
    describe_exit,
    drain,
    failure_line,
    gloo_towards,
    keep_rank_logs,
    prepare_dump_dir,
    rank_errors,
    spawned_rank,
    terminate,
)
from epinfer.runtime.rank_process import RankProcess
from epinfer.server.engine_loop import ServeChannels, ServeMode
from epinfer.server.nodes import DUMPS_KEY, JOIN_TIMEOUT_S, Nodes, RelayServer


class RankSet:
    def __init__(self, job: Job, nodes: Nodes | None = None) -> None:
        check_layout(job.dp, job.tp)
        self.job = job
        self.nodes = nodes or Nodes()
        self.world = job.dp * job.tp
        self.procs: list = []  # host 0: every rank (those of other hosts as `RemoteRank`); host R: its own
        self.store = None
        self.relay: RelayServer | None = None
        self.stopping = False  # a stop we asked for: exits are expected
        self.failed = threading.Event()
        self.tmp = tempfile.mkdtemp(prefix="epinfer-serve-")

    @property
    def dump_dir(self) -> str:
        return self.job.dump_dir or self.job.failure_dir

    def start(self, interrupted=lambda: 0) -> None:
        """`interrupted()`: the number of a signal that came, or 0 (the waits for other hosts then
        stop with `Interrupted`)."""
        nodes, job = self.nodes, self.job
        self.store = open_store(nodes, interrupted)
        if nodes.rank == 0:
            prepare_dump_dir(job)
            self.store.set(DUMPS_KEY, job.failure_dir)
        job.store_addr = (nodes.master_addr, nodes.master_port) if nodes.count > 1 else ("127.0.0.1", self.store.port)
        local = nodes.local_ranks(self.world)
        if nodes.count > 1:
            gloo_towards(nodes.master_addr)  # (the spawned ranks inherit it)
            if nodes.rank == 0:
                self.relay = RelayServer(nodes, self.world, self.store)
                others = ", ".join(str(n) for n in range(1, nodes.count))
                log_line(f"epinfer: waiting up to {JOIN_TIMEOUT_S:.0f} s for host(s) {others} to join at "
                         f"{nodes.master_addr}:{nodes.master_port}")
            else:
                log_line(f"epinfer: host {nodes.rank}: joined host 0 at {nodes.master_addr}:{nodes.master_port}; "
                         "comparing settings")
            join(self.store, nodes, job, interrupted)
            if nodes.rank and not job.dump_dir:  # one folder name on every host
                job.failure_dir = self.store.get(DUMPS_KEY).decode()
        ctx = mp.get_context("spawn")
        # the ranks' channels: this host's queues only; the server reads the others' through the relay
        inbox = ctx.Queue() if nodes.rank == 0 else None
        outboxes = [ctx.Queue() if r in local else None for r in range(self.world)]
        job.mode = ServeMode(ServeChannels(inbox, outboxes))
        if self.relay is not None:
            outboxes = [self.relay.queues.get(r, q) for r, q in enumerate(outboxes)]
        self.channels = ServeChannels(inbox, outboxes)
        result = os.path.join(self.tmp, "outputs.pkl")
        procs = {r: RankProcess(target=spawned_rank, args=(r, self.world, i, job, result), name=f"epinfer-rank{r}")
                 for i, r in enumerate(local)}
        for p in procs.values():
            p.start()
        remote = self.relay.ranks if self.relay is not None else {}
        self.procs = [procs[r] if r in procs else remote[r] for r in range(self.world) if r in procs or r in remote]

    def wait_ready(self, interrupted=lambda: 0) -> dict:
        """Rank 0's engine info once every rank is in the serving loop; raises `UserError`
        (a bad flag or checkpoint, exit 2) or `RunFailed` when a rank stops first."""
        blame = Blame()
        while True:
            try:
                msg = self.channels.outboxes[0].get(timeout=0.1)
            except queue.Empty:
                msg = None
            if msg is not None and msg[0] == "ready":
                return msg[1]
            codes = [p.exitcode for p in self.procs]
            if interrupted():
                raise Interrupted(interrupted())
            named = blame.verdict(codes)
            if named is None and all(c == 0 for c in codes):
                named = (0, 0)  # every rank ended, none ready
            if named is not None:
                first = named[1]
                code = drain(self.procs, self.store, first, grace=10.0) if first != 0 else first
                messages = rank_errors(self.store, self.world)
                if code == 2 and messages:
                    raise UserError(messages[0])
                logs = keep_rank_logs(self.tmp, self.dump_dir)
                raise RunFailed(EXIT_FAULT if code in (EXIT_FAULT, -9) else code or 1,
                                failure_line(named, messages, self.dump_dir, logs,
                                             "the engine did not start", self.nodes.count == 1))

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
                    on_failure("engine failure: " + "; ".join(dict.fromkeys(self.describe(r) for r, _ in exited)))
                    return
                time.sleep(0.05)

        threading.Thread(target=watch, name="epinfer-rank-monitor", daemon=True).start()

    def describe(self, rank: int) -> str:
        proc = self.procs[rank]
        return getattr(proc, "why", None) or describe_exit(rank, proc.exitcode)

    def forward_usr1(self) -> None:
        """`kill -USR1 <server pid>`: every ready rank dumps its ledger now, without stopping."""
        for rank, p in enumerate(self.procs):
            if p.pid is not None and p.is_alive() and self.store.check([f"{READY_KEY}{rank}"]):
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
            if hasattr(q, "cancel_join_thread"):  # (not: a relayed rank's queue, a rank of another host)
                q.cancel_join_thread()  # never block exit on a queue whose reader is gone
        if self.relay is not None:
            self.relay.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def open_store(nodes: Nodes, interrupted=lambda: 0):
    """The rendezvous store: this process holds it (one host: on a free port; host 0: on
    --master-port, reachable from the others), or host R's client of host 0's, once host 0's port
    answers (`reach`)."""
    if nodes.count == 1:
        return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    where = f"{nodes.master_addr}:{nodes.master_port}"
    if nodes.rank:
        reach(nodes, interrupted)
    try:
        if nodes.rank == 0:
            return dist.TCPStore(nodes.master_addr, nodes.master_port, is_master=True, wait_for_workers=False,
                                 use_libuv=True)
        return dist.TCPStore(nodes.master_addr, nodes.master_port, is_master=False, use_libuv=True,
                             timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S))
    except (RuntimeError, OSError) as exc:
        text = " ".join(str(exc).split())[:160]
        if nodes.rank == 0:
            raise UserError(f"cannot hold the rendezvous store at {where} (--master-addr / --master-port): "
                            f"{text}") from None
        raise unreachable(nodes) from None


HOST = re.compile(r"[A-Za-z0-9._:%\[\]-]+")  # a host name, an IPv4 or IPv6 address


def unreachable(nodes: Nodes) -> UserError:
    return UserError(f"cannot reach host 0's rendezvous store at {nodes.master_addr}:{nodes.master_port} within "
                     f"{JOIN_TIMEOUT_S:.0f} s: start `epinfer serve --nnodes {nodes.count} --node-rank 0` there, or "
                     "check --master-addr / --master-port")


def reach(nodes: Nodes, interrupted) -> None:
    """Host R waits here, in Python, until host 0's port takes a connection: the store's own connect
    retries for minutes inside C++, where a SIGTERM waits for it. A name that does not resolve is
    retried too (host 0's may appear only once it starts), and named at the deadline; one that
    cannot be a host name is refused at once."""
    addr, port = nodes.master_addr, nodes.master_port
    if not HOST.fullmatch(addr):
        raise UserError(f"--master-addr {addr!r} is not a host name or an IP address")
    log_line(f"epinfer: host {nodes.rank}: waiting up to {JOIN_TIMEOUT_S:.0f} s for host 0 at {addr}:{port}")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while True:
        try:
            socket.create_connection((addr, port), timeout=1.0).close()
            return
        except UnicodeError as exc:  # (a label over 63 characters, say)
            raise UserError(f"--master-addr {addr!r} is not a host name or an IP address ({exc})") from None
        except OSError as exc:
            if interrupted():
                raise Interrupted(interrupted()) from None
            if time.monotonic() > deadline:
                if isinstance(exc, socket.gaierror):
                    raise UserError(f"--master-addr {addr!r} did not resolve within {JOIN_TIMEOUT_S:.0f} s "
                                    f"({exc.strerror})") from None
                raise unreachable(nodes) from None
            time.sleep(0.2)


def join(store, nodes: Nodes, job: Job, interrupted=lambda: 0) -> None:
    """The hosts of a run agree before any rank starts: distinct node ranks, the same layout, model
    and dtype (`runtime.agreement`)."""
    if nodes.rank and store.add(f"epinfer/serve/node{nodes.rank}", 1) > 1:
        raise UserError(f"another host already joined this run as --node-rank {nodes.rank}")
    settings = start_settings(job, **{"--nnodes": nodes.count})
    agree(store, nodes.rank, nodes.count, settings, lambda i, _: f"host {i}", JOIN_TIMEOUT_S, scope="serve/",
          interrupted=interrupted)
