"""User-facing errors.

`UserError` is raised for anything the user can fix (bad checkpoint, bad flag, bad prompt). The CLI
prints its message on one line and exits 2; it never carries a traceback to the user unless
`--debug` is given. Internal invariants use `assert` instead.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input: printed as one line, exit code 2."""

    exit_code = 2


class Interrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM the run stopped for: the CLI exits 128 + its number (130, 143), as the
    signal's own default would have."""

    def __init__(self, signum: int = 2) -> None:
        super().__init__(signum)
        self.signum = signum


class RunFailed(RuntimeError):
    """A parallel run ended with a fault (exit 3) or a crash; the ranks printed why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = code
