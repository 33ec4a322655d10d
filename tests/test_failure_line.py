"""A failed parallel `epinfer bench` ends like `generate` and `serve`: one line naming the rank that
failed first, how it ended, and the dump folder; the backend's own lines stay out of the terminal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.checkpoints import tiny_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.mark.timeout(240)
def test_bench_failure_names_the_rank(tmp_path):
    (tmp_path / "config.json").write_text(tiny_config("qwen3_moe").to_json_string())
    dumps = tmp_path / "dumps"
    proc = subprocess.run([sys.executable, "-m", "epinfer", "bench", "--shape", str(tmp_path), "--device", "cpu",
                           "--dtype", "float32", "--dp", "2", "--batch", "2", "--input-len", "8", "--output-len", "40",
                           "--fault", "kill", "--fault-rank", "1", "--fault-step", "3", "--collective-timeout", "5",
                           "--dump-dir", str(dumps)], capture_output=True, text=True, timeout=200, env=ENV)
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("epinfer: error: parallel run failed: rank 1 was killed by SIGKILL;"), proc.stderr
    assert f"dumps in {dumps}" in last and "/__w/" not in proc.stderr and ".cc:" not in proc.stderr


def test_blame_names_the_cause_not_the_peers_that_lost_it(monkeypatch):
    """`Blame`: a rank that raised a one-line error (exit 2) is named even when its peers' faults
    (exit 3, reacting to its end) were seen first; among faults alone, the first seen failing is
    named, once the others have ended or FAULT_GRACE_S has passed; a killed rank at once."""
    from epinfer.runtime import launch

    clock = [100.0]
    monkeypatch.setattr(launch.time, "time", lambda: clock[0])

    def run(timeline: list[tuple[float, list]]):
        blame = launch.Blame()
        for t, codes in timeline:
            clock[0] = 100.0 + t
            named = blame.verdict(codes)
            if named is not None:
                return t, named
        return None

    assert run([(0.0, [None] * 4), (0.1, [3, None, 3, None]), (0.5, [3, 2, 3, None])]) == (0.5, (1, 2))
    assert run([(0.1, [None, None, 3, None]), (0.8, [3, 3, 3, None]), (1.0, [3, 3, 3, 3])]) == (1.0, (2, 3))
    assert run([(0.1, [None, 3, None]), (2.0, [None, 3, None]), (3.2, [None, 3, None])]) == (3.2, (1, 3))
    assert run([(0.1, [None, -9, None])]) == (0.1, (1, -9))
    assert run([(0.1, [0, 0, None]), (0.2, [0, 0, 0])]) is None  # (every rank done: no failure to name)
