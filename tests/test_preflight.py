"""What config.json and the flags decide is refused before any rank starts: one line, exit 2, in
well under the few seconds a rank takes to start (the command line imports no torch before it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run(*argv: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "epinfer", *argv], capture_output=True, text=True, timeout=60,
                          env=ENV)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("argv,fragment", [
    (["generate", "--tp", "3", "--prompt", "hi"], "attention heads (4) are not divisible by --tp 3"),
    (["serve", "--tp", "3"], "attention heads (4) are not divisible by --tp 3"),
    (["generate", "--dp", "0", "--prompt", "hi"], "--dp and --tp must be >= 1"),
    (["generate", "--max-num-batched-tokens", "0", "--prompt", "hi"], "--max-num-batched-tokens must be >= 1"),
])
def test_layout_refused_before_any_rank(argv, fragment):
    proc, elapsed = run(*argv)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("epinfer: error: "), proc.stderr
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert elapsed < 10.0, elapsed
    # refused before torch is imported (what takes a start its seconds), wherever the machine's speed
    probe = ("import runpy, sys\nsys.argv = ['epinfer', *sys.argv[1:]]\ntry:\n"
             "    runpy.run_module('epinfer', run_name='__main__')\n"
             "except SystemExit as exc:\n    print('torch' in sys.modules, exc.code)\n")
    proc = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.stdout.split() == ["False", "2"], (proc.stdout, proc.stderr)


def test_too_few_gpus_refused_before_any_rank():
    proc, _ = run("generate", "--dp", "2", "--device", "cuda", "--prompt", "hi")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--device cuda requested but no CUDA device is available" in proc.stderr or \
        "needs 2 GPUs (one per rank)" in proc.stderr, proc.stderr


def test_model_heads_checked_for_every_split(ckpt_dir, tmp_path):
    """Linear-attention heads and intermediate sizes that TP must split, from config.json alone."""
    folder = ckpt_dir("qwen3_5_moe")
    cfg = json.loads((folder / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    text["linear_num_value_heads"] = 6  # 6 value heads over 4 key heads: not divisible by --tp 4
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps(cfg))
    from epinfer.core.config import ModelConfig
    from epinfer.core.errors import UserError
    from epinfer.core.layout import check_model_layout

    with pytest.raises(UserError, match="not divisible by --tp"):
        check_model_layout(ModelConfig.from_dir(folder), 1, 3)
    check_model_layout(ModelConfig.from_dir(folder), 2, 2)  # the demo-like shapes split in two
