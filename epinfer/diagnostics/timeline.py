"""Pictures of the ledger: a Chrome / Perfetto trace (one track per rank) and a PNG swimlane of
the last seconds before the fault, written without plotting libraries (zlib + a few rectangles):
one lane per rank, a bar per collective coloured by group kind (EP orange, TP blue, DP green,
other grey), pending collectives red, the faulty (group, seq) outlined in black."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

COLORS = {"ep": (230, 140, 30), "tp": (60, 110, 220), "dp": (40, 170, 80)}


def write_trace(dumps: dict, path: Path) -> None:
    events = []
    for rank, (_, entries) in sorted(dumps.items()):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        for e in entries:
            end = e["t1"] if e["t1"] is not None else max(e["t0"], _last_time(entries))
            events.append({"name": e["label"], "cat": e["group"], "ph": "X", "pid": rank, "tid": 0,
                           "ts": e["t0"] * 1e6, "dur": max(1.0, (end - e["t0"]) * 1e6),
                           "args": {k: e[k] for k in ("group", "seq", "op", "step", "shapes", "sizes",
                                                      "state")}})
    path.write_text(json.dumps({"traceEvents": events}))


def _last_time(entries: list[dict]) -> float:
    return max((e["t1"] or e["t0"]) for e in entries) if entries else 0.0


def write_timeline(dumps: dict, path: Path, mark: int | None = None, group: str | None = None,
                   window_s: float = 5.0, width: int = 1000, lane: int = 24) -> None:
    ranks = sorted(dumps)
    end = max((_last_time(entries) for _, entries in dumps.values()), default=0.0)
    first = min((e["t0"] for _, entries in dumps.values() for e in entries), default=end)
    start = max(end - window_s, first)
    window_s = max(end - start, 1e-3)
    height = lane * max(1, len(ranks)) + 8
    pixels = bytearray(b"\xff" * (width * height * 3))

    def rect(x0, x1, y0, y1, color):
        for y in range(max(0, y0), min(height, y1)):
            row = y * width * 3
            for x in range(max(0, x0), min(width, x1)):
                pixels[row + 3 * x: row + 3 * x + 3] = bytes(color)

    for i, rank in enumerate(ranks):
        y0 = 4 + i * lane
        rect(0, width, y0 + lane - 2, y0 + lane - 1, (220, 220, 220))
        for e in dumps[rank][1]:
            t1 = e["t1"] if e["t1"] is not None else end
            if t1 < start:
                continue
            x0 = int((max(e["t0"], start) - start) / window_s * (width - 1))
            x1 = max(x0 + 1, int((t1 - start) / window_s * (width - 1)))
            kind = e["group"].split("[")[0]
            color = (210, 40, 40) if e["state"] == "pending" else COLORS.get(kind, (150, 150, 150))
            rect(x0, x1, y0 + 3, y0 + lane - 5, color)
            if mark is not None and e["seq"] == mark and e["group"] == group:
                rect(x0, x0 + 2, y0, y0 + lane - 2, (0, 0, 0))
    raw = b"".join(b"\x00" + bytes(pixels[y * width * 3:(y + 1) * width * 3]) for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    path.write_bytes(png)


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
