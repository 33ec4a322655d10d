"""The progress bar of offline `epinfer generate`: requests done and generated tokens per second,
redrawn in place on stderr. Only on a terminal: `for_terminal` returns None when stderr is not a
TTY, so piped output that scripts and tests parse never contains it."""

from __future__ import annotations

import sys
import time

WIDTH = 24


class ProgressBar:
    def __init__(self, total: int, stream=None, min_interval: float = 0.1) -> None:
        self.total, self.stream, self.min_interval = total, stream or sys.stderr, min_interval
        self.start: float | None = None  # the first report: engine start-up is not generation time
        self.drawn = 0.0
        self.done = self.tokens = 0
        self.per_replica: dict[int, tuple[int, int]] = {}

    @classmethod
    def for_terminal(cls, total: int) -> ProgressBar | None:
        return cls(total) if sys.stderr.isatty() else None

    def update(self, done: int, tokens: int, force: bool = False) -> None:
        self.done, self.tokens = done, tokens
        now = time.monotonic()
        if self.start is None:
            self.start = now
        if force or now - self.drawn >= self.min_interval:
            self.drawn = now
            self.stream.write("\r" + self.line(now) + "\x1b[K")
            self.stream.flush()

    def update_replica(self, replica: int, done: int, tokens: int) -> None:
        """Parallel runs: each replica's leader reports its own totals."""
        self.per_replica[replica] = (done, tokens)
        self.update(sum(d for d, _ in self.per_replica.values()), sum(t for _, t in self.per_replica.values()))

    def line(self, now: float) -> str:
        elapsed = max(now - (self.start or now), 1e-9)
        filled = WIDTH * self.done // max(self.total, 1)
        return (f"[{'#' * filled}{'-' * (WIDTH - filled)}] {self.done}/{self.total} requests  "
                f"{self.tokens / elapsed:.1f} tok/s  {elapsed:.1f} s")

    def close(self) -> None:
        self.update(self.done, self.tokens, force=True)
        self.stream.write("\n")
        self.stream.flush()
