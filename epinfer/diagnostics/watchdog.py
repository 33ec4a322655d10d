"""The watchdog: a thread per rank that turns hangs and dead peers into a clear exit.

Every `interval` seconds it publishes this rank's position (step, next seq per group, the
collective it is inside) as a heartbeat in the rendezvous store, then checks three things:
  - this rank has been inside one collective (or one step) longer than the timeout;
  - another rank asked everybody to stop (the `abort` key: a peer failed, or the launcher saw a
    rank die);
  - a peer's heartbeat went stale (killed, or aborted inside the backend).
On any of them it writes this rank's ledger and all Python stacks, sets the abort key so every
other live rank dumps too, prints one line naming label, seq, step and what it waits for, and
exits the process with code 3. The store lives in the launcher (or torchrun's rendezvous), not in
a rank, so it outlives any rank.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import sys
import threading
import time
from pathlib import Path

ABORT_KEY = "epinfer/abort"
READY_KEY = "epinfer/ready/"  # + rank: its SIGUSR1 handler is installed
EXIT_FAULT = 3
STARTUP_S = 60.0  # the least a start-up (step -1) may take before the watchdog calls it stuck


ACTIVE: dict = {}  # this process's running watchdog ("watchdog"), for the SIGTERM thread of a torchrun rank


def hb_key(rank: int) -> str:
    return f"epinfer/hb/{rank}"


class Watchdog(threading.Thread):
    def __init__(self, ledger, store, rank: int, world: int, timeout: float, dump_dir: str,
                 groups: dict[str, list[int]], interval: float = 0.5, device=None,
                 store_addr: str = "the rendezvous store") -> None:
        super().__init__(name="epinfer-watchdog", daemon=True)
        self.store_addr = store_addr
        self.tick_since: float | None = None  # when the tick now running started (its store calls may block)
        self.ledger, self.store, self.rank, self.world = ledger, store, rank, world
        self.timeout, self.dump_dir, self.groups, self.interval = timeout, dump_dir, groups, interval
        self.dead_after = max(5.0, min(timeout, 30.0))
        self.stopped = threading.Event()
        self.fired = threading.Lock()
        self.step_started = time.time()
        self.last_step = -1
        self.device = device  # polling a replay's CUDA event: this thread works on the rank's GPU
        self.teardown: tuple[float, float] | None = None  # (deadline, limit) once the run is over

    def stop(self) -> None:
        self.stopped.set()

    def tearing_down(self, limit: float) -> None:
        """The run is over and the process group is being shut down: peers leaving is expected now,
        and a shutdown that takes longer than `limit` seconds is reported (exit 3) instead of hanging."""
        self.teardown = (time.time() + limit, limit)

    def idle_tick(self) -> None:
        """An idle iteration of a serving loop: no step id is used, but the loop is alive."""
        self.step_started = time.time()

    def run(self) -> None:
        ACTIVE["watchdog"] = self
        if self.device is not None and self.device.type == "cuda":
            import torch

            with contextlib.suppress(Exception):  # only the replay-event polling needs it
                torch.cuda.set_device(self.device)
        threading.Thread(target=self._sentinel, name="epinfer-watchdog-sentinel", daemon=True).start()
        peers_checked = 0.0
        while not self.stopped.wait(self.interval):
            self.tick_since = time.time()
            try:
                self._tick(peers_checked)
            except Exception as exc:  # the store itself went away: nobody can coordinate any more
                if not self.stopped.is_set():
                    self.fire(f"lost the rendezvous store ({type(exc).__name__}: {exc})", announce=False)
            self.tick_since = None
            if time.time() - peers_checked > 1.0:
                peers_checked = time.time()

    def _sentinel(self) -> None:
        """A store call that never returns (the link to the store's host is cut: TCP retransmits
        for many minutes, no error) would silence the watchdog: a tick blocked longer than a dead
        peer's heartbeat limit is reported from here, from what this rank knows alone."""
        while not self.stopped.wait(1.0):
            since = self.tick_since
            if since is not None and time.time() - since > self.dead_after and not self.stopped.is_set():
                pos = self.ledger.position()
                cur = pos["current"]
                peers = [r for r in self.groups.get(cur["group"], []) if r != self.rank] if cur else []
                with_whom = f" with ranks {peers}" if peers else ""
                self.fire(f"{self.store_addr} has not answered for {time.time() - since:.0f} s (its host "
                          f"unreachable or gone); this rank was at {self._where(pos)}{with_whom}", announce=False)

    def _step_limit(self, step: int) -> float:
        """A step may take two collective timeouts; start-up (step -1: the model loads, CUDA graphs
        are captured) at least STARTUP_S, as loading is no collective wait. A start-up collective
        that hangs is still caught by its own timeout, and a dead peer by its heartbeat."""
        limit = 2 * self.timeout + 5
        return limit if step >= 0 else max(limit, STARTUP_S)

    def _tick(self, peers_checked: float) -> None:
        pos = self.ledger.position()
        self.store.set(hb_key(self.rank), json.dumps(pos))
        now = time.time()
        if self.store.check([ABORT_KEY]):
            reason = self.store.get(ABORT_KEY).decode()
            self.fire(f"stopping because {reason}", announce=False)
        if self.teardown is not None:
            if now > self.teardown[0]:
                self.fire(f"the process group did not shut down within {self.teardown[1]:.0f} s after the run "
                          f"finished (destroy_process_group stuck; results may be complete)")
            return
        cur = pos["current"]
        if cur is not None and now - cur["t0"] > self.timeout:
            self.fire(f"stuck {now - cur['t0']:.1f} s in {cur['label']} ({cur['group']} seq {cur['seq']}, "
                      f"step {pos['step']}); {self._waiting_for(cur)}")
        if pos["step"] != self.last_step:
            self.last_step, self.step_started = pos["step"], now
        elif now - self.step_started > self._step_limit(pos["step"]):
            self.fire(f"step {pos['step']} has run {now - self.step_started:.1f} s without finishing")
        if now - peers_checked > 1.0:
            dead = self._stale_peers(now)
            if dead:
                self.fire(f"ranks {dead} stopped sending heartbeats (dead?); this rank was at "
                          f"{self._where(pos)}")

    def _peer(self, rank: int) -> dict | None:
        key = hb_key(rank)
        if not self.store.check([key]):
            return None
        return json.loads(self.store.get(key))

    def _stale_peers(self, now: float) -> list[int]:
        dead = []
        for r in range(self.world):
            if r == self.rank:
                continue
            pos = self._peer(r)
            if pos is not None and now - pos["t"] > self.dead_after:
                dead.append(r)
        return dead

    def _waiting_for(self, cur: dict) -> str:
        """Which peers have not reached this (group, seq), or reached it in another collective. A
        CUDA graph replay (group `graph`) runs the collectives it `covers`: a peer replaying one that
        holds this collective, or sitting eagerly in one that this rank's replay holds, is a mismatch
        (one rank captured, the other did not), not a peer that passed or has not arrived."""
        group, seq = cur["group"], cur["seq"]
        missing, elsewhere = [], []
        for r in self.groups.get(group, []):
            if r == self.rank:
                continue
            pos = self._peer(r)
            if pos is None:
                missing.append(r)
                continue
            peer = pos["current"] or {}
            if _replay_holds(peer, group, seq, pos["seq"]):
                elsewhere.append(f"rank {r} in the CUDA graph replay {peer['label']}")
            elif _replay_holds(cur, peer.get("group"), peer.get("seq"), self.ledger.seq):
                elsewhere.append(f"rank {r} in {peer['label']} outside any graph")
            elif pos["seq"].get(group, 0) <= seq:
                missing.append(r)
            elif peer.get("group") == group and peer.get("seq") == seq and peer.get("label") != cur["label"]:
                elsewhere.append(f"rank {r} in {peer['label']}")
        parts = [f"waiting for ranks {missing}"] if missing else []
        if elsewhere:
            parts.append("mismatch: " + ", ".join(elsewhere))
        return "; ".join(parts) or "all peers passed this collective"

    @staticmethod
    def _where(pos: dict) -> str:
        cur = pos["current"]
        if cur is None:
            return f"step {pos['step']}, between collectives"
        return f"{cur['label']} ({cur['group']} seq {cur['seq']}, step {pos['step']})"

    def await_exit(self, grace: float = 60.0) -> None:
        """After `fire` returned because another thread is firing: that thread dumps and exits the
        process; never carry on meanwhile (exit 3 here if it somehow has not within `grace` s)."""
        time.sleep(grace)
        os._exit(EXIT_FAULT)

    def fire(self, message: str, announce: bool = True, status: str = "fault") -> None:
        """Dump, tell the others, print one line, exit 3. Safe to call from any thread."""
        if not self.fired.acquire(blocking=False):
            return
        try:
            if announce:  # the store may be gone; the dump below still happens
                with contextlib.suppress(Exception):
                    self.store.compare_set(ABORT_KEY, "", f"rank {self.rank} {message}")
            where = f"dumps in {self.dump_dir}"
            try:
                write_dumps(self.ledger, self.dump_dir, status, message)
            except Exception as exc:  # the line matters more than the dump: it is printed whatever happens
                where = f"its dump could not be written to {self.dump_dir} ({type(exc).__name__}: {exc})"
            log_line(f"epinfer: rank {self.rank}: {message}; {where}")
        finally:
            os._exit(EXIT_FAULT)


def _replay_holds(current: dict, group: str | None, seq: int | None, next_seq: dict) -> bool:
    """Whether `current` (a rank's current entry) is a graph replay that runs collective (group, seq):
    its covered range of `group` starts at covers[group] and ends before that rank's next seq."""
    covers = current.get("covers") or {}
    return current.get("group") == "graph" and group in covers and covers[group] <= seq < next_seq.get(group, 0)


_CONSOLE = {"fd": None}  # where log_line writes: the user's stderr, also once a rank's fd 2 is a log file


def log_line(text: str) -> None:
    """One write per line: ranks share stderr, and print() may split text and newline."""
    fd = _CONSOLE["fd"]
    with contextlib.suppress(OSError, ValueError):  # nobody reads stderr any more (a closed pipe): go on
        os.write(sys.stderr.fileno() if fd is None else fd, (text + "\n").encode())


def divert_stderr(path: str) -> None:
    """In a spawned rank: fd 2 (the backend's own lines, e.g. Gloo's `[.../pair.cc:553] Connection
    closed by peer`, Python warnings and tracebacks) goes to the file `path`; epinfer's own one-line
    messages (`log_line`) still reach the user's stderr. The launcher keeps the file with the dumps
    when the run fails."""
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _CONSOLE["fd"] = os.dup(2)
    os.dup2(log, 2)
    os.close(log)


def write_dumps(ledger, dump_dir: str, status: str, reason: str | None) -> None:
    ledger.dump(dump_dir, status, reason)
    with open(Path(dump_dir) / f"rank{ledger.info['rank']}.stacks.txt", "w") as f:
        faulthandler.dump_traceback(f, all_threads=True)
