"""Launching: the CLI spawns DP × TP ranks itself, runs under `torchrun` (two "hosts" on
localhost), rejects a WORLD_SIZE that isn't dp × tp, and SIGTERM stops every rank."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from epinfer import LLM, SamplingParams
from tests.spawn import free_port

PROMPTS = [[5, 6, 7], list(range(30, 71)), [200], [9, 9, 9, 9, 9]]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def model(ckpt_dir):
    return str(ckpt_dir("qwen3_5_moe"))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in PROMPTS))
    return path


def single(model: str) -> list[list[int]]:
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    return [o.token_ids for o in LLM(model, dtype="float32", device="cpu").generate(PROMPTS, params)]


def gen_args(model, prompts_file, out) -> list[str]:
    return ["generate", "--model", model, "--prompts-file", str(prompts_file), "--max-tokens", "10",
            "--temperature", "0", "--ignore-eos", "--dtype", "float32", "--output", str(out)]


def test_spawned_ranks(model, prompts_file, tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "epinfer", *gen_args(model, prompts_file, out),
                           "--dp", "2", "--tp", "2", "--compare-single"],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "tokens identical to the single-process run (dp=2 tp=2 ep=4): yes, 4/4" in proc.stdout
    assert [r["token_ids"] for r in json.loads(out.read_text())] == single(model)


def test_torchrun_two_hosts(model, prompts_file, tmp_path):
    port = free_port()
    procs = []
    for node in (0, 1):
        out = tmp_path / f"out{node}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "epinfer", *gen_args(model, prompts_file, out), "--dp", "2", "--tp", "2"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=ENV))
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], results
    # global rank 0 lives on node 0 and writes the output; node 1 writes nothing
    assert not (tmp_path / "out1.json").exists()
    assert [r["token_ids"] for r in json.loads((tmp_path / "out0.json").read_text())] == single(model)


def test_world_size_must_match(model, prompts_file, tmp_path):
    env = {**ENV, "RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-m", "epinfer", *gen_args(model, prompts_file, tmp_path / "o"),
                           "--dp", "2", "--tp", "2"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert "WORLD_SIZE=3" in proc.stderr and "Traceback" not in proc.stderr


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_sigterm_stops_every_rank(model, tmp_path):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_token_ids": [i + 1]}) + "\n" for i in range(8)))
    proc = subprocess.Popen([sys.executable, "-m", "epinfer", "generate", "--model", model, "--prompts-file",
                             str(prompts), "--max-tokens", "400", "--ignore-eos", "--dp", "2", "--tp", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    ranks: list[int] = []
    while time.time() < deadline and len(ranks) < 4:
        ranks = [c for c in children_of(proc.pid) if _is_python(c)]
        time.sleep(0.2)
    assert len(ranks) >= 4, "ranks did not start"
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "epinfer: stopped by SIGTERM", err
    time.sleep(0.5)
    alive = [r for r in ranks if os.path.exists(f"/proc/{r}") and b"zombie" not in _status(r)]
    assert not alive, f"ranks still running after SIGTERM: {alive}"


def test_a_signal_while_the_ranks_start_is_one_line(model):
    """SIGTERM the moment the first rank process exists (the others not yet started): one line and
    143, no rank left (it was a wall of 'can only join a started process' tracebacks and exit 1)."""
    proc = subprocess.Popen([sys.executable, "-m", "epinfer", "generate", "--model", model, "--prompt", "x",
                             "--max-tokens", "4", "--dp", "2", "--tp", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    def spawned() -> bool:  # (read from /proc directly: `ps` is too slow to catch the first rank alone)
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if entry.isdigit() and int(stat[stat.rindex(")") + 2:].split()[1]) == proc.pid \
                    and b"spawn_main" in _cmdline(int(entry)):
                return True
        return False

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not spawned():
        pass
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "epinfer: stopped by SIGTERM", err
    assert "Traceback" not in err, err
    time.sleep(0.5)
    assert not [c for c in children_of(proc.pid) if _is_python(c)]


def test_a_stopped_rank_is_named(model, tmp_path):
    """A rank that stops (SIGSTOP) mid-run can neither fault nor dump: its peers' watchdogs fault,
    and the final line names the stopped rank as the one that never ended, which is then killed."""
    prompts = tmp_path / "long.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_token_ids": [i + 1]}) + "\n" for i in range(16)))
    proc = subprocess.Popen([sys.executable, "-m", "epinfer", "generate", "--model", model, "--prompts-file",
                             str(prompts), "--max-tokens", "4000", "--ignore-eos", "--dp", "2",
                             "--collective-timeout", "2", "--dump-dir", str(tmp_path / "dumps")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.time() + 120  # decoding: the first progress line with tokens generated (every 10 s)
    while time.time() < deadline and proc.poll() is None and not any("generated tokens" in line for line in lines):
        time.sleep(0.2)
    ranks = sorted(c for c in children_of(proc.pid) if b"spawn_main" in _cmdline(c))
    assert len(ranks) == 2, ("ranks did not start decoding", lines)
    try:
        os.kill(ranks[1], signal.SIGSTOP)
        proc.wait(timeout=120)
        reader.join(timeout=10)
        err = "".join(lines)
        assert proc.returncode == 3, err
        last = err.strip().splitlines()[-1]
        assert "rank 1 never ended on its own (stuck or stopped) and had to be killed" in last, err
        time.sleep(0.5)
        assert b"zombie" in _status(ranks[1])
    finally:
        with contextlib.suppress(OSError):
            os.kill(ranks[1], signal.SIGKILL)


@pytest.mark.timeout(180)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ranks die with the launcher on Linux only")
def test_ranks_die_with_a_killed_launcher(model, tmp_path):
    """The launcher SIGKILLed: no rank outlives it, neither one it had stopped (SIGSTOP: it never sees
    the lost store) nor one that was decoding, or blocked in a collective with the stopped one."""
    prompts = tmp_path / "long.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_token_ids": [i + 1]}) + "\n" for i in range(16)))
    proc = subprocess.Popen([sys.executable, "-m", "epinfer", "generate", "--model", model, "--prompts-file",
                             str(prompts), "--max-tokens", "4000", "--ignore-eos", "--dp", "2",
                             "--dump-dir", str(tmp_path / "dumps")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    ranks: list[int] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(ranks) < 2:
            ranks = sorted(c for c in children_of(proc.pid) if b"spawn_main" in _cmdline(c))
            time.sleep(0.2)
        assert len(ranks) == 2, "ranks did not start"
        time.sleep(5)  # (decoding)
        os.kill(ranks[1], signal.SIGSTOP)  # (it then never reads the store again; rank 0 waits in a collective)
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.time() + 10
        while time.time() < deadline and (alive := [r for r in ranks if b"zombie" not in _status(r)]):
            time.sleep(0.2)
        assert not alive, f"ranks {alive} of {ranks} outlived their killed launcher"
    finally:
        proc.kill()
        for r in ranks:  # (none is left where the test passes)
            with contextlib.suppress(OSError):
                os.kill(r, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ranks die with the launcher on Linux only")
def test_a_rank_whose_launcher_is_gone_exits_at_once():
    """The launcher died before the rank asked to die with it: the rank sees it has another parent and
    exits (its own pid stands for a parent that is not its parent any more)."""
    check = "from epinfer.runtime.rank_process import die_with_parent as d; import os; d({}); print('on')"
    gone = subprocess.run([sys.executable, "-c", check.format("os.getpid()")], capture_output=True, text=True,
                          timeout=60, env=ENV)
    assert (gone.returncode, gone.stdout) == (1, ""), gone
    here = subprocess.run([sys.executable, "-c", check.format("os.getppid()")], capture_output=True, text=True,
                          timeout=60, env=ENV)
    assert (here.returncode, here.stdout) == (0, "on\n"), here


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _is_python(pid: int) -> bool:
    return b"python" in _cmdline(pid) and b"resource_tracker" not in _cmdline(pid)


def _status(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            return f.read().lower()
    except OSError:
        return b"zombie"


@pytest.mark.parametrize("blocked", [False, True])
def test_sigterm_stops_a_single_process_generate(blocked):
    """One process: a SIGTERM ends it as Ctrl-C does, with its own line and 143, not a bare signal death;
    also when whatever started it had SIGTERM blocked (a child inherits the block: the signal never came)."""
    prompts = [arg for i in range(8) for arg in ("--prompt", f"hi {i}")]  # (a run of seconds on a slow machine too)
    argv = [sys.executable, "-m", "epinfer", "generate", *prompts, "--max-tokens", "100000", "--ignore-eos"]
    if blocked:
        argv = [sys.executable, "-c", "import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, "
                "{signal.SIGTERM}); os.execv(sys.executable, sys.argv[1:])", *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert "generating 8 requests" in proc.stderr.readline()
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "epinfer: stopped by SIGTERM", err


def test_sigterm_while_serve_starts_is_one_line():
    """`serve` stopped by SIGTERM at several moments of its start-up (imports, the model's load, the
    engine's build): each ends with its line and 143, never a bare signal death (the server's own
    handler comes only once it builds the engine)."""
    for delay in (1.5, 2.5, 3.5, 5.0):
        proc = subprocess.Popen([sys.executable, "-m", "epinfer", "serve", "--port", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        try:
            time.sleep(delay)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        lines = err.strip().splitlines()
        assert proc.returncode in (0, 143) and lines, (delay, proc.returncode, err)
        assert lines[-1] in ("epinfer: stopped by SIGTERM", "epinfer: shut down"), (delay, err)


@pytest.mark.timeout(60)
def test_a_rank_that_never_joins_is_said_plainly():
    """A peer that never reaches the process group (stuck or stopped while starting): the store's
    timeout, which names only a key, becomes a sentence with the wait and the likely cause."""
    probe = ("import datetime, torch.distributed as dist\n"
             "from epinfer.runtime.worker import JoinTimeout, join_process_group\n"
             "store = dist.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)\n"
             "try:\n"
             "    join_process_group(dict(backend='gloo', rank=0, world_size=2, store=dist.PrefixStore('pg', store),\n"
             "                            timeout=datetime.timedelta(seconds=1)))\n"
             "except JoinTimeout as exc:\n"
             "    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=50, env=ENV)
    assert proc.stdout.strip() == ("the 2 ranks did not all join the process group within 1 s: a rank stuck, "
                                   "stopped or lost while starting"), (proc.stdout, proc.stderr)
