"""Pictures of the ledger: a Chrome / Perfetto trace (one track per rank) and a PNG swimlane of
the last seconds before the fault, written without plotting libraries (zlib + a few rectangles):
one lane per rank, a bar per collective coloured by group kind (EP orange, TP blue, DP green,
other grey), pending collectives red, the faulty (group, seq) outlined in black.

Both stay bounded on any checked dump: the trace is streamed to disk, the PNG has at most
`MAX_LANES` lanes and each lane is painted in time linear in its entries (newest on top, as if
drawn in order), whatever the times and spans. Files are written to a temporary name and renamed,
so a symlink or FIFO already at the path is replaced, never written through."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

COLORS = {"ep": (230, 140, 30), "tp": (60, 110, 220), "dp": (40, 170, 80)}
PENDING = (210, 40, 40)
OTHER = (150, 150, 150)
MAX_LANES = 256  # ranks drawn in the PNG (the lowest numbers); trace.json has every rank


def _write_atomic(path: Path, chunks: Iterable[bytes | str]) -> None:
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


def write_trace(dumps: dict, path: Path) -> None:
    _write_atomic(Path(path), _trace_chunks(dumps))


def _trace_chunks(dumps: dict) -> Iterable[str]:
    """The text of `json.dumps({"traceEvents": events})`, an event at a time."""
    yield '{"traceEvents": ['
    first = True
    for rank, (_, entries) in sorted(dumps.items()):
        last = _last_time(entries)
        events = [{"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}}]
        for e in entries:
            end = e["t1"] if e["t1"] is not None else max(e["t0"], last)
            events.append({"name": e["label"], "cat": e["group"], "ph": "X", "pid": rank, "tid": 0,
                           "ts": e["t0"] * 1e6, "dur": max(1.0, (end - e["t0"]) * 1e6),
                           "args": {k: e[k] for k in ("group", "seq", "op", "step", "shapes", "sizes",
                                                      "state")}})
            if len(events) >= 4096:
                yield ("" if first else ", ") + ", ".join(map(json.dumps, events))
                first, events = False, []
        if events:
            yield ("" if first else ", ") + ", ".join(map(json.dumps, events))
            first = False
    yield "]}"


def _last_time(entries: list[dict]) -> float:
    return max((e["t1"] or e["t0"]) for e in entries) if entries else 0.0


def _paint_lane(entries: list[dict], to_x, width: int, start: float, end: float, mark, group):
    """The colours of one lane, per column: `bars` (None: background) for the bar rows and `marks`
    (True: black) for the rows only outlines reach. Drawing every entry in order, each over the
    last, costs the bar widths; going newest first and filling only columns still empty (a
    next-empty-column pointer) gives the same picture in time linear in entries + width."""
    bars: list = [None] * width
    marks = bytearray(width)
    next_empty = list(range(width + 1))

    def find(x: int) -> int:
        root = x
        while next_empty[root] != root:
            root = next_empty[root]
        while next_empty[x] != root:
            next_empty[x], x = root, next_empty[x]
        return root

    def fill(x0: int, x1: int, color) -> None:
        x = find(x0)
        while x < x1:
            bars[x] = color
            next_empty[x] = x + 1
            x = find(x + 1)

    for e in reversed(entries):
        t1 = e["t1"] if e["t1"] is not None else end
        if t1 < start:
            continue
        x0 = to_x(max(e["t0"], start))
        x1 = max(x0 + 1, to_x(t1))
        if mark is not None and e["seq"] == mark and e["group"] == group:  # drawn after its bar
            fill(x0, min(x0 + 2, width), (0, 0, 0))
            for x in range(x0, min(x0 + 2, width)):
                marks[x] = 1
        if e["state"] == "pending":
            color = PENDING
        else:
            color = COLORS.get(e["group"].split("[")[0], OTHER)
        fill(x0, min(x1, width), color)
    return bars, marks


def write_timeline(dumps: dict, path: Path, mark: int | None = None, group: str | None = None,
                   window_s: float = 5.0, width: int = 1000, lane: int = 24) -> None:
    ranks = sorted(dumps)[:MAX_LANES]
    end = max((_last_time(entries) for _, entries in dumps.values()), default=0.0)
    first = min((e["t0"] for _, entries in dumps.values() for e in entries), default=end)
    start = max(end - window_s, first)
    window_s = max(end - start, 1e-3)

    def to_x(t: float) -> int:
        x = (t - start) / window_s * (width - 1)
        return int(min(x, width)) if x >= 0 else 0  # (clamped first: no overflow on odd times)

    white, black, grey = b"\xff" * 3, b"\x00" * 3, bytes((220, 220, 220))
    blank = b"\x00" + white * width
    rows = [blank] * 4
    for rank in ranks:
        bars, marks = _paint_lane(dumps[rank][1], to_x, width, start, end, mark, group)
        outline = b"\x00" + b"".join(black if m else white for m in marks)
        bar_row = b"\x00" + b"".join(white if c is None else bytes(c) for c in bars)
        # rows of a lane: 3 outline-only, lane - 8 bar rows, 3 outline-only, the grey rule, 1 blank
        rows += [outline] * 3 + [bar_row] * (lane - 8) + [outline] * 3 + [b"\x00" + grey * width, blank]
    rows += [blank] * (4 + lane * (max(1, len(ranks)) - len(ranks)))
    height = len(rows)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"".join(rows), 6)) + chunk(b"IEND", b"")
    _write_atomic(Path(path), [png])


def merge_traces(paths: list[Path], out: Path) -> Path | None:
    """One Chrome trace of several ranks' profiler traces (`rank{r}` in each file's name; ranks of one
    host, so one clock): every event moved onto the earliest trace's time base, each rank's processes
    (host, GPU streams) renamed "rank r: ..." and numbered apart, flow ids too. The rank files are
    removed once merged. None when there is nothing to merge."""
    if not paths:
        return None
    traces = [(int(p.stem.rsplit("rank", 1)[1]), json.loads(p.read_text())) for p in paths]
    base = min(t.get("baseTimeNanoseconds", 0) for _, t in traces)
    events = []
    for rank, trace in traces:
        shift_us = (trace.get("baseTimeNanoseconds", 0) - base) / 1e3
        pids: dict = {}
        for e in trace.get("traceEvents", []):
            e = dict(e)
            if "pid" in e:  # numbered per rank: the host pid, or the device index of a GPU's streams
                e["pid"] = rank * 1000 + pids.setdefault(e["pid"], len(pids))
            if "ts" in e:
                e["ts"] = float(e["ts"]) + shift_us
            if e.get("ph") in ("s", "f", "t") and isinstance(e.get("id"), int):
                e["id"] = rank * 10**9 + e["id"]
            if e.get("ph") == "M" and e.get("name") == "process_name":
                e["args"] = {**e.get("args", {}), "name": f"rank {rank}: {e.get('args', {}).get('name', '')}"}
            events.append(e)
    out.write_text(json.dumps({"displayTimeUnit": "ms", "baseTimeNanoseconds": base, "traceEvents": events}))
    for p in paths:
        p.unlink()
    return out
