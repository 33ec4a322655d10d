"""Safe access to the files of a checkpoint folder, and typed reads of the JSON objects in them.

A checkpoint folder is untrusted input: any name in it may be a FIFO (opening it blocks forever), a
device (reading it never ends), a directory, a symbolic link to anywhere, or a file of any size and
encoding. `folder_file` admits only regular files whose real path stays inside the folder (or, for a
Hugging Face hub cache snapshot, inside the cache's `blobs` folder, which every snapshot file links
to); `read_json_object` reads such a file with a size bound and turns every decoding problem into one
`UserError` line naming the file; `JsonFields` reads typed, range-checked fields of the object with
errors naming the file and the field. The type checks, the non-blocking open and the message helpers
are `epinfer.core.untrusted`'s, which the dump reader shares. Nothing here loads weights or tokenizers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from epinfer.core.errors import UserError
from epinfer.core.untrusted import (
    file_kind,
    ints_in,
    is_int,
    is_number,
    one_line,
    open_regular,
    reason,
    show,
    shown_path,
    stat_regular,
)

MAX_JSON_BYTES = 16 << 20  # config.json, generation_config.json: real ones are a few KiB
MAX_INDEX_BYTES = 64 << 20  # a shard index: the largest MoE checkpoints' (~150k tensor names) are ~15 MiB
MAX_TOKENIZER_BYTES = 256 << 20  # a tokenizer file: real tokenizer.json files reach ~35 MiB
REQUIRED = object()  # default of a field that must be present and not null


def _allowed_roots(folder: Path) -> tuple[Path, ...]:
    root = folder.resolve()
    roots = [root]
    # hub cache: models--org--name/snapshots/<revision>/<file> -> ../../blobs/<hash>
    blobs = root.parent.parent / "blobs"
    if root.parent.name == "snapshots" and blobs.is_dir():
        roots.append(blobs.resolve())
    return tuple(roots)


def model_folder(folder: Path) -> Path:
    """`folder`, or a `UserError` saying what it is when it is not a folder."""
    if folder.is_dir():
        return folder
    try:
        what = file_kind(os.stat(folder).st_mode)
    except FileNotFoundError:
        raise UserError(f"model folder {shown_path(folder)} does not exist") from None
    except (OSError, ValueError) as exc:  # (a parent folder not searchable, a loop of links, a NUL)
        raise UserError(f"model folder {shown_path(folder)}: cannot read it ({reason(exc)})") from None
    raise UserError(f"model folder {shown_path(folder)}: not a folder ({what})")


def folder_file(folder: Path, name: Any, referrer: str | None = None, max_bytes: int | None = None) -> Path | None:
    """The regular file `name` of `folder` (the path joined, unresolved), or None when nothing of
    that name exists. Raises `UserError` for a name that is not a relative path, that leads outside
    the folder (`..`, absolute, a symbolic link out), a broken link, anything but a regular file, or
    a file larger than `max_bytes`. `referrer` (e.g. "index.json: weight_map entry") starts the
    message about a name that came from a file; by default the message names the path."""
    folder = Path(folder)
    subject = f"{referrer} {show(name)}" if referrer else shown_path(folder / str(name))
    if not isinstance(name, str) or not name or "\x00" in name or Path(name).is_absolute():
        raise UserError(f"{subject} is not a file name inside the model folder {shown_path(folder)}")
    path = folder / name
    try:
        real = path.resolve()
        inside = any(real.is_relative_to(root) for root in _allowed_roots(folder))
    except (OSError, RuntimeError) as exc:  # a symbolic-link loop, a name too long
        raise UserError(f"{subject}: cannot resolve the path ({one_line(exc)})") from None
    if not inside:
        raise UserError(f"{subject} is outside the model folder {shown_path(folder)}")
    info = stat_regular(path, subject, missing_ok=True)
    if info is None:
        return None
    if max_bytes is not None and info.st_size > max_bytes:
        raise UserError(f"{subject} is larger than {max_bytes >> 20} MiB")
    return path


def read_text_file(path: Path, max_bytes: int, what: str = "a configuration file") -> str:
    """The UTF-8 text of regular file `path`, read without blocking and at most `max_bytes` long."""
    where = shown_path(path)
    fd, _ = open_regular(path, where)  # checked again: the file may have been swapped since `folder_file`
    with open(fd, "rb") as handle:
        data = handle.read(max_bytes + 1)  # the size on disk may lie (/proc): read at most one byte more
    if len(data) > max_bytes:
        raise UserError(f"{where} is larger than {max_bytes >> 20} MiB; not {what}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: not UTF-8 text (invalid byte at offset {exc.start})") from None


def read_json_object(path: Path, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """The JSON object in regular file `path`, read without blocking and at most `max_bytes` long."""
    where = shown_path(path)
    text = read_text_file(path, max_bytes)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise UserError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        raise UserError(f"{where}: invalid JSON ({one_line(exc, 120)})") from None
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a JSON object at the top level, got {show(value, 30)}")
    return value


class JsonFields:
    """Typed reads of one JSON object's fields. A field that is absent or null takes the default;
    a wrong type or a value out of range is a `UserError` naming `source` and the field."""

    def __init__(self, raw: dict, source: str, prefix: str = "") -> None:
        self.raw, self.source, self.prefix = raw, source, prefix

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def name(self, key: str) -> str:
        return f"'{self.prefix}{key}'"

    def fail(self, key: str, message: str) -> UserError:
        return UserError(f"{self.source}: field {self.name(key)} {message}, got {show(self.raw.get(key))}")

    def _value(self, key: str, default: Any) -> Any:
        value = self.raw.get(key)
        if value is None and default is REQUIRED:
            raise UserError(f"{self.source} lacks required field {self.name(key)}")
        return value

    def integer(self, key: str, default: Any = REQUIRED, lo: int = 0, hi: int = 2**31 - 1) -> Any:
        value = self._value(key, default)
        if value is None:
            return default
        if not is_int(value) or not lo <= value <= hi:
            raise self.fail(key, f"must be an integer from {lo} to {hi}")
        return value

    def number(self, key: str, default: Any = REQUIRED, lo: float = 0.0, hi: float = math.inf,
               lo_open: bool = False) -> Any:
        """A finite int or float in [lo, hi] ((lo, hi] when `lo_open`), returned as a float."""
        value = self._value(key, default)
        if value is None:
            return default
        # an int too large for a float is out of every range, not an OverflowError in isfinite
        ok = (is_number(value) and abs(value) < 1e308 and math.isfinite(value)
              and (lo < value if lo_open else lo <= value) and value <= hi)
        if not ok:
            span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise self.fail(key, f"must be a finite number in {span}")
        return float(value)

    def flag(self, key: str, default: Any = REQUIRED) -> Any:
        value = self._value(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, "must be true or false")
        return value

    def text(self, key: str, default: Any = REQUIRED) -> Any:
        value = self._value(key, default)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.fail(key, "must be a string")
        return value

    def obj(self, key: str) -> dict | None:
        value = self.raw.get(key)
        if value is not None and not isinstance(value, dict):
            raise self.fail(key, "must be a JSON object")
        return value

    def str_list(self, key: str, default: Any = REQUIRED) -> Any:
        value = self._value(key, default)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, "must be a list of strings")
        return value

    def int_list(self, key: str, default: Any = REQUIRED, lo: int = 0, hi: int = 2**31 - 1) -> Any:
        value = self._value(key, default)
        if value is None:
            return default
        if not isinstance(value, list) or not ints_in(value, lo, hi):
            raise self.fail(key, f"must be a list of integers from {lo} to {hi}")
        return value

    def token_ids(self, key: str) -> tuple[int, ...] | None:
        """An id or a list of ids (eos_token_id); None when absent or null."""
        value = self.raw.get(key)
        if value is None:
            return None
        values = value if isinstance(value, list) else [value]
        if not ints_in(values, 0, 2**31 - 1):
            raise self.fail(key, "must be a token id or a list of token ids (integers >= 0)")
        return tuple(values)
