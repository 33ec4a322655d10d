"""Launching a parallel run.

`launch(job)` spawns DP × TP ranks on this machine: the launcher process hosts the rendezvous
store on a free port (so any rank may die without taking the store with it), starts one process
per rank, stops all of them on Ctrl-C / SIGTERM or as soon as one fails, and returns rank 0's
outputs. Under `torchrun` (RANK / WORLD_SIZE in the environment) this process *is* a rank:
`run_torchrun(job)` checks WORLD_SIZE == dp × tp and runs it.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing as mp
import os
import pickle
import queue
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch.distributed as dist

from epinfer.core.env import mark_spawned
from epinfer.core.errors import Interrupted, RunFailed, UserError
from epinfer.core.layout import check_layout
from epinfer.diagnostics.watchdog import ABORT_KEY, ACTIVE, EXIT_FAULT, READY_KEY, divert_stderr
from epinfer.runtime.agreement import torchrun_agree
from epinfer.runtime.job import Job
from epinfer.runtime.rank_process import RankProcess
from epinfer.runtime.worker import worker_main

ERROR_KEY = "epinfer/error/"


def failure_dir() -> str:
    return os.path.join("epinfer-dumps", time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}")


DUMP_FILE = re.compile(r"rank\d+\.(jsonl|stderr\.txt|tmp\d+)")  # a ledger, a rank's stderr, a dump being written
LEDGER = re.compile(r"rank\d+\.jsonl")


def prepare_dump_dir(job: Job) -> None:
    """--dump-dir replaces the files of an earlier run; without it, failures get a new folder."""
    if job.dump_dir:
        try:
            Path(job.dump_dir).mkdir(parents=True, exist_ok=True)
            for old in Path(job.dump_dir).iterdir():  # epinfer's own files only, never the user's
                if DUMP_FILE.fullmatch(old.name) and old.is_file():
                    old.unlink()
        except OSError as exc:
            raise UserError(f"--dump-dir {job.dump_dir}: cannot use it ({exc.strerror or exc})") from None
    else:
        job.failure_dir = failure_dir()


def route_interface(addr: str) -> str | None:
    """The name of this host's network interface that reaches `addr` (Linux, IPv4), or None."""
    try:
        target = socket.gethostbyname(addr)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))  # a UDP connect sends nothing: it only picks the route
            local = s.getsockname()[0]
        for _, name in socket.if_nameindex():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
                info = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                if socket.inet_ntoa(info[20:24]) == local:
                    return name
    except OSError:
        return None
    return None


SIOCGIFADDR = 0x8915


def gloo_towards(master: str) -> None:
    """Across hosts Gloo must listen where the peers can reach it, not on the address the host name
    resolves to (often loopback): the interface that routes to the master host (unless set)."""
    if "GLOO_SOCKET_IFNAME" not in os.environ and not master.startswith("127.") and master != "localhost":
        name = route_interface(master)
        if name is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = name


def dump_on_sigterm() -> None:
    """torchrun ends the other ranks of a host with SIGTERM once one has failed. A rank blocked in a
    collective never returns to the interpreter to run a Python handler, so SIGTERM is blocked in
    every thread (call this before any other thread starts) and one thread waits for it: the rank
    then writes its dump (status `terminated`, for the doctor) and exits."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        signal.sigwait({signal.SIGTERM})
        dog = ACTIVE.get("watchdog")
        if dog is not None:  # (it exits the process)
            dog.fire("stopped by SIGTERM (torchrun stops every rank of a host once one has failed)",
                     announce=False, status="terminated")
            dog.await_exit(grace=10.0)  # it returned: another thread is already firing (and exits)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=wait, name="epinfer-sigterm", daemon=True).start()


def check_torchrun_env() -> None:
    """RANK and WORLD_SIZE are set: torchrun sets them with MASTER_ADDR and MASTER_PORT, and
    LOCAL_RANK and GROUP_RANK, all numbers but the address, RANK below WORLD_SIZE; a cluster's
    leftovers may be only some of them (a one-line error, not a rendezvous that retries)."""
    def refuse(name: str, text: str):
        return UserError(f"RANK and WORLD_SIZE are set but {name}={text!r} is not what torchrun sets: run under "
                         "torchrun, or unset RANK and WORLD_SIZE")

    for name, low, high in (("RANK", 0, None), ("WORLD_SIZE", 1, None), ("MASTER_PORT", 1, 65535),
                            ("LOCAL_RANK", 0, None), ("GROUP_RANK", 0, None)):
        text = os.environ.get(name, "")
        if not text and name in ("LOCAL_RANK", "GROUP_RANK"):  # (read as 0 when unset)
            continue
        if not (text.isascii() and text.isdecimal()) or int(text) < low or (high and int(text) > high):
            raise refuse(name, text)
    if int(os.environ["RANK"]) >= int(os.environ["WORLD_SIZE"]):
        raise refuse("RANK", os.environ["RANK"])
    if not os.environ.get("MASTER_ADDR", "").strip():
        raise refuse("MASTER_ADDR", os.environ.get("MASTER_ADDR", ""))


def run_torchrun(job: Job) -> list | None:
    check_torchrun_env()
    world = int(os.environ["WORLD_SIZE"])
    dump_on_sigterm()
    try:
        check_layout(job.dp, job.tp, world)
    except UserError as exc:
        torchrun_agree(job, world, exc)
    torchrun_agree(job, world)  # hosts that disagree on the layout or model: one line, not a hang
    gloo_towards(os.environ.get("MASTER_ADDR", "127.0.0.1"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if job.dump_dir:
        Path(job.dump_dir).mkdir(parents=True, exist_ok=True)
    else:  # one folder name for all ranks of this run, without a collective
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "run")
        port = os.environ.get("MASTER_PORT", "0")
        job.failure_dir = os.path.join("epinfer-dumps", f"torchrun-{run_id}-{port}")
    return worker_main(rank, world, local_rank, job)


def spawned_rank(rank: int, world: int, local_rank: int, job: Job, result_path: str) -> None:
    """A spawned rank (the launcher's store at `job.store_addr`). Its own stderr goes to
    `rank<N>.stderr.txt` beside `result_path` (kept with the dumps if the run fails,
    `keep_rank_logs`); epinfer's one-line messages still reach the user."""
    mark_spawned()
    divert_stderr(str(Path(result_path).parent / f"rank{rank}.stderr.txt"))
    host, port = job.store_addr
    store = dist.TCPStore(host, port, is_master=False, use_libuv=True)
    try:
        outputs = worker_main(rank, world, local_rank, job, dist.PrefixStore("pg", store))
        if rank == 0:
            Path(result_path).write_bytes(pickle.dumps(outputs))
    except UserError as exc:
        store.set(f"{ERROR_KEY}{rank}", str(exc))
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BaseException as exc:
        store.set(f"{ERROR_KEY}{rank}", f"rank {rank}: {type(exc).__name__}: {exc}")
        raise


def launch(job: Job, progress_bar=None) -> list:
    """`progress_bar`: a progress display (a bar on a terminal, log lines elsewhere) the leaders report to."""
    world = job.dp * job.tp
    check_layout(job.dp, job.tp)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    prepare_dump_dir(job)
    job.store_addr = ("127.0.0.1", store.port)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="epinfer-") as tmp:
        result_path = os.path.join(tmp, "outputs.pkl")
        if progress_bar is not None:
            job.progress = ctx.Queue()
        procs = [RankProcess(target=spawned_rank, args=(r, world, r, job, result_path),
                             name=f"epinfer-rank{r}") for r in range(world)]
        stop = _install_stop(procs, store)
        stuck: list[int] = []
        try:
            for p in procs:
                if stop["signal"]:  # (a signal while the ranks start: the rest are not started)
                    break
                p.start()
            code, first = _wait(procs, stop, lambda: _draw_progress(job.progress, progress_bar))
            _draw_progress(job.progress, progress_bar)  # the leaders' last reports
            if code != 0 and not stop["signal"]:
                code = drain(procs, store, code)
                stuck = [r for r, p in enumerate(procs) if p.is_alive()]  # (they ignored the abort too)
        finally:
            terminate(procs)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if code != 0:
            messages = rank_errors(store, world)
            if code == 2 and messages:
                raise UserError(messages[0])
            if stop["signal"]:
                raise Interrupted(stop["signal"])
            if stuck:  # a rank stopped (SIGSTOP) or stuck outside Python never ends or says why
                messages.append(f"{span_of(stuck)} never ended on {'its' if len(stuck) == 1 else 'their'} own "
                                "(stuck or stopped) and had to be killed")
            where = job.dump_dir or job.failure_dir
            raise RunFailed(EXIT_FAULT if code in (EXIT_FAULT, -9) else code,
                            failure_line(first, messages, where, keep_rank_logs(tmp, where)))
        return pickle.loads(Path(result_path).read_bytes())


def span_of(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"


def _install_stop(procs: list, store) -> dict:
    stop = {"signal": None}

    def handler(signum, frame):
        stop["signal"] = signum
        terminate(procs)

    def forward_usr1(signum, frame):  # "dump now" for a job that looks stuck
        for rank, p in enumerate(procs):
            if p.is_alive() and store.check([f"{READY_KEY}{rank}"]):
                os.kill(p.pid, signal.SIGUSR1)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGUSR1, forward_usr1)
    return stop


OWN_REPORT_S = 3.0  # after a rank fails, how long the others may take to end (and report) on their own


def drain(procs: list, store, first_code: int, grace: float = 20.0) -> int:
    """A rank failed: give the others OWN_REPORT_S to end on their own (ranks that met the same fault,
    a collective mismatch say, then each print their own line rather than the abort's), then ask every
    live rank to dump and stop (the abort key their watchdogs poll), give them `grace` seconds, and
    stop the rest. Returns 3 if any rank reported a fault, unless the first rank to fail raised a
    one-line error (exit 2): the peers' faults then only say they lost it."""
    _await_ranks(procs, OWN_REPORT_S)
    dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
    with contextlib.suppress(Exception):
        store.compare_set(ABORT_KEY, "", f"rank {dead[0]} exited with code {procs[dead[0]].exitcode}")
    _await_ranks(procs, grace)
    codes = [p.exitcode for p in procs]
    return EXIT_FAULT if EXIT_FAULT in codes and first_code != 2 else first_code


def _await_ranks(procs: list, seconds: float) -> None:
    """Until every rank has ended or is stopped (SIGSTOP: it can't end or dump), or `seconds` have passed."""
    deadline = time.time() + seconds
    while time.time() < deadline and any(p.is_alive() and not _stopped(p.pid) for p in procs):
        time.sleep(0.05)


def _stopped(pid: int) -> bool:
    """A process in the stopped state (Linux's /proc; elsewhere never known)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].startswith(("T", "t"))


def _draw_progress(progress, bar) -> None:
    if bar is None:
        return
    with contextlib.suppress(queue.Empty):
        while True:  # (dp_rank, requests done, prompt tokens, generated tokens)
            bar.update_replica(*progress.get_nowait())
    bar.tick()  # no report yet (ranks starting) still redraws the bar / logs the wait


FAULT_GRACE_S = 3.0


class Blame:
    """Which failed rank a failed run names. A rank that stopped on a fault (exit 3) usually reacts to
    another's end (a peer that raised a one-line error, exit 2, may still be leaving): while only
    such faults are seen, the others get FAULT_GRACE_S to exit; then a rank that did not fault is
    named before one that did, and among those alike the first seen failing."""

    def __init__(self) -> None:
        self.first_seen: dict[int, float] = {}

    def verdict(self, codes: list[int | None]) -> tuple[int, int] | None:
        """(rank, exit code) to name, once it is known; None while no rank failed or the grace runs."""
        now = time.time()
        for rank, code in enumerate(codes):
            if code not in (None, 0):
                self.first_seen.setdefault(rank, now)
        if not self.first_seen:
            return None
        rank = min(self.first_seen, key=lambda r: (codes[r] == EXIT_FAULT, self.first_seen[r], r))
        settled = all(c is not None for c in codes) or now - min(self.first_seen.values()) > FAULT_GRACE_S
        return (rank, codes[rank]) if codes[rank] != EXIT_FAULT or settled else None


def _wait(procs: list, stop: dict, tick=lambda: None) -> tuple[int, tuple[int, int] | None]:
    """Waits for all ranks; as soon as one fails (`Blame`), the others are stopped (they would
    otherwise wait in their next collective). Returns (code, (rank, exit code) of the rank to blame)."""
    blame = Blame()
    while True:
        tick()
        codes = [p.exitcode for p in procs]
        named = blame.verdict(codes)
        if named is not None:
            return named[1], named
        if stop["signal"]:
            return 130, None
        if all(c == 0 for c in codes):
            return 0, None
        time.sleep(0.05)


def describe_exit(rank: int, code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"rank {rank} was killed by {signal.Signals(-code).name}"
    if code == EXIT_FAULT:
        return f"rank {rank} stopped on a fault (exit {code})"
    return f"rank {rank} exited with code {code}"


def failure_line(first: tuple[int, int] | None, messages: list[str], where: str, logs: list[str],
                 what: str = "parallel run failed", every_rank_here: bool = True) -> str:
    """The one line a failed parallel run ends with: the failed rank and its exit cause, what the
    ranks said, and where the dumps (and the ranks' own stderr) are; "no rank wrote a dump" only
    where `where` is every rank's folder (`every_rank_here`: one host)."""
    cause = describe_exit(*first) if first is not None else "a rank failed"
    said = f" ({'; '.join(messages)})" if messages else ""
    kept = f", the ranks' own output in {', '.join(logs)}" if logs else ""
    if every_rank_here and not any(LEDGER.fullmatch(p.name) for p in Path(where).glob("rank*")):
        own = f" (the ranks' own output in {where}: {', '.join(logs)})" if logs else ""
        return f"{what}: {cause}{said}; no rank wrote a dump{own}"  # (stopped before any ledger existed)
    return f"{what}: {cause}{said}; dumps in {where}{kept}: run `epinfer doctor {where}`"


def keep_rank_logs(folder: str, dump_dir: str) -> list[str]:
    """The non-empty `rank<N>.stderr.txt` of `folder`, moved into the dump folder (their names)."""
    kept = []
    for path in sorted(Path(folder).glob("rank*.stderr.txt")):
        if path.stat().st_size:
            with contextlib.suppress(OSError):
                Path(dump_dir).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, Path(dump_dir) / path.name)
                kept.append(path.name)
    return kept


def terminate(procs: list, grace: float = 3.0) -> None:
    """Stops the started ranks (SIGTERM, then SIGKILL after `grace`); ranks not yet started are left."""
    procs = [p for p in procs if p.pid is not None]  # (a signal may come while they are being started)
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.time() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join()


def rank_errors(store, world: int) -> list[str]:
    messages = []
    for r in range(world):
        key = f"{ERROR_KEY}{r}"
        if store.check([key]):
            msg = store.get(key).decode()
            if msg not in messages:
                messages.append(msg)
    return messages
