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
