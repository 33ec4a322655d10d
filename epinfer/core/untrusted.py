"""Primitives for reading files that may be anything: opening them safely, and naming what is wrong.

Checkpoint folders (`epinfer.core.checkpoint_files`) and dump folders (`epinfer.diagnostics.dump_format`)
come from outside, so a name in them may be a FIFO (opening it blocks forever), a device (reading
it never ends), a folder, or a symbolic link to any of these, and a JSON value in them may be of any
type, size or depth. This module holds what both readers need for that:

- `stat_regular` and `open_regular` admit only regular files, checking the type before opening and
  again on the opened fd, and open without blocking;
- `one_line`, `reason`, `show`, `shown_path` and `file_kind` put a fault into a one-line,
  ASCII-safe `UserError` message of bounded length;
- `is_int`, `is_number` and `ints_in` are the JSON type tests (a bool is not a number);
- `time_limit` bounds Python code that comes with the input (a chat template: Jinja compiles to
  Python), which nothing else can stop;
- `write_atomic` writes a file whole or not at all, never through what is already at its path;
  `written_in_place` tells the outputs that must be written to instead (a device, a FIFO, stdout).

It does not decide what is allowed where (folder bounds, size limits, the fields of a format): the
readers do. It imports only the standard library and `epinfer.core.errors`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import reprlib
import secrets
import stat
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from epinfer.core.errors import UserError


def one_line(text: object, limit: int = 300) -> str:
    """`text` (an exception, say) as one line of at most `limit` characters: user errors are one line."""
    line = " ".join(str(text).split()) or type(text).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def reason(exc: BaseException) -> str:
    """Why an OS call failed, in one line: its strerror (the message names the path already), else
    the exception itself (a ValueError for a NUL in a path has no strerror)."""
    return one_line(getattr(exc, "strerror", None) or exc)


class _Short(reprlib.Repr):
    """reprlib's bounded rendering (a few items, a few levels, short strings: a huge or deeply nested
    value costs little), with JSON's words for the JSON values that Python spells differently."""

    def __init__(self) -> None:
        super().__init__()
        self.maxstring = self.maxother = self.maxlong = 40
        self.maxlist = self.maxdict = 4
        self.maxlevel = 2

    def repr_bool(self, x: bool, level: int) -> str:
        return "true" if x else "false"

    def repr_NoneType(self, x: None, level: int) -> str:  # reprlib finds these methods by type name
        return "null"

    def repr_float(self, x: float, level: int) -> str:
        return json.dumps(x)  # NaN, Infinity, as a JSON file spells them


_SHORT = _Short()


def show(value: Any, limit: int = 60) -> str:
    """A short one-line ASCII rendering of a JSON value for an error message."""
    try:
        text = _SHORT.repr(value)
    except ValueError:  # an int of more digits than Python converts to text
        text = type(value).__name__
    # non-ASCII (an RTL mark, say) is escaped: the message must show the value, not act on the terminal
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def shown_path(path: Path | str) -> str:
    """A path for a one-line message: as is, or escaped where it holds a newline or other control character."""
    text = str(path)
    return text if text.isprintable() else ascii(text)


def file_kind(mode: int) -> str:
    """What a file of stat mode `mode` is, for a message ("a FIFO")."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"),
             (stat.S_ISREG, "a regular file"))
    return next((text for test, text in kinds if test(mode)), "a special file")


def is_int(value: Any) -> bool:
    """A JSON integer: an int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A JSON number: an int or a float, not a bool (NaN and infinities included: callers bound them)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def ints_in(values: list, lo: int, hi: int) -> bool:
    """Every value an int (exactly `int`, as JSON gives, never bool) in [lo, hi]; at C speed, as a
    list from a file can be long."""
    return not values or ({type(v) for v in values} <= {int} and lo <= min(values) and max(values) <= hi)


def lone_surrogate(value: Any) -> int | None:
    """Where the first string in `value` (a JSON value: strings, numbers, lists, objects and their
    keys, at any depth) holds a lone UTF-16 surrogate, which JSON's \\u escapes can carry and no text
    may hold; None where none does."""
    stack = [value]
    while stack:  # (iterative: the nesting is the decoder's to bound)
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as exc:
                    return exc.start
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


# (in UTF-8, a lone surrogate comes from a \u escape or from the three bytes that encode one, which
# json decodes with "surrogatepass")
_SURROGATE_UTF8 = re.compile(rb"\\u|\xed[\xa0-\xbf]")


def surrogate_field(raw: bytes, body: Any) -> str | bool | None:
    """The top-level field of the JSON object `body` (decoded from `raw`) whose text holds a lone
    surrogate, True for a key that does, None where none does. A UTF-8 body with neither a \\u
    escape nor a surrogate's bytes is spared the walk of its values."""
    if not isinstance(body, dict) or (json.detect_encoding(raw).startswith("utf-8") and
                                      _SURROGATE_UTF8.search(raw) is None):
        return None
    for key, value in body.items():
        if lone_surrogate(key) is not None:
            return True
        if lone_surrogate(value) is not None:
            return key
    return None


def stat_regular(path: Path | str, name: str, missing_ok: bool = False) -> os.stat_result | None:
    """The stat of the regular file at `path` (links followed), or None when nothing of that name
    exists and `missing_ok`. Anything else is a `UserError` that starts with `name`: not a regular
    file (saying what it is, and whether a symbolic link leads there), a broken link, unreadable."""
    link = None
    try:
        link = os.lstat(path)
        info = os.stat(path)
    except (OSError, ValueError) as exc:  # (ValueError: a NUL in the path)
        gone = isinstance(exc, FileNotFoundError)
        if gone and link is None and missing_ok:
            return None
        why = "a broken symbolic link" if gone and link is not None else reason(exc)
        raise UserError(f"{name}: cannot read it ({why})") from None
    if not stat.S_ISREG(info.st_mode):
        what = file_kind(info.st_mode)
        if stat.S_ISLNK(link.st_mode):
            what = f"a symbolic link to {what}"
        raise UserError(f"{name}: not a regular file ({what})")
    return info


def open_regular(path: Path | str, name: str) -> tuple[int, os.stat_result]:
    """An fd of the regular file at `path`, and its stat; the caller closes it. Its type is checked
    before opening (opening a FIFO can block, opening a device can act), and again on the fd, which
    must be the very file checked (the path may have been swapped in between). Faults are
    `UserError`s that start with `name`, as `stat_regular`'s."""
    checked = stat_regular(path, name)
    assert checked is not None  # not missing_ok: a missing file raised
    # O_NONBLOCK: should a FIFO be swapped in after the check, opening it must not wait for a writer
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise UserError(f"{name}: cannot read it ({reason(exc)})") from None
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino):
        os.close(fd)
        raise UserError(f"{name}: not a regular file (it changed while being opened)")
    return fd, opened


def write_atomic(path: Path, chunks: Iterable[bytes | str]) -> None:
    """Writes `chunks` to a temporary file beside `path`, then renames it to `path`: a reader, or a
    write that fails (a full disk, an interrupt), never sees part of it, and a symlink or FIFO
    already at `path` is replaced, never written through."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # O_EXCL | O_NOFOLLOW: never through something already there; 0o666 less the umask, like open()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk.encode() if isinstance(chunk, str) else chunk)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_output_path(path: Path, name: str) -> None:
    """`path` can be a file a run writes at its end: not a folder, in a folder that exists, and where
    it is replaced (`write_atomic`; not where it is `written_in_place`), not a read-only file and in
    a folder this process may write (checked before the run, so that its results are not lost after
    it, and a file made read-only is never replaced); a `UserError` starting with `name`."""
    if path.is_dir() or not path.parent.is_dir():
        raise UserError(f"{name} {shown_path(path)}: not a file in an existing folder")
    if written_in_place(path):
        return
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{name} {shown_path(path)}: the file is read-only")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"{name} {shown_path(path)}: cannot write in its folder (permission denied)")


def written_in_place(path: Path | str) -> bool:
    """An --output that is written to, not replaced: a device or FIFO, or the file this process's
    stdout or stderr goes to (`--output /dev/stdout > out.json`)."""
    try:
        info = os.stat(path)
    except OSError:  # (nothing there yet)
        return False
    if not stat.S_ISREG(info.st_mode):
        return True
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            std = os.fstat(fd)
            if (std.st_dev, std.st_ino) == (info.st_dev, info.st_ino):
                return True
    return False


class TimeLimitExceeded(BaseException):
    """Raised inside code run under `time_limit` once its time is up (a BaseException: the code's
    own `except Exception` does not swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float, again_every: float = 0.2):
    """Runs the block on this thread; once `seconds` have passed, a watcher thread raises
    `TimeLimitExceeded` in it (CPython's asynchronous exception, taken at the next bytecode), and
    again every `again_every` seconds until the block has ended: a loop in a template (Jinja's
    compiled Python) ends instead of holding its thread for ever. Costs nothing while the code runs;
    code inside one C call (one huge string operation) is not interrupted until that call returns."""
    target = ctypes.c_ulong(threading.get_ident())
    lock, ended = threading.Lock(), threading.Event()

    def watch() -> None:
        if ended.wait(seconds):
            return
        while True:
            with lock:
                if ended.is_set():
                    return
                ctypes.pythonapi.PyThreadState_SetAsyncExc(target, ctypes.py_object(TimeLimitExceeded))
            if ended.wait(again_every):
                return

    watcher = threading.Thread(target=watch, name="epinfer-time-limit", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        while True:  # (one set just before may be taken in here: then once more, until the watcher is told)
            try:
                with lock:
                    ended.set()
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(target, None)  # one set but not taken: cleared
                break
            except TimeLimitExceeded:
                continue
