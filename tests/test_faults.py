"""Diagnostics on CPU / Gloo, dp=2 tp=2 on the shipped hybrid demo model: every injected fault
ends the run on its own with exit 3 and dumps, and `epinfer doctor` names the rank, the MoE
collective and the step; with --check-collectives the mismatch is an immediate error instead."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_launch import children_of

# a healthy rank on a loaded 2-core machine has stalled over 4 s at one collective, which then
# ended a run as a hang before its injected fault fired
TIMEOUT = 8.0
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
PROMPTS = ["--prompt", "Beautiful is better than", "--prompt", "Errors should never"]


def run(dump_dir, *extra, max_tokens=8, layout=("--dp", "2", "--tp", "2")):
    cmd = [sys.executable, "-m", "epinfer", "generate", *PROMPTS, *layout,
           "--max-tokens", str(max_tokens), "--dump-dir", str(dump_dir),
           "--collective-timeout", str(TIMEOUT), *extra]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT + 120, env=ENV)
    return proc, time.time() - start


def doctor(dump_dir) -> dict:
    proc = subprocess.run([sys.executable, "-m", "epinfer", "doctor", str(dump_dir), "--json"],
                          capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def dumps_of(dump_dir) -> set[int]:
    return {int(p.name[4:-6]) for p in dump_dir.glob("rank*.jsonl")}


CASES = [("skip-collective", 1, 1), ("skip-collective", 2, 3), ("wrong-size", 2, 3), ("wrong-size", 3, 1),
         ("reorder", 1, 2), ("reorder", 0, 4), ("kill", 3, 2), ("kill", 0, 4)]


@pytest.mark.parametrize("kind,rank,step", CASES)
def test_fault_is_diagnosed(kind, rank, step, tmp_path):
    proc, elapsed = run(tmp_path, "--fault", kind, "--fault-rank", str(rank), "--fault-step", str(step))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert elapsed < TIMEOUT + 30 + 15  # + start-up of 4 ranks on 2 cores
    report = doctor(tmp_path)
    assert rank in report["culprit_ranks"], report
    assert "moe" in report["label"] and report["step"] == step, report
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("epinfer: error: parallel run failed: rank ") and f"dumps in {tmp_path}" in last, last
    assert "/__w/" not in proc.stderr and ".cc:" not in proc.stderr  # no backend lines with build paths
    if kind == "kill":
        assert report["verdict"] == "crash" and report["missing_ranks"] == [rank]
        assert dumps_of(tmp_path) == {0, 1, 2, 3} - {rank}
        assert last.startswith(f"epinfer: error: parallel run failed: rank {rank} was killed by SIGKILL;"), last
    else:
        assert report["verdict"] == "mismatch", report
        # every rank still alive dumped (Gloo may abort a receiver of a wrong-size message)
        assert dumps_of(tmp_path) | set(report["missing_ranks"]) == {0, 1, 2, 3}
        assert rank in dumps_of(tmp_path)
    assert (tmp_path / "trace.json").is_file() and (tmp_path / "timeline.png").is_file()
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("epinfer: rank")]
    assert lines and all("dumps in" in ln for ln in lines)


@pytest.mark.parametrize("layout,kind,rank,step", [
    (("--dp", "2", "--tp", "1", "--dispatch", "agrs"), "skip-collective", 1, 2),
    (("--dp", "1", "--tp", "2", "--dispatch", "naive", "--dp-padding", "none"), "kill", 1, 3),
    (("--dp", "2", "--tp", "1", "--dp-padding", "none"), "reorder", 0, 1),
])
def test_other_layouts(layout, kind, rank, step, tmp_path):
    proc, _ = run(tmp_path, "--fault", kind, "--fault-rank", str(rank), "--fault-step", str(step), layout=layout)
    assert proc.returncode == 3, proc.stderr[-2000:]
    report = doctor(tmp_path)
    assert report["verdict"] == ("crash" if kind == "kill" else "mismatch"), report
    assert rank in report["culprit_ranks"] and report["step"] == step, report
    # a killed TP peer is waited for at the first TP collective of the step, before any MoE
    assert ("gdn" in report["label"]) if kind == "kill" else ("moe" in report["label"]), report


@pytest.mark.parametrize("kind,rank,step", [c for c in CASES if c[0] != "kill"])
def test_check_collectives_fails_fast_on_every_rank(kind, rank, step, tmp_path):
    proc, elapsed = run(tmp_path, "--check-collectives", "--fault", kind, "--fault-rank", str(rank),
                        "--fault-step", str(step))
    assert proc.returncode == 3, proc.stderr[-2000:]
    mismatch = [ln for ln in proc.stderr.splitlines() if "CollectiveMismatch" in ln]
    assert len(mismatch) == 4, proc.stderr  # the same clear error on every rank
    assert all(f"ranks [{rank}] differ" in ln for ln in mismatch)
    assert "stuck" not in proc.stderr  # no watchdog needed


def test_delay_is_a_straggler_not_a_failure(tmp_path):
    proc, _ = run(tmp_path, "--fault", "delay", "--fault-rank", "1", "--fault-step", "2",
                  "--fault-delay", "2", "--temperature", "0", "--compare-single")
    assert proc.returncode == 0, proc.stderr
    assert "tokens identical to the single-process run (dp=2 tp=2 ep=4): yes" in proc.stdout
    report = doctor(tmp_path)
    assert report["verdict"] == "ok"
    late = {s["rank"]: s for s in report["stragglers"]}
    assert set(late) == {1} and 1.6 < late[1]["late_s"] < 3.0 and "moe" in late[1]["label"]


def test_leak_pad_is_caught_by_check_numerics(tmp_path):
    """NaN pad rows leak into real rows: --check-numerics names the first layer, and the requests
    whose logits turned NaN fail with an error instead of printing garbage (the `!!!!`)."""
    proc, _ = run(tmp_path, "--poison-pads", "--check-numerics", "--ignore-eos", "--fault", "leak-pad",
                  "--fault-rank", "0", "--fault-step", "0", max_tokens=6)
    assert proc.returncode == 1, proc.stderr
    assert "epinfer: rank 0: check-numerics: NaN/Inf first reached real rows at layer.0.moe (step 0)" \
        in proc.stderr
    assert "request 0: NaN logits during generation" in proc.stderr
    assert "epinfer: error: request 0 failed: the model produced non-finite logits (NaN or Inf) for this " \
        "request at output token 0" in proc.stderr


def test_degenerate_warnings():
    from types import SimpleNamespace as Out

    from epinfer.diagnostics.numerics import degenerate_warnings

    outs = [Out(token_ids=[0, 0, 0, 0], nan_logits=False), Out(token_ids=[1, 2, 1, 2], nan_logits=False),
            Out(token_ids=[5], nan_logits=True), Out(token_ids=[7, 7, 7], nan_logits=False)]
    assert degenerate_warnings(outs) == ["request 0: degenerate output: token 0 repeated 4 times",
                                         "request 2: NaN logits during generation (the request failed)"]


def test_clean_run_is_ok(tmp_path):
    # a fault whose step never comes changes nothing and is reported as not triggered
    proc, _ = run(tmp_path, "--poison-pads", "--check-numerics", "--check-collectives",
                  "--fault", "kill", "--fault-rank", "1", "--fault-step", "999")
    assert proc.returncode == 0, proc.stderr
    assert "epinfer: rank 1: fault kill at step 999 was not triggered (the run ended at step" in proc.stderr
    assert "check-numerics: NaN/Inf first reached real rows" not in proc.stderr
    report = doctor(tmp_path)
    assert report["verdict"] == "ok" and report["stragglers"] == [] and report["culprit_ranks"] == []
    assert dumps_of(tmp_path) == {0, 1, 2, 3}


def test_doctor_without_dumps(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "epinfer", "doctor", str(tmp_path)], capture_output=True,
                          text=True, timeout=60, env=ENV)
    assert proc.returncode == 2 and "no rank*.jsonl dumps" in proc.stderr


def test_sigusr1_dumps_without_stopping(tmp_path):
    dump = tmp_path / "d"
    cmd = [sys.executable, "-m", "epinfer", "generate", *PROMPTS, "--dp", "2", "--tp", "2", "--max-tokens", "300",
           "--ignore-eos", "--dump-dir", str(dump)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and len(children_of(proc.pid)) < 4:  # the launcher is up
            time.sleep(0.2)
        while time.time() < deadline and len(list(dump.glob("rank*.jsonl"))) < 4:
            time.sleep(1.0)
            proc.send_signal(signal.SIGUSR1)
        dumped = {p.name for p in dump.glob("rank*.jsonl")}
        assert dumped == {f"rank{r}.jsonl" for r in range(4)}
        assert proc.poll() is None  # still running
        header = json.loads((dump / "rank0.jsonl").read_text().splitlines()[0])
        assert header["status"] == "running" and header["reason"] == "SIGUSR1"
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
