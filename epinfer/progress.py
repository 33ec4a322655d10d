"""What offline `epinfer generate` says on stderr while it runs (stdout holds only the results).

On a terminal, a bar redrawn in place (`ProgressBar`); anywhere else (job logs, nohup, CI, a
pipe) a plain line every `interval` seconds (`ProgressLog`), never a carriage return or an escape
code. Both take (requests done, prompt tokens processed, tokens generated): from `LLM.generate`'s
`progress` callback, or per replica from the leaders of a parallel run (`update_replica`).

Rates are measured from the first report, which the engine sends as it starts generating
(0, 0, 0), so loading and start-up are not generation time; a frame shows them only once
`MIN_RATE_S` has passed (before that "-"), never tokens divided by a few microseconds. The clock
is injectable (`clock=`) for tests.

`summary` is the one line a run ends with; `generate_with_progress` is a single-process run
with its start line and progress.
"""

from __future__ import annotations

import abc
import os
import sys
import time
from collections.abc import Callable

MIN_RATE_S = 0.5  # no rate before this much generation time
LOG_INTERVAL_S = 10.0  # one log line per this many seconds when stderr is not a terminal
BAR_WIDTH = 20


def say(message: str, stream=None) -> None:
    """One `epinfer: ...` line on stderr, in one write (ranks may share the stream)."""
    stream = stream or sys.stderr
    stream.write(f"epinfer: {message}\n")
    stream.flush()


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _columns(stream) -> int:
    """The terminal's width: $COLUMNS, else the terminal's own, else 80 (a fresh pseudo-terminal
    says 0; narrower than 40 is not worth fitting)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = 0
    return columns if columns >= 40 else 80


def _rate(tokens: int, seconds: float | None, minimum: float) -> str:
    if seconds is None or seconds < minimum or seconds <= 0:
        return "-"
    return f"{tokens / seconds:.1f}"


class Progress(abc.ABC):
    """The shared state: totals so far, when generation started, the rates."""

    def __init__(self, total: int, label: str = "", stream=None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.label, self.stream, self.clock = total, label, stream or sys.stderr, clock
        self.created = clock()
        self.started: float | None = None  # the first report: the engine starts generating
        self.last: float | None = None  # the latest report (after the last step: generation ends)
        self.finished: float | None = None
        self.done = self.prompt = self.generated = 0
        self.per_replica: dict[int, tuple[int, int, int]] = {}

    @staticmethod
    def for_stream(total: int, label: str = "", stream=None, clock: Callable[[], float] = time.monotonic,
                   interval: float = LOG_INTERVAL_S) -> Progress:
        """A bar on a terminal, log lines anywhere else."""
        stream = stream or sys.stderr
        if is_terminal(stream):
            return ProgressBar(total, label, stream, clock)
        return ProgressLog(total, label, stream, clock, interval)

    def update(self, done: int, prompt: int, generated: int) -> None:
        now = self.clock()
        if self.started is None:
            self.started = now
        self.last = now
        self.done, self.prompt, self.generated = done, prompt, generated
        self.show(now)

    def update_replica(self, replica: int, done: int, prompt: int, generated: int) -> None:
        """Parallel runs: each replica's leader reports its own totals."""
        self.per_replica[replica] = (done, prompt, generated)
        parts = self.per_replica.values()
        self.update(sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts))

    def tick(self) -> None:
        """Time passed without a report (ranks still starting): redraw / log if due."""
        self.show(self.clock())

    def elapsed(self, now: float) -> float:
        """Generation time once started; before that, time since this object was made."""
        return now - (self.started if self.started is not None else self.created)

    def rates(self, now: float, final: bool = False) -> tuple[str, str]:
        """Prompt and generated tokens per second, "-" before `MIN_RATE_S` of generation (the
        last frame, which covers the whole run, shows them however short it was)."""
        seconds = None if self.started is None else now - self.started
        minimum = 0.0 if final else MIN_RATE_S
        return _rate(self.prompt, seconds, minimum), _rate(self.generated, seconds, minimum)

    def seconds(self) -> float | None:
        """Generation time, first report to last (None when the engine never reported): what
        comes after (gathering outputs, stopping ranks) is not generation."""
        if self.started is None:
            return None
        return (self.finished if self.finished is not None else self.clock()) - self.started

    def frozen(self, now: float) -> float:
        """Every request done: the clock stops at the last report (a parallel run still gathers
        outputs and stops its ranks; that time is not generation time)."""
        if self.last is not None and self.total and self.done >= self.total:
            return self.last
        return now

    def _finish(self) -> float:
        """At `close`: the time the last frame shows, the last report's when there was one."""
        if self.started is not None and self.finished is None:
            self.finished = self.last
        return self.finished if self.finished is not None else self.clock()

    @abc.abstractmethod
    def show(self, now: float, force: bool = False, final: bool = False) -> None:
        """Draw (a bar) or log (a line) the current state, if due."""

    @abc.abstractmethod
    def close(self, final_line: bool = False) -> None:
        """The run is over. `final_line`: log mode writes a last line (a run with no summary)."""


class ProgressBar(Progress):
    """A terminal: one line redrawn in place at most every `min_interval` seconds."""

    def __init__(self, total: int, label: str = "", stream=None, clock: Callable[[], float] = time.monotonic,
                 min_interval: float = 0.1) -> None:
        super().__init__(total, label, stream, clock)
        self.min_interval = min_interval
        self.drawn: float | None = None
        self.columns = _columns(self.stream)

    def show(self, now: float, force: bool = False, final: bool = False) -> None:
        if force or self.drawn is None or now - self.drawn >= self.min_interval:
            self.drawn = now
            self.stream.write("\r" + self.line(now, final) + "\x1b[K")
            self.stream.flush()

    def line(self, now: float, final: bool = False) -> str:
        """The label comes last: on a narrow terminal it is left out (the line above says it)."""
        if self.started is None:
            what = "starting"
        else:
            now = self.frozen(now)
            rate_in, rate_out = self.rates(now, final)
            what = f"in {rate_in} out {rate_out} tok/s" if rate_out != "-" else "- tok/s"
        rest = f"{self.done}/{self.total} requests  {what}  {self.elapsed(now):.1f} s"
        tail = f"  {self.label}" if self.label else ""
        room = self.columns - 1 - len(rest) - 3  # for the bar itself, inside "[] "
        if room - len(tail) < 8:
            tail = ""
        width = min(BAR_WIDTH, room - len(tail))
        filled = width * min(self.done, self.total) // max(self.total, 1)
        bar = f"[{'#' * filled}{'-' * (width - filled)}] " if width >= 5 else ""  # narrow: numbers first
        return f"{bar}{rest}{tail}"[:self.columns - 1]

    def close(self, final_line: bool = False) -> None:
        now = self._finish()
        if self.drawn is None:  # nothing on the line (a request refused before generation)
            return
        self.show(now, force=True, final=True)
        self.stream.write("\n")
        self.stream.flush()


class ProgressLog(Progress):
    """Not a terminal: a plain `epinfer: ...` line every `interval` seconds, never more often."""

    def __init__(self, total: int, label: str = "", stream=None, clock: Callable[[], float] = time.monotonic,
                 interval: float = LOG_INTERVAL_S) -> None:
        super().__init__(total, label, stream, clock)
        self.interval = interval
        self.logged = self.created

    def show(self, now: float, force: bool = False, final: bool = False) -> None:
        if force or now - self.logged >= self.interval:
            self.logged = now
            say(self.line(now, final), self.stream)

    def line(self, now: float, final: bool = False) -> str:
        head = f"{self.label}: " if self.label else ""
        if self.started is None:
            return f"{head}{self.done}/{self.total} requests, engine starting ({self.elapsed(now):.1f} s)"
        now = self.frozen(now)
        rate_in, rate_out = self.rates(now, final)
        return (f"{head}{self.done}/{self.total} requests, {self.prompt} prompt + {self.generated} generated "
                f"tokens, {rate_in} tok/s in / {rate_out} tok/s out, {self.elapsed(now):.1f} s")

    def close(self, final_line: bool = False) -> None:
        now = self._finish()
        if final_line:
            self.show(now, force=True, final=True)


def summary(outputs, seconds: float | None, total_seconds: float) -> str:
    """The line a run ends with: requests, prompt and generated tokens, time, tokens/s. `seconds`:
    generation time (None when unknown: then the whole run's time, start-up included)."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    generated = sum(len(o.token_ids) for o in outputs)
    failed = sum(o.finish_reason == "error" for o in outputs)
    took = seconds if seconds is not None else total_seconds
    rate_in, rate_out = _rate(prompt, took, 0.0), _rate(generated, took, 0.0)
    startup = f"; {total_seconds:.1f} s with start-up" if seconds is not None else "; start-up included"
    return (f"done: {plural(len(outputs), 'request')}{f' ({failed} failed)' if failed else ''}, {prompt} prompt + "
            f"{generated} generated tokens in {took:.1f} s ({rate_in} tok/s in, {rate_out} tok/s out{startup})")


def generate_with_progress(load: Callable[[], object], prompts: list, params: list, model: str, label: str = "",
                           stream=None, final_line: bool = False) -> tuple[list, Progress]:
    """A single-process run: `load()` returns the `LLM`, kept to the end of the run (its start-up
    objects frozen out of the collector's sight: `engine.freeze_heap`). On a terminal a `loading`
    line comes first; elsewhere a `loaded ...; generating` line once the model is up and every
    request has passed its checks (the engine's first report), so that a checkpoint or a prompt
    refused still leaves exactly one `epinfer: error: ...` line on a piped stderr."""
    from epinfer.engine.engine import freeze_heap  # (the engine, and torch, only when a run loads one)

    stream = stream or sys.stderr
    head = f"{label}: " if label else ""
    if is_terminal(stream):
        say(f"{head}loading {model} ...", stream)
    start = time.monotonic()
    llm = load()
    freeze_heap()
    loaded = time.monotonic() - start
    progress = Progress.for_stream(len(prompts), label, stream)

    def report(done: int, prompt: int, generated: int) -> None:
        if progress.started is None and not is_terminal(stream):
            say(f"{head}loaded {model} in {loaded:.1f} s; generating {plural(len(prompts), 'request')} ...", stream)
        progress.update(done, prompt, generated)

    try:
        outputs = llm.generate(prompts, params, progress=report)
    finally:
        progress.close(final_line)
    return outputs, progress
