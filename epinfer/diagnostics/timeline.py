"""Pictures of the ledger: a Chrome / Perfetto trace (one track per rank) and a PNG swimlane of
the last seconds before the fault, written without plotting libraries (zlib, a few rectangles and a
small bitmap font): a title, a legend, one lane per rank labelled "rank r", a bar per collective
coloured by group kind (EP orange, TP blue, DP green, other grey), pending collectives red, the
faulty (group, seq) outlined in black with a dashed black column and its label where the first rank
entered it, and a time axis in seconds before the last event.

Both stay bounded on any checked dump: the trace is streamed to disk, the PNG is `WIDTH` pixels wide
with at most `MAX_LANES` lanes and each lane is painted in time linear in its entries (newest on top,
as if drawn in order), whatever the times and spans. Files are written to a temporary name and
renamed, so a symlink or FIFO already at the path is replaced, never written through."""

from __future__ import annotations

import json
import math
import struct
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

from epinfer.core.untrusted import write_atomic
from epinfer.diagnostics import pixelfont

COLORS = {"ep": (230, 140, 30), "tp": (60, 110, 220), "dp": (40, 170, 80)}
PENDING = (210, 40, 40)
OTHER = (150, 150, 150)
MAX_LANES = 256  # ranks drawn in the PNG (the lowest numbers); trace.json has every rank
MARK = (0, 0, 0)  # the faulty collective's outline and column: no other pixel is this black
TEXT, FAULT_TEXT = (40, 40, 40), (170, 0, 0)
AXIS, GRID, RULE, WHITE = (90, 90, 90), (232, 232, 232), (215, 215, 215), (255, 255, 255)
WIDTH = 1100  # the PNG's width
LEFT, RIGHT = 108, 20  # the plot's margins: the lanes' labels, room for the last tick's number
TOP, BOTTOM = 88, 58  # above the lanes: title, legend, the fault's label; below: the time axis


def write_trace(dumps: dict, path: Path) -> None:
    write_atomic(Path(path), _trace_chunks(dumps))


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
    """The colours of one lane, per column (`bars`, None: background), and the columns
    [x0, x1) of the newest entry at (group, seq) `mark` (`span`, None if none is drawn). Drawing
    every entry in order, each over the last, costs the bar widths; going newest first and filling
    only columns still empty (a next-empty-column pointer) gives the same picture in time linear in
    entries + width."""
    bars: list = [None] * width
    span = None
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
        x0 = min(to_x(max(e["t0"], start)), width - 1)
        x1 = max(x0 + 1, min(to_x(t1), width))
        if span is None and mark is not None and e["seq"] == mark and e["group"] == group:
            span = (x0, x1)
        if e["state"] == "pending":
            color = PENDING
        else:
            color = COLORS.get(e["group"].split("[")[0], OTHER)
        fill(x0, x1, color)
    return bars, span


class _Canvas:
    """An RGB picture in one bytearray, white to start. Writes are clipped to the picture."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.buf = bytearray(b"\xff") * (width * height * 3)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        x0, x1 = max(0, x0), min(self.width, x1)
        if x0 >= x1:
            return
        pixels = bytes(color) * (x1 - x0)
        for y in range(max(0, y0), min(self.height, y1)):
            offset = y * self.width * 3
            self.buf[offset + 3 * x0:offset + 3 * x1] = pixels

    def row(self, x0: int, y: int, pixels: bytes) -> None:
        """`pixels` (RGB bytes) from column x0 of row y on; the caller keeps them inside the row."""
        offset = (y * self.width + x0) * 3
        self.buf[offset:offset + len(pixels)] = pixels

    def text(self, x: int, y: int, text: str, scale: int = 1, color=TEXT) -> None:
        """`text` with its top left corner at (x, y), over what is there; cut to the picture's width."""
        text = pixelfont.fit(text, self.width - max(0, x), scale)
        px = bytes(color)
        for dy, x0, x1 in pixelfont.runs(text, scale):
            x0, x1 = max(0, x + x0), min(self.width, x + x1)
            if x0 < x1 and 0 <= y + dy < self.height:
                offset = (y + dy) * self.width * 3
                self.buf[offset + 3 * x0:offset + 3 * x1] = px * (x1 - x0)

    def png(self) -> bytes:
        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

        stride = self.width * 3
        raw = b"".join(b"\x00" + self.buf[y * stride:(y + 1) * stride] for y in range(self.height))
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
                + chunk(b"IEND", b""))


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s >= 0.1 else f"{s * 1e3:.1f} ms"


def _ticks(window_s: float, plot_w: int, min_px: int = 120) -> list[tuple[int, str]]:
    """(column, text) of the time axis' ticks: round steps of seconds back from the window's end
    (0 s), at least `min_px` apart."""
    raw = window_s * min_px / plot_w
    k = math.floor(math.log10(raw))
    step, decimals = 10.0 ** (k + 1), max(1, -(k + 1))
    for m in (1, 2, 5):
        if m * 10.0 ** k >= raw:
            step, decimals = m * 10.0 ** k, max(1, -k)
            break
    ticks = []
    for i in range(int(window_s / step * (1 + 1e-9)) + 1):
        x = round((window_s - i * step) / window_s * (plot_w - 1))
        ticks.append((x, f"-{i * step:.{decimals}f} s" if i else f"{0:.{decimals}f} s"))
    return ticks


def _wall_clock(t: float) -> str | None:
    if not 0 < t < 1e11:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def write_timeline(dumps: dict, path: Path, mark: int | None = None, group: str | None = None,
                   window_s: float = 5.0, width: int = WIDTH, lane: int = 24, *,
                   mark_label: str | None = None) -> None:
    """The swimlanes of the last `window_s` seconds, `width` pixels wide with the margins: a title,
    the legend, a lane per rank (`lane` pixels high, labelled "rank r"), the time axis in seconds
    before the last event; the collective (group, seq) `mark` outlined in black in every lane that
    has it, a dashed black column where the first rank entered it, and the line "fault: `mark_label`"
    over that column."""
    ranks = sorted(dumps)[:MAX_LANES]
    end = max((_last_time(entries) for _, entries in dumps.values()), default=0.0)
    first = min((e["t0"] for _, entries in dumps.values() for e in entries), default=end)
    start = max(end - window_s, first)
    window_s = max(end - start, 1e-3)
    plot_w = max(width - LEFT - RIGHT, 200)
    width, lane = LEFT + plot_w + RIGHT, max(lane, 12)

    def to_x(t: float) -> int:
        x = (t - start) / window_s * (plot_w - 1)
        return int(min(x, plot_w)) if x >= 0 else 0  # (clamped first: no overflow on odd times)

    lanes = [(rank, *_paint_lane(dumps[rank][1], to_x, plot_w, start, end, mark, group)) for rank in ranks]
    spans = [span for _, _, span in lanes if span is not None]
    mark_x = min(x0 for x0, _ in spans) if spans else None
    axis_y = TOP + lane * max(1, len(ranks))
    canvas = _Canvas(width, axis_y + BOTTOM)
    ticks = _ticks(window_s, plot_w)

    # the title and the legend
    shown = f"{len(ranks)} of {len(dumps)} ranks (the lowest numbers)" if len(ranks) < len(dumps) else \
        f"{len(ranks)} rank{'s' if len(ranks) != 1 else ''}"
    recorded = any(entries for _, entries in dumps.values())
    canvas.text(12, 10, f"epinfer collectives, {f'last {_seconds(window_s)}' if recorded else 'none recorded'}, "
                f"{shown}", 2)
    x = 12
    items = [("EP", COLORS["ep"]), ("TP", COLORS["tp"]), ("DP", COLORS["dp"]), ("other", OTHER),
             ("pending (never finished)", PENDING)] + ([("fault (group, seq)", None)] if mark is not None else [])
    for text, color in items:
        if color is None:  # the outline drawn around the faulty collective
            canvas.rect(x, 36, x + 16, 52, MARK)
            canvas.rect(x + 2, 38, x + 14, 50, WHITE)
            canvas.rect(x + 7, 40, x + 9, 48, PENDING)
        else:
            canvas.rect(x, 37, x + 16, 51, color)
        canvas.text(x + 22, 37, text, 2)
        x += 22 + pixelfont.text_width(text, 2) + 24

    # the lanes: background (white, the ticks' grid lines), bars, the fault's outline, the labels
    colors = {None: None, **{c: bytes(c) for c in (*COLORS.values(), PENDING, OTHER)}}
    background = [bytes(WHITE)] * plot_w
    for tx, _ in ticks:
        background[tx] = bytes(GRID)
    empty_row = b"".join(background)
    scale = 2 if ranks and lane >= 20 and pixelfont.text_width(f"rank {ranks[-1]}", 2) <= LEFT - 12 else 1
    for i, (rank, bars, span) in enumerate(lanes):
        y0 = TOP + i * lane
        bar_row = b"".join(bg if c is None else colors[c] for bg, c in zip(background, bars, strict=True))
        for r in range(lane):
            canvas.row(LEFT, y0 + r, bar_row if 3 <= r < lane - 5 else empty_row)
        canvas.rect(8, y0 + lane - 2, LEFT + plot_w, y0 + lane - 1, RULE)
        text = f"rank {rank}"
        canvas.text(LEFT - 10 - pixelfont.text_width(text, scale), y0 + (lane - 2 - 7 * scale) // 2, text, scale)
        if mark_x is not None:  # dashed, behind the bars
            for r in range(lane):
                if (y0 + r - TOP) % 6 < 3 and (bars[mark_x] is None or not 3 <= r < lane - 5):
                    canvas.rect(LEFT + mark_x, y0 + r, LEFT + mark_x + 1, y0 + r + 1, MARK)
        if span is not None:  # a box, 2 pixels thick, 2 pixels clear of the bar
            bx0, bx1, by0, by1 = LEFT + span[0] - 4, LEFT + span[1] + 4, y0, y0 + lane - 2
            for box in ((bx0, by0, bx1, by0 + 2), (bx0, by1 - 2, bx1, by1), (bx0, by0, bx0 + 2, by1),
                        (bx1 - 2, by0, bx1, by1)):
                canvas.rect(*box, MARK)

    # the fault's label, over a caret at the column where the first rank entered it
    if mark is not None:
        text = f"fault: {mark_label}" if mark_label else "fault:"
        suffix = f" ({group} seq {mark})" + ("" if mark_x is not None else ", not in this picture")
        w = pixelfont.text_width(text + suffix, 2)
        if mark_x is None:
            tx, room = LEFT, width - 4 - LEFT
        else:  # right of the caret, else left of it, else on the wider side; the label cut to fit
            cx = LEFT + mark_x
            for k in range(7):
                canvas.rect(cx - 6 + k, TOP - 9 + k, cx + 7 - k, TOP - 8 + k, MARK)
            right, left = width - 4 - (cx + 12), cx - 12 - 4
            on_left = w > right and (w <= left or left > right)
            room = left if on_left else right
            tx = cx - 12 - min(w, room) if on_left else cx + 12
        if w > room:
            text = pixelfont.fit(text, room - pixelfont.ADVANCE * 2 * len(suffix), 2)
        canvas.text(tx, TOP - 26, text + suffix, 2, FAULT_TEXT)

    # the time axis
    canvas.rect(LEFT, axis_y, LEFT + plot_w, axis_y + 2, AXIS)
    for tx, text in ticks:
        canvas.rect(LEFT + tx - 1, axis_y, LEFT + tx + 1, axis_y + 8, AXIS)
        w = pixelfont.text_width(text, 2)
        canvas.text(min(max(4, LEFT + tx - w // 2), width - 4 - w), axis_y + 12, text, 2)
    title = "seconds before the last event"
    if (clock := _wall_clock(end)) is not None:
        title += f" (0 s = {clock})"
    canvas.text(LEFT + max(0, (plot_w - pixelfont.text_width(title, 2)) // 2), axis_y + 36, title, 2)
    write_atomic(Path(path), [canvas.png()])


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
