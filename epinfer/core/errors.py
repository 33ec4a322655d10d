"""User-facing errors.

`UserError` is raised for anything the user can fix (bad checkpoint, bad flag, bad prompt). The CLI
prints its message on one line and exits 2; it never carries a traceback to the user unless
`--debug` is given. Internal invariants use `assert` instead.
"""

from __future__ import annotations

import contextlib
import importlib
import signal


class UserError(ValueError):
    """A problem with the user's input: printed as one line, exit code 2."""

    exit_code = 2


class Interrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM the run stopped for: the CLI exits 128 + its number (130, 143), as the
    signal's own default would have."""

    def __init__(self, signum: int = 2) -> None:
        super().__init__(signum)
        self.signum = signum


class NotedSignals:
    """SIGINT / SIGTERM noted rather than raised, for a loop that polls them between waits:
    `first()` is the number of the first one still noted, or 0."""

    def __init__(self) -> None:
        self.numbers: list[int] = []

    def first(self) -> int:
        return self.numbers[0] if self.numbers else 0

    def clear(self) -> None:
        self.numbers.clear()


# the signals `interrupt` raised for: an exception raised where Python drops it (a weakref callback
# such as importlib's module-lock cleanup, a __del__) must not lose the signal, so the next
# `noting_signals` block, or `check_interrupted`, acts on it
_RAISED: list[int] = []


def interrupt(signum: int, frame=None) -> None:
    """The SIGINT / SIGTERM handler of a command: `Interrupted` at once, and remembered."""
    _RAISED.append(signum)
    raise Interrupted(signum)


def check_interrupted() -> None:
    """`Interrupted` for a signal `interrupt` raised for, where that exception was dropped."""
    if _RAISED:
        raise Interrupted(_RAISED[0])


def forget_interrupts() -> None:
    _RAISED.clear()


@contextlib.contextmanager
def noting_signals():
    """SIGINT and SIGTERM are noted in the yielded `NotedSignals` inside the block (with any that
    `interrupt` raised for before it), and the previous handlers are back after it."""
    noted = NotedSignals()
    noted.numbers.extend(_RAISED)
    old = {sig: signal.signal(sig, lambda s, f: noted.numbers.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield noted
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def import_noting_signals(names: tuple[str, ...]) -> None:
    """Imports `names` with SIGINT / SIGTERM noted, then acted on (`Interrupted`): torch drops a
    KeyboardInterrupt raised while it imports numpy, so a Ctrl-C in that moment of a start was lost
    and the run went on."""
    with noting_signals() as signals:
        for name in names:
            importlib.import_module(name)
    if signals.first():
        raise Interrupted(signals.first())


class RunFailed(RuntimeError):
    """A parallel run ended with a fault (exit 3) or a crash; the ranks printed why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = code
