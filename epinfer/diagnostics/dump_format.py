"""Reading a dump folder safely: every `rank<N>.jsonl` that `Ledger.dump` wrote, checked field by field.

A dump folder may come from a crashed run, a copy, or anywhere else, so nothing in it is trusted:

- only regular files are opened (a FIFO, a device or a symlink to one is refused before opening),
  and no more than `MAX_FILE_BYTES` per file, `MAX_TOTAL_BYTES` in all, `MAX_LINE_BYTES` per line;
- line 1 must be the header object, every other non-blank line an entry object, each field of the
  type the ledger writes, `world`, ranks and group members at most `MAX_WORLD`, times finite;
- a last line that is not valid JSON is what a rank killed while writing leaves: it is left out and
  reported (`RankDump.cut_line`), while the same fault on an earlier line is an error;
- at most `MAX_ENTRIES_PER_RANK` collectives per rank, `MAX_TOTAL_ENTRIES` in all (after expanding
  graph replays) are kept, the newest ones, as the ledger's own ring buffer does.

Every fault is a `UserError` whose one-line message names the file (and the line and field). The
file type checks, the non-blocking open and the message helpers are `epinfer.core.untrusted`'s, shared
with the checkpoint reader.
The limits are module constants, read at call time.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from epinfer.core.errors import UserError
from epinfer.core.untrusted import ints_in, is_int, is_number, open_regular, reason, show, shown_path

MiB = 1 << 20
MAX_WORLD = 65536  # ranks in a run: bounds `world`, rank numbers and group members
MAX_FILE_BYTES = 512 * MiB  # one rank file (a full 200,000-entry ledger is ~60 MiB)
MAX_TOTAL_BYTES = 2048 * MiB  # all rank files of a folder together
MAX_LINE_BYTES = 16 * MiB  # one line (the header carries every graph's schedule)
MAX_FOLDER_ENTRIES = 1_000_000  # directory entries looked at when listing the folder
MAX_RANK_FILES = MAX_WORLD
MAX_ENTRIES_PER_RANK = 1_000_000  # collectives kept per rank (5x the ledger's ring buffer)
MAX_TOTAL_ENTRIES = 4_000_000  # collectives kept in all (~2 KB of memory each)
MAX_GROUPS = 4096  # groups, and graphs, in one header
MAX_INT = 2**63 - 1  # seq, step and sizes fit in 64 bits
MAX_TIME_S = 1e12  # |t0|, |t1| in seconds since the epoch (the year ~33,000)

RANK_FILE = re.compile(r"rank([0-9]+)\.jsonl", re.ASCII)
_MISSING = object()


@dataclass
class RankDump:
    """One rank file, read and checked: the header and its collectives with graph replays expanded."""

    name: str
    header: dict
    entries: list[dict]
    cut_line: int | None = None  # the cut-off last line that was left out, if any
    left_out: int = 0  # the oldest collectives not kept (over the per-rank limit)
    bytes_read: int = 0


@dataclass
class DumpFolder:
    dumps: dict[int, tuple[dict, list[dict]]]  # rank -> (header, entries)
    files: dict[int, RankDump] = field(default_factory=dict)


def _bad(message: str) -> UserError:
    return UserError(message)


def _show(value) -> str:
    """`show`, and words for a field that is not there at all."""
    return "nothing (the field is missing)" if value is _MISSING else show(value)


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB and n % MiB == 0 else f"{n} bytes"


def _type_name(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _range(lo: int, hi: int) -> str:
    if hi == MAX_INT:
        return " that fits in 64 bits" if lo == -MAX_INT else f" >= {lo}"
    return f" in [{lo}, {hi}]"


# --- fields -----------------------------------------------------------------------------------
def _check_int(obj: dict, key: str, where: str, lo: int, hi: int) -> int:
    value = obj.get(key, _MISSING)
    if not (is_int(value) and lo <= value <= hi):
        raise _bad(f"{where} '{key}' must be an integer{_range(lo, hi)}, got {_show(value)}")
    return value


def _check_str(obj: dict, key: str, where: str) -> str:
    value = obj.get(key, _MISSING)
    if not isinstance(value, str):
        raise _bad(f"{where} '{key}' must be a string, got {_show(value)}")
    return sys.intern(value)  # labels and groups repeat in every step: one copy each


def _check_time(obj: dict, key: str, where: str, nullable: bool) -> None:
    value = obj.get(key, _MISSING)
    if value is None and nullable:
        return
    # a range test rejects NaN and +-Infinity too; big ints compare exactly (no float overflow)
    if not (is_number(value) and -MAX_TIME_S <= value <= MAX_TIME_S):
        kind = ("null or " if nullable else "") + "a finite number of seconds"
        bound = f"{MAX_TIME_S:.0e}".replace("+", "")
        raise _bad(f"{where} '{key}' must be {kind} in [-{bound}, {bound}], got {_show(value)}")


def _check_call(values: dict, where: str) -> None:
    """shapes (a list of lists of ints), dtypes (a list of strings), sizes (null or a list of ints)."""
    shapes = values.get("shapes", _MISSING)
    if not (isinstance(shapes, list) and all(isinstance(s, list) and ints_in(s, 0, MAX_INT) for s in shapes)):
        raise _bad(f"{where} 'shapes' must be a list of lists of integers >= 0, got {_show(shapes)}")
    dtypes = values.get("dtypes", _MISSING)
    if not (isinstance(dtypes, list) and all(isinstance(d, str) for d in dtypes)):
        raise _bad(f"{where} 'dtypes' must be a list of strings, got {_show(dtypes)}")
    sizes = values.get("sizes", _MISSING)
    if not (sizes is None or isinstance(sizes, list) and ints_in(sizes, 0, MAX_INT)):
        raise _bad(f"{where} 'sizes' must be null or a list of integers >= 0, got {_show(sizes)}")


def validate_header(header, name: str) -> dict:
    """The header (line 1) as `Ledger.dump` writes it; raises UserError naming the first bad field."""
    if not isinstance(header, dict):
        raise _bad(f"{name}: line 1 is not a JSON header object (got {_type_name(header)})")
    kind = header.get("kind", _MISSING)
    if kind != "header":
        detail = "it has no field 'kind'" if kind is _MISSING else f"its 'kind' is {_show(kind)}, not 'header'"
        raise _bad(f"{name}: line 1 is not a JSON header object ({detail})")
    where = f"{name}: header field"
    world = _check_int(header, "world", where, 1, MAX_WORLD)
    rank = _check_int(header, "rank", where, 0, MAX_WORLD - 1)
    if rank >= world:
        raise _bad(f"{name}: header field 'rank' ({rank}) must be below 'world' ({world})")
    _check_int(header, "step", where, -MAX_INT, MAX_INT)
    groups = header.get("groups", _MISSING)
    if not isinstance(groups, dict) or len(groups) > MAX_GROUPS:
        raise _bad(f"{where} 'groups' must be an object of at most {MAX_GROUPS} groups, got {_show(groups)}")
    for group, members in groups.items():
        if not (isinstance(members, list) and ints_in(members, 0, world - 1) and len(set(members)) == len(members)):
            raise _bad(f"{where} 'groups': group {_show(group)} must list distinct ranks in [0, {world - 1}], "
                       f"got {_show(members)}")
    graphs = header.get("graphs", {})
    if not isinstance(graphs, dict) or len(graphs) > MAX_GROUPS:
        raise _bad(f"{where} 'graphs' must be an object of at most {MAX_GROUPS} graphs, got {_show(graphs)}")
    for graph, schedule in graphs.items():
        if not isinstance(schedule, list):
            raise _bad(f"{where} 'graphs': graph {_show(graph)} must be a list of collectives, got {_show(schedule)}")
        for i, call in enumerate(schedule):
            if not (isinstance(call, list) and len(call) == 6 and all(isinstance(v, str) for v in call[:3])):
                raise _bad(f"{where} 'graphs': collective {i} of graph {_show(graph)} must be "
                           f"[group, op, label, shapes, dtypes, sizes], got {_show(call)}")
            _check_call(dict(zip(("shapes", "dtypes", "sizes"), call[3:], strict=True)),
                        f"{where} 'graphs': collective {i} of graph {_show(graph)}:")
    return header


def validate_entry(entry, header: dict, where: str) -> dict:
    """One ledger entry (`where` names file and line); graph replays must name a graph of the header
    and give a first seq for every group its schedule uses. Raises UserError on the first bad field."""
    if not isinstance(entry, dict):
        raise _bad(f"{where}: entry is not a JSON object (got {_type_name(entry)})")
    field_of = f"{where}: entry field"
    for key in ("group", "op", "label", "state"):
        entry[key] = _check_str(entry, key, field_of)
    _check_int(entry, "seq", field_of, 0, MAX_INT)
    _check_int(entry, "step", field_of, -MAX_INT, MAX_INT)
    _check_call(entry, field_of)
    _check_time(entry, "t0", field_of, nullable=False)
    _check_time(entry, "t1", field_of, nullable=True)
    if entry["op"] == "graph":
        graphs = header.get("graphs", {})
        name = entry["label"].removeprefix("graph.")
        if not entry["label"].startswith("graph.") or name not in graphs:
            raise _bad(f"{where}: graph replay of unknown graph {_show(entry['label'])} (not in the header's 'graphs')")
        covers = entry.get("covers", _MISSING)
        if not (isinstance(covers, dict) and ints_in(list(covers.values()), 0, MAX_INT)):
            raise _bad(f"{field_of} 'covers' of a graph replay must be an object of group -> seq >= 0, "
                       f"got {_show(covers)}")
        for call in graphs[name]:
            if call[0] not in covers:
                raise _bad(f"{field_of} 'covers' has no seq for group {_show(call[0])} of graph {_show(name)}")
    return entry


# --- graph replays ----------------------------------------------------------------------------
def expand(header: dict, entries, limit: int | None = None) -> tuple[list[dict], int]:
    """Each graph-replay entry becomes the entries of the collectives it ran, as if eager. With
    `limit`, only the newest whole entries whose expansion fits are kept; returns (expanded, how many
    collectives were left out)."""
    graphs = header.get("graphs", {})
    entries = list(entries)

    def width(e: dict) -> int:
        return len(graphs[e["label"].removeprefix("graph.")]) if e["op"] == "graph" else 1

    start, left_out = 0, 0
    if limit is not None:
        kept, start = 0, len(entries)
        while start > 0 and kept + width(entries[start - 1]) <= limit:
            start -= 1
            kept += width(entries[start])
        left_out = sum(width(e) for e in itertools.islice(entries, start))
    out = []
    for e in itertools.islice(entries, start, None):
        if e["op"] != "graph":
            out.append(e)
            continue
        seq = dict(e["covers"])
        for group, op, label, shapes, dtypes, sizes in graphs[e["label"].removeprefix("graph.")]:
            out.append({"group": group, "seq": seq[group], "op": op, "label": label, "step": e["step"],
                        "shapes": shapes, "dtypes": dtypes, "sizes": sizes, "t0": e["t0"], "t1": e["t1"],
                        "state": e["state"], "graph": e["label"]})
            seq[group] += 1
    return out, left_out


# --- files ------------------------------------------------------------------------------------
def _parse(raw: bytes):
    """The JSON value of one line, or the reason it has none."""
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except RecursionError:
        return None, "nested too deeply"
    except json.JSONDecodeError as exc:
        return None, f"{exc.msg.removesuffix(' at')}, column {exc.colno}"
    except ValueError:  # an integer of more digits than Python converts (4300)
        return None, "a number with too many digits"


def read_rank_file(path: str | Path, max_entries: int | None = None, max_bytes: int | None = None) -> RankDump:
    """Reads and checks one rank file, keeping its newest `max_entries` collectives (default
    MAX_ENTRIES_PER_RANK) and reading at most `max_bytes` (default MAX_FILE_BYTES)."""
    path = Path(path)
    name = shown_path(path.name)
    max_entries = MAX_ENTRIES_PER_RANK if max_entries is None else max_entries
    limit_text = f"the {_size(MAX_FILE_BYTES)} the doctor reads per file"
    if max_bytes is None or max_bytes >= MAX_FILE_BYTES:
        max_bytes = MAX_FILE_BYTES
    else:
        limit_text = f"what is left of the {_size(MAX_TOTAL_BYTES)} the doctor reads from all rank files"
    fd, st = open_regular(path, name)
    if st.st_size > max_bytes:
        os.close(fd)
        raise _bad(f"{name}: {st.st_size} bytes is more than {limit_text}")
    header = None
    entries: collections.deque = collections.deque(maxlen=max(1, max_entries))  # the newest, like the ledger
    seen = 0
    unparsed: tuple[int, str] | None = None  # an unparsable line: fine only if no other line follows
    total = lineno = 0
    try:
        with os.fdopen(fd, "rb", buffering=MiB) as f:
            while raw := f.readline(MAX_LINE_BYTES + 1):
                lineno += 1
                total += len(raw)
                if total > max_bytes:
                    raise _bad(f"{name}: it grew past {limit_text} while being read")
                if len(raw) > MAX_LINE_BYTES:
                    raise _bad(f"{name}: line {lineno} is longer than {_size(MAX_LINE_BYTES)}")
                if not raw.strip():
                    if lineno == 1:
                        raise _bad(f"{name}: line 1 is not a JSON header object (it is blank)")
                    continue
                if unparsed is not None:
                    raise _bad(f"{name}: line {unparsed[0]} is not a JSON object ({unparsed[1]})")
                value, why = _parse(raw)
                if why is not None:
                    if lineno == 1:
                        raise _bad(f"{name}: line 1 is not a JSON header object ({why})")
                    unparsed = (lineno, why)
                elif header is None:
                    header = validate_header(value, name)
                else:
                    entries.append(validate_entry(value, header, f"{name}: line {lineno}"))
                    seen += 1
    except OSError as exc:
        raise _bad(f"{name}: cannot read it ({reason(exc)})") from None
    if header is None:
        raise _bad(f"{name}: empty file (no header line)")
    expanded, left_out = expand(header, entries, max_entries)
    return RankDump(name, header, expanded, cut_line=None if unparsed is None else unparsed[0],
                    left_out=left_out + seen - len(entries), bytes_read=total)


def find_rank_files(folder: str | Path) -> list[tuple[int, Path]]:
    """(rank number of the file name, path) of every rank<N>.jsonl in `folder`, by rank."""
    folder = Path(folder)
    shown = shown_path(folder)
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        raise _bad(f"{shown}: no such folder") from None
    except (OSError, ValueError) as exc:  # (ValueError: a NUL in the path)
        raise _bad(f"{shown}: cannot open the folder ({reason(exc)})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise _bad(f"{shown}: not a folder")
    files = []
    try:
        with os.scandir(folder) as listing:
            for i, item in enumerate(listing):
                if i >= MAX_FOLDER_ENTRIES:
                    raise _bad(f"{shown}: more than {MAX_FOLDER_ENTRIES} entries in the folder")
                match = RANK_FILE.fullmatch(item.name)
                if match is None:
                    continue
                digits = match.group(1)
                if len(digits) > len(str(MAX_WORLD)) or int(digits) >= MAX_WORLD:
                    raise _bad(f"{item.name}: the rank number in the file name must be below {MAX_WORLD}")
                files.append((int(digits), item.name))
                if len(files) > MAX_RANK_FILES:
                    raise _bad(f"{shown}: more than {MAX_RANK_FILES} rank files")
    except OSError as exc:
        raise _bad(f"{shown}: cannot list the folder ({reason(exc)})") from None
    if not files:
        raise _bad(f"no rank*.jsonl dumps in {shown}")
    return [(number, folder / file_name) for number, file_name in sorted(files)]


def load_folder(folder: str | Path) -> DumpFolder:
    """Every rank file of `folder`, checked one against another too: each header's rank is the
    file's rank number and unique, and every header gives the same `world`."""
    files = find_rank_files(folder)
    per_rank = max(1, min(MAX_ENTRIES_PER_RANK, MAX_TOTAL_ENTRIES // len(files)))
    bytes_left = MAX_TOTAL_BYTES
    result = DumpFolder({})
    world_of: tuple[int, str] | None = None
    for number, path in files:
        dump = read_rank_file(path, per_rank, bytes_left)
        bytes_left -= dump.bytes_read
        header = dump.header
        rank = header["rank"]
        if rank in result.files:
            raise _bad(f"{dump.name}: duplicate rank {rank}: {result.files[rank].name} dumps rank {rank} too")
        if rank != number:
            raise _bad(f"{dump.name}: header field 'rank' is {rank} but the file name says rank {number}")
        if world_of is None:
            world_of = (header["world"], dump.name)
        elif header["world"] != world_of[0]:
            raise _bad(f"{dump.name}: header field 'world' is {header['world']} but {world_of[1]} says "
                       f"{world_of[0]}")
        result.files[rank] = dump
        result.dumps[rank] = (header, dump.entries)
    return result
