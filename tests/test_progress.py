"""The progress bar of `epinfer generate`: drawn on a terminal (single process and dp=2), never
when stderr is piped (plain lines there); the start and summary lines either way."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
ARGS = ["generate", "--prompt", "Beautiful is better than", "--prompt", "Flat is", "--max-tokens", "12"]


def run_on_tty(args: list[str]) -> tuple[int, str, str]:
    """stdout piped, stderr on a pseudo-terminal."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "epinfer", *args], stdout=subprocess.PIPE, stderr=slave,
                            text=True, env=ENV)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    out = proc.communicate(timeout=300)[0]
    os.close(master)
    return proc.returncode, out, b"".join(chunks).decode(errors="replace")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [[], ["--dp", "2"]])
def test_bar_on_a_terminal(layout):
    code, out, err = run_on_tty([*ARGS, *layout])
    assert code == 0, err
    assert "2/2 requests" in err and "tok/s" in err and "\r" in err
    start = "epinfer: starting 2 ranks (dp=2 tp=1)" if layout else "epinfer: loading the demo model ..."
    assert err.startswith(start), err
    assert "epinfer: done: 2 requests, 7 prompt + " in err.rstrip().splitlines()[-1], err
    assert "requests" not in out  # stdout is untouched


def test_no_bar_when_piped():
    proc = subprocess.run([sys.executable, "-m", "epinfer", *ARGS], capture_output=True, text=True, timeout=300,
                          env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr and "tok/s" not in proc.stdout
    assert all(line.startswith("epinfer: ") for line in proc.stderr.splitlines()), proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("epinfer: done: 2 requests")
    assert proc.stdout.count("--- request") == 2
