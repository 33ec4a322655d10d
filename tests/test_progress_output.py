"""What `epinfer generate` writes on stderr: rates from a fake clock (none on the first frame, then
tokens / elapsed), log lines at their interval when stderr is not a terminal, the start and
summary lines of a real run piped and on a pseudo-terminal; stdout keeps its format."""

from __future__ import annotations

import io
import queue
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from epinfer.progress import Progress, ProgressBar, ProgressLog, summary
from epinfer.runtime.launch import _draw_progress
from epinfer.runtime.lockstep import post_progress
from tests.test_progress import ENV, run_on_tty

PROMPTS = ["--prompt", "Beautiful is better than", "--prompt", "Flat is"]
ARGS = ["generate", *PROMPTS, "--max-tokens", "8"]
ESCAPE = re.compile(r"\x1b\[")


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def frames(stream: io.StringIO) -> list[str]:
    return [f.rstrip("\n").removesuffix("\x1b[K") for f in stream.getvalue().split("\r") if f]


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


# --- fake clock -----------------------------------------------------------------------------------

def test_first_frame_has_no_absurd_rate():
    clock, out = FakeClock(), Terminal()
    bar = ProgressBar(4, stream=out, clock=clock, min_interval=0.0)
    clock.t += 30.0  # loading: not generation time
    bar.update(0, 0, 0)  # the engine starts generating
    clock.t += 1e-9
    bar.update(1, 512, 40)  # a first step that seems to take no time at all
    first, second = frames(out)
    assert "- tok/s" in first and "- tok/s" in second, (first, second)
    assert not re.search(r"\d tok/s", first + second)
    clock.t += 0.4  # still under the minimum
    bar.update(1, 512, 48)
    assert "- tok/s" in frames(out)[-1] and "0.4 s" in frames(out)[-1]


def test_rates_are_tokens_over_generation_time():
    clock, out = FakeClock(), Terminal()
    bar = ProgressBar(4, stream=out, clock=clock, min_interval=0.0)
    clock.t += 30.0
    bar.update(0, 0, 0)
    clock.t += 2.0
    bar.update(2, 1000, 200)
    assert "2/4 requests  in 500.0 out 100.0 tok/s  2.0 s" in frames(out)[-1]
    clock.t += 3.0
    bar.update(4, 1500, 800)
    assert "4/4 requests  in 300.0 out 160.0 tok/s  5.0 s" in frames(out)[-1]
    clock.t += 7.0  # every request is done: a parallel run still stops its ranks, the clock does not run on
    bar.tick()
    bar.close()
    assert "in 300.0 out 160.0 tok/s  5.0 s" in frames(out)[-1] and out.getvalue().endswith("\n")
    assert bar.seconds() == 5.0


def test_short_run_gets_its_rate_on_the_last_frame():
    clock, out = FakeClock(), Terminal()
    bar = ProgressBar(1, stream=out, clock=clock)
    bar.update(0, 0, 0)
    clock.t += 0.25
    bar.update(1, 10, 50)
    bar.close()
    assert "- tok/s" in frames(out)[0]
    assert "1/1 requests  in 40.0 out 200.0 tok/s  0.2 s" in frames(out)[-1]


def test_log_lines_at_the_interval_and_not_more_often():
    clock, out = FakeClock(), io.StringIO()
    log = ProgressLog(100, stream=out, clock=clock, interval=10.0)
    log.update(0, 0, 0)
    for step in range(1, 351):  # 35 s of steps every 0.1 s
        clock.t = 1000.0 + step / 10
        log.update(step // 4, step * 8, step * 2)
        log.tick()
    got = lines(out)
    assert len(got) == 3, got
    assert all(g.startswith("epinfer: ") for g in got)
    assert "\r" not in out.getvalue() and not ESCAPE.search(out.getvalue())
    assert re.fullmatch(r"epinfer: 25/100 requests, 800 prompt \+ 200 generated tokens, 80\.0 tok/s in / "
                        r"20\.0 tok/s out, 10\.0 s", got[0]), got[0]
    seconds = [float(g.rsplit(", ", 1)[1].removesuffix(" s")) for g in got]
    assert [round(s) for s in seconds] == [10, 20, 30]
    log.close()  # the main run: its summary line follows, no last progress line
    assert len(lines(out)) == 3
    log.close(final_line=True)
    assert len(lines(out)) == 4 and lines(out)[-1].startswith("epinfer: 87/100 requests")


def test_log_while_the_ranks_start():
    clock, out = FakeClock(), io.StringIO()
    log = ProgressLog(8, label="single-process reference run", stream=out, clock=clock, interval=10.0)
    for i in range(1, 251):
        clock.t = 1000.0 + i / 10
        log.tick()
    assert lines(out) == ["epinfer: single-process reference run: 0/8 requests, engine starting (10.0 s)",
                          "epinfer: single-process reference run: 0/8 requests, engine starting (20.0 s)"]


def test_for_stream_picks_bar_or_log():
    assert type(Progress.for_stream(3, stream=Terminal())) is ProgressBar
    assert type(Progress.for_stream(3, stream=io.StringIO())) is ProgressLog


def test_bar_fits_the_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    clock, out = FakeClock(), Terminal()
    bar = ProgressBar(400, label="single-process reference run", stream=out, clock=clock)
    bar.update(0, 0, 0)
    clock.t += 37.2
    bar.update(120, 15200, 98000)
    bar.close()
    assert all(len(f) <= 59 for f in frames(out)), frames(out)
    assert frames(out)[-1] == "[#----] 120/400 requests  in 408.6 out 2634.4 tok/s  37.2 s"  # the label left out
    monkeypatch.setenv("COLUMNS", "56")
    out = Terminal()
    narrow = ProgressBar(400, stream=out, clock=clock)
    narrow.update(0, 0, 0)
    clock.t += 37.2
    narrow.update(120, 15200, 98000)
    assert frames(out)[-1] == "120/400 requests  in 408.6 out 2634.4 tok/s  37.2 s"  # the numbers before a bar
    monkeypatch.setenv("COLUMNS", "80")
    out = Terminal()
    ProgressBar(400, label="single-process reference run", stream=out, clock=clock).update(120, 15200, 98000)
    assert frames(out)[0] == "[####----------] 120/400 requests  - tok/s  0.0 s  single-process reference run"
    monkeypatch.setenv("COLUMNS", "140")
    wide = Terminal()
    ProgressBar(400, label="single-process reference run", stream=wide, clock=clock).update(0, 0, 0)
    assert frames(wide)[0].endswith("  single-process reference run")


def test_replicas_and_the_launcher_queue():
    """The leaders' messages (dp_rank, requests done, prompt tokens, generated tokens) as the
    launcher drains them."""
    seqs = [SimpleNamespace(finish_reason="length", num_computed=12, prompt_ids=[1] * 5, output_ids=[2] * 8),
            SimpleNamespace(finish_reason=None, num_computed=3, prompt_ids=[1] * 9, output_ids=[])]
    posts: queue.Queue = queue.Queue()
    post_progress(posts, 1, seqs)
    assert posts.queue[0] == (1, 1, 5 + 3, 8)
    posts.put((0, 2, 100, 30))
    clock, out = FakeClock(), io.StringIO()
    log = ProgressLog(5, stream=out, clock=clock, interval=10.0)
    _draw_progress(posts, log)
    assert (log.done, log.prompt, log.generated) == (3, 108, 38)
    posts.put((1, 2, 14, 20))  # replica 1's newer totals replace its older ones
    clock.t += 10.0
    _draw_progress(posts, log)
    assert (log.done, log.prompt, log.generated) == (4, 114, 50)
    assert lines(out) == ["epinfer: 4/5 requests, 114 prompt + 50 generated tokens, 11.4 tok/s in / "
                          "5.0 tok/s out, 10.0 s"]


def test_summary_line():
    outs = [SimpleNamespace(prompt_token_ids=[1] * 1024, token_ids=[2] * 128, finish_reason="length")
            for _ in range(400)]
    assert summary(outs, 93.4, 101.0) == (
        "done: 400 requests, 409600 prompt + 51200 generated tokens in 93.4 s (4385.4 tok/s in, 548.2 tok/s out; "
        "101.0 s with start-up)")
    outs[0].finish_reason = "error"
    assert summary(outs[:1], None, 2.0) == (
        "done: 1 request (1 failed), 1024 prompt + 128 generated tokens in 2.0 s (512.0 tok/s in, 64.0 tok/s out; "
        "start-up included)")


def test_llm_reports_prompt_and_generated_tokens():
    from epinfer import LLM, SamplingParams

    calls = []
    outs = LLM().generate(["Beautiful is better than", "Flat is"], SamplingParams(max_tokens=6),
                          progress=lambda *a: calls.append(a))
    assert calls[0] == (0, 0, 0)  # generation starts: the rates' time zero
    prompt, generated = sum(len(o.prompt_token_ids) for o in outs), sum(len(o.token_ids) for o in outs)
    assert calls[-1] == (2, prompt, generated)
    assert all(a <= b for x, y in zip(calls, calls[1:], strict=False) for a, b in zip(x, y, strict=True))


# --- a real run -----------------------------------------------------------------------------------

def check_stdout(out: str, n: int = 2) -> None:
    """The results' format, unchanged: three lines per request, nothing else."""
    got = out.splitlines()
    assert len(got) == 3 * n, out
    for i in range(n):
        assert re.fullmatch(rf"--- request {i} \(length, 8 tokens\)", got[3 * i]), got[3 * i]
        assert got[3 * i + 1].startswith("prompt:     '") and got[3 * i + 2].startswith("completion: '")


SUMMARY = re.compile(r"epinfer: done: 2 requests, 7 prompt \+ 16 generated tokens in [\d.]+ s "
                     r"\([\d.]+ tok/s in, [\d.]+ tok/s out; [\d.]+ s with start-up\)")


@pytest.mark.timeout(90)
def test_piped_run_logs_plain_lines(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "epinfer", *ARGS], capture_output=True, text=True, timeout=80,
                          env=ENV)
    assert proc.returncode == 0, proc.stderr
    check_stdout(proc.stdout)
    err = proc.stderr.splitlines()
    assert "\r" not in proc.stderr and not ESCAPE.search(proc.stderr), repr(proc.stderr)
    assert all(line.startswith("epinfer: ") for line in err), err
    assert re.fullmatch(r"epinfer: loaded the demo model in [\d.]+ s; generating 2 requests \.\.\.", err[0]), err
    assert SUMMARY.fullmatch(err[-1]), err
    out_file = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "epinfer", *ARGS, "--output", str(out_file)], capture_output=True,
                          text=True, timeout=80, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and out_file.is_file()
    err = proc.stderr.splitlines()
    assert f"epinfer: wrote 2 results to {out_file}" in err and SUMMARY.fullmatch(err[-1]), err
    assert "\r" not in proc.stderr and not ESCAPE.search(proc.stderr)


@pytest.mark.timeout(90)
def test_terminal_run_draws_the_bar_then_the_summary():
    code, out, err = run_on_tty(ARGS)
    assert code == 0, err
    check_stdout(out)
    assert err.startswith("epinfer: loading the demo model ...\r\n"), repr(err)
    bar = err.split("\r\n")[1]
    assert bar.count("\r[") >= 2 and "2/2 requests" in bar, repr(bar)  # redrawn in place
    assert not re.search(r"\d{7,}\.\d tok/s", err), repr(err)  # no rate over a few microseconds
    assert SUMMARY.fullmatch(err.rstrip("\r\n").split("\r\n")[-1]), repr(err)
