"""`epinfer serve` on several hosts: host 0 serves HTTP, the others only run engine ranks.

Each host runs `epinfer serve ... --nnodes N --node-rank R --master-addr HOST0` and spawns its share
of the ranks: `dp × tp / N` consecutive world ranks, whole replicas, so TP stays inside a host and
the EP / DP collectives cross the network. Host 0 holds the rendezvous store on `--master-port`;
the hosts first agree on the layout, the model and the dtype (`runtime.agreement`: a mismatch is
one line on every host, not a hang).

The ranks of host R > 0 cannot reach host 0's queues, so host R's process relays them: every
message its ranks put on their outboxes, and each rank's exit code, goes over one TCP connection to
host 0 (`Relay`), whose server reads them from ordinary queues as if the ranks were local
(`RemoteRank` stands in for their processes). A host whose connection closes before its ranks
reported their exit is lost: its ranks count as failed, the in-flight requests get errors and the
server exits 3, as for a lost local rank. Frames carry plain values only (lists, numbers, text);
anything else on the connection is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import pickle
import queue
import secrets
import socket
import struct
import threading
import time

from epinfer.core.errors import Interrupted, UserError, noting_signals
from epinfer.diagnostics.watchdog import EXIT_FAULT, log_line

RELAY_KEY = "epinfer/serve/relay"
DUMPS_KEY = "epinfer/serve/dumps"
JOIN_TIMEOUT_S = 300.0  # how long host 0 waits for the others to join (and they for host 0)
FRAME = struct.Struct("!I")
MAX_FRAME = 64 << 20


@dataclasses.dataclass
class Nodes:
    count: int = 1
    rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500

    @classmethod
    def from_args(cls, args, dp: int, tp: int) -> Nodes:
        nodes = cls(args.nnodes, args.node_rank, args.master_addr, args.master_port)
        if nodes.count < 1 or not 0 <= nodes.rank < nodes.count:
            raise UserError(f"--node-rank must be in 0..{max(nodes.count, 1) - 1} and --nnodes >= 1, "
                            f"got --nnodes {nodes.count} --node-rank {nodes.rank}")
        if nodes.count > 1:
            if not nodes.master_addr:
                raise UserError("--nnodes > 1 needs --master-addr: host 0's address, the same on every host")
            if dp % nodes.count:
                raise UserError(f"--nnodes {nodes.count} needs --dp to be a multiple of it: each host runs whole "
                                f"replicas (TP stays inside a host); got --dp {dp} --tp {tp}")
            if not 0 < nodes.master_port < 65536:
                raise UserError(f"--master-port must be a TCP port, got {nodes.master_port}")
        return nodes

    def ranks_of(self, node: int, world: int) -> range:
        share = world // self.count
        return range(node * share, (node + 1) * share)

    def local_ranks(self, world: int) -> range:
        return self.ranks_of(self.rank, world)

    def node_of(self, rank: int, world: int) -> int:
        return rank // (world // self.count)


def send_frame(sock: socket.socket, message: tuple) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(FRAME.pack(len(data)) + data)


class _PlainValues(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"a relay frame may carry plain values only, not {module}.{name}")


def read_frames(sock: socket.socket):
    """The frames of a connection until it closes (a short or oversized frame ends it too)."""
    stream = sock.makefile("rb")
    while True:
        head = stream.read(FRAME.size)
        if len(head) < FRAME.size:
            return
        (size,) = FRAME.unpack(head)
        data = stream.read(size) if size <= MAX_FRAME else b""
        if len(data) < size or not size:
            return
        yield _PlainValues(io.BytesIO(data)).load()


class RemoteRank:
    """A rank on another host, as `multiprocessing.Process` looks to `RankSet`: its exit code once
    the relay reports it (or loses the host); nothing to terminate from here."""

    pid = None

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.exitcode: int | None = None
        self.why: str | None = None
        self.ended = threading.Event()

    def is_alive(self) -> bool:
        return self.exitcode is None

    def set_exit(self, code: int, why: str | None = None) -> None:
        if self.exitcode is None:
            self.exitcode, self.why = code, why
            self.ended.set()

    def join(self, timeout: float | None = None) -> None:
        self.ended.wait(timeout or 0.0)

    def terminate(self) -> None:  # (its own host stops it: its watchdog, the abort key)
        pass

    kill = terminate


class RelayServer:
    """Host 0's end: one connection per other host; their ranks' messages land in `queues[rank]`."""

    def __init__(self, nodes: Nodes, world: int, store) -> None:
        self.nodes, self.world = nodes, world
        remote = [r for r in range(world) if nodes.node_of(r, world) != 0]
        self.queues = {r: queue.Queue() for r in remote}
        self.ranks = {r: RemoteRank(r) for r in remote}
        self.token = secrets.token_hex(16)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(nodes.count)
        store.set(RELAY_KEY, f"{self.sock.getsockname()[1]} {self.token}")
        threading.Thread(target=self._accept, name="epinfer-relay", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="epinfer-relay-host", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        node = None
        try:
            frames = read_frames(conn)
            hello = next(frames, None)
            if not (isinstance(hello, tuple) and len(hello) == 3 and hello[0] == "hello" and hello[2] == self.token
                    and isinstance(hello[1], int) and 0 < hello[1] < self.nodes.count):
                return  # not one of this run's hosts
            node = hello[1]
            mine = set(self.nodes.ranks_of(node, self.world))
            for frame in frames:
                kind, rank = frame[0], frame[1]
                if rank not in mine:
                    continue
                if kind == "out":
                    self.queues[rank].put(frame[2])
                elif kind == "exit":
                    self.ranks[rank].set_exit(int(frame[2]))
        except (OSError, pickle.UnpicklingError, EOFError, IndexError, TypeError, ValueError):
            pass
        finally:
            conn.close()
            if node is not None:
                lost = [r for r, p in self.ranks.items() if self.nodes.node_of(r, self.world) == node and p.is_alive()]
                for r in lost:
                    self.ranks[r].set_exit(1, f"host {node} (ranks {lost}) was lost: its connection to host 0 closed")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class RelayClient:
    """Host R's end: forwards its ranks' outboxes and exit codes to host 0."""

    def __init__(self, nodes: Nodes, store, outboxes: dict) -> None:
        port, token = store.get(RELAY_KEY).decode().split()
        try:
            self.sock = socket.create_connection((nodes.master_addr, int(port)), timeout=30)
        except OSError as exc:
            raise UserError(f"cannot reach host 0's relay at {nodes.master_addr}:{port}: {exc}") from None
        self.sock.settimeout(None)
        self.lock = threading.Lock()
        self.lost = threading.Event()
        self.send(("hello", nodes.rank, token))
        for rank, outbox in outboxes.items():
            threading.Thread(target=self._forward, args=(rank, outbox), name=f"epinfer-relay-rank{rank}",
                             daemon=True).start()

    def send(self, message: tuple) -> None:
        try:
            with self.lock:
                send_frame(self.sock, message)
        except OSError:
            self.lost.set()

    def _forward(self, rank: int, outbox) -> None:
        while not self.lost.is_set():
            try:
                message = outbox.get(timeout=0.2)
            except queue.Empty:
                continue
            except (OSError, EOFError, ValueError):
                return
            self.send(("out", rank, message))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def run_headless(ranks) -> int:
    """Host R > 0: its ranks run until the run stops (host 0's joint stop, a fault, host 0 lost).
    Returns the exit code: 0, 2 (a rank's one-line error) or 3."""
    nodes = ranks.nodes
    with noting_signals() as signals, contextlib.ExitStack() as stack:
        stack.callback(ranks.close)
        ranks.start(signals.first)
        local = dict(zip(nodes.local_ranks(ranks.world), ranks.procs, strict=True))
        relay = RelayClient(nodes, ranks.store, {r: ranks.channels.outboxes[r] for r in local})
        log_line(f"epinfer: host {nodes.rank}: {span(list(local))} of the run served by host 0 "
                 f"({nodes.master_addr}); it stops with that run")
        reported: set[int] = set()
        stopped_by = 0  # the signal this host was told to stop by
        while len(reported) < len(local):
            for r, proc in local.items():
                if proc.exitcode is not None and r not in reported:
                    reported.add(r)
                    relay.send(("exit", r, proc.exitcode))
            if signals.first():  # this host is told to stop: its ranks go, and host 0 sees them fail
                log_line(f"epinfer: host {nodes.rank}: stopping {span(list(local))} (signal)")
                ranks.close()
                stopped_by = stopped_by or signals.first()
                signals.clear()
            time.sleep(0.05)
        relay.close()
        if stopped_by:
            raise Interrupted(stopped_by)
        codes = {r: proc.exitcode for r, proc in local.items()}
        if all(c == 0 for c in codes.values()):
            log_line(f"epinfer: host {nodes.rank}: every rank stopped with the run")
            return 0
        errors = ranks.errors()
        if 2 in codes.values() and errors:
            raise UserError(errors[0])
        for line in errors:
            log_line(f"epinfer: {line}")
        log_line(f"epinfer: error: host {nodes.rank}: ranks ended with exit codes {codes}; dumps in "
                 f"{ranks.dump_dir}: put them beside host 0's and run `epinfer doctor`")
        return EXIT_FAULT


def span(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
