"""`timeline.png` reads on its own: the PNG is decoded here (zlib, filter type 0 rows) and checked for
the rank labels in the left margin, the time axis' ticks, a legend with every colour, the title and
the fault's outline and label exactly when a fault is marked."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from epinfer.diagnostics import pixelfont, timeline
from epinfer.diagnostics.doctor import analyse
from epinfer.diagnostics.timeline import BOTTOM, LEFT, MARK, RIGHT, TOP, WIDTH, write_timeline

T0 = 1_764_300_000.0
LANE = 24
WHITE = (255, 255, 255)


def decode(path: Path) -> tuple[int, int, list[list[tuple[int, int, int]]]]:
    """Width, height and the RGB pixels, row by row, of a PNG as `write_timeline` writes it."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(tag + body) & 0xFFFFFFFF
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    assert tag == b"IEND" and header is not None
    width, height, depth, color_type, _, _, interlace = header
    assert (depth, color_type, interlace) == (8, 2, 0)  # 8-bit RGB, not interlaced
    raw = zlib.decompress(idat)
    stride = 1 + 3 * width
    assert len(raw) == stride * height
    rows = []
    for y in range(height):
        line = raw[y * stride:(y + 1) * stride]
        assert line[0] == 0  # filter type 0: the bytes are the pixels
        rows.append([tuple(line[i:i + 3]) for i in range(1, stride, 3)])
    return width, height, rows


def colours(rows, x0: int, y0: int, x1: int, y1: int) -> set[tuple[int, int, int]]:
    return {px for row in rows[y0:y1] for px in row[x0:x1]}


def entry(group: str, seq: int, label: str, t0: float, dur: float | None, op: str = "all_reduce") -> dict:
    return {"group": group, "seq": seq, "op": op, "label": label, "step": seq, "shapes": [[2, 8]],
            "dtypes": ["float32"], "sizes": None, "t0": t0, "t1": None if dur is None else t0 + dur,
            "state": "pending" if dur is None else "done"}


def run_of(world: int = 4, seconds: float = 6.0) -> dict[int, tuple[dict, list[dict]]]:
    """rank -> (header, entries): every 50 ms a DP, a TP, two EP and a world collective. 1 s before
    the end the last rank enters the EP dispatch and never leaves it; the others never arrive there
    but go on with TP and DP collectives of their own."""
    dumps = {}
    stop = int((seconds - 1) / 0.05)
    for rank in range(world):
        tp, dp = f"tp[{rank - rank % 2},{rank - rank % 2 + 1}]", f"dp[{rank % 2},{rank % 2 + 2}]"
        entries, seqs = [], {"ep": 0, tp: 0, dp: 0, "world": 0}
        for i in range(int(seconds / 0.05)):
            t = T0 + i * 0.05 + rank * 1e-3
            if i == stop and rank == world - 1:
                entries.append(entry("ep", seqs["ep"], "layer.0.moe.dispatch", t, None, "all_to_all"))
                break
            calls = [(dp, "step.decision", 0.002), (tp, "layer.0.attn.out", 0.004),
                     ("ep", "layer.0.moe.dispatch", 0.01), ("ep", "layer.0.moe.combine", 0.008),
                     ("world", "barrier", 0.003)] if i < stop else [(dp, "prefill", 0.01), (tp, "prefill", 0.02)]
            for k, (group, label, dur) in enumerate(calls):
                entries.append(entry(group, seqs[group], label, t + k * 0.01, dur))
                seqs[group] += 1
        groups = {tp: [rank - rank % 2, rank - rank % 2 + 1], dp: [rank % 2, rank % 2 + 2], "ep": list(range(world)),
                  "world": list(range(world))}
        dumps[rank] = ({"kind": "header", "rank": rank, "world": world, "groups": groups, "step": 0}, entries)
    return dumps


def pending_seq(dumps) -> int:
    return next(e["seq"] for _, entries in dumps.values() for e in entries if e["state"] == "pending")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """The same run drawn with and without a marked fault."""
    folder = tmp_path_factory.mktemp("timeline")
    dumps = run_of()
    seq = pending_seq(dumps)
    write_timeline(dumps, folder / "marked.png", mark=seq, group="ep", mark_label="layer.0.moe.dispatch")
    write_timeline(dumps, folder / "plain.png")
    return {name: decode(folder / f"{name}.png") for name in ("marked", "plain")}


def test_dimensions(pictures, tmp_path):
    for width, height, _ in pictures.values():
        assert (width, height) == (WIDTH, TOP + 4 * LANE + BOTTOM)
    write_timeline(run_of(world=2), tmp_path / "two.png", lane=30)
    assert decode(tmp_path / "two.png")[:2] == (WIDTH, TOP + 2 * 30 + BOTTOM)


def test_every_lane_is_labelled_in_the_left_margin(pictures):
    _, _, rows = pictures["plain"]
    labels = []
    for i in range(4):
        y0 = TOP + i * LANE
        lane_colours = colours(rows, 0, y0, LEFT - 6, y0 + LANE - 2)
        assert timeline.TEXT in lane_colours, f"no label for rank {i}"
        assert lane_colours <= {WHITE, timeline.TEXT, timeline.RULE}
        labels.append([row[:LEFT - 6] for row in rows[y0:y0 + LANE - 2]])
    assert len({str(label) for label in labels}) == 4  # "rank 0" .. "rank 3", each its own


def test_the_time_axis_has_ticks_and_numbers(pictures):
    width, height, rows = pictures["plain"]
    axis_y = TOP + 4 * LANE
    plot = range(LEFT - 1, WIDTH - RIGHT + 1)
    assert all(rows[axis_y][x] == timeline.AXIS for x in range(LEFT, WIDTH - RIGHT))  # the axis line
    below = rows[axis_y + 5]  # under the line, only the ticks
    ticks = [x for x in plot if below[x] == timeline.AXIS and below[x - 1] != timeline.AXIS]
    assert len(ticks) == 6  # 5 s: -5.0 s .. 0.0 s
    assert ticks[-1] >= WIDTH - RIGHT - 3 and ticks[0] <= LEFT  # 0 s at the right end, -5 s at the left
    gaps = {b - a for a, b in zip(ticks, ticks[1:], strict=False)}
    assert max(gaps) - min(gaps) <= 1  # evenly spaced
    assert timeline.TEXT in colours(rows, 0, axis_y + 10, width, axis_y + 30)  # the tick numbers
    assert timeline.TEXT in colours(rows, 0, axis_y + 32, width, height)  # the axis title


def test_ticks_are_round_seconds_back_from_the_end():
    assert [text for _, text in timeline._ticks(5.0, 1000)] == [f"{-s:.1f} s".replace("-0.0", "0.0")
                                                                for s in range(6)]
    assert [text for _, text in timeline._ticks(0.3, 1000)] == [f"-{s:.2f} s" if s else "0.00 s"
                                                                for s in (0, .05, .1, .15, .2, .25, .3)]
    assert timeline._ticks(1e-3, 1000)[1][1] == "-0.0002 s"
    ticks = timeline._ticks(5.0, 976)
    assert ticks[0][0] == 975 and ticks[-1][0] == 0


def test_the_legend_shows_every_colour(pictures):
    for name, (width, _, rows) in pictures.items():
        legend = colours(rows, 0, 30, width, 56)
        for colour in (*timeline.COLORS.values(), timeline.OTHER, timeline.PENDING):
            assert colour in legend, (name, colour)
        assert (MARK in legend) == (name == "marked")  # the fault's outline, when there is one
    assert timeline.TEXT in colours(rows, 0, 0, WIDTH, 28)  # the title


def test_the_fault_is_outlined_and_labelled_only_when_marked(pictures):
    _, _, marked = pictures["marked"]
    _, _, plain = pictures["plain"]
    lanes = (TOP, TOP + 4 * LANE)
    assert MARK in colours(marked, LEFT - 4, lanes[0], WIDTH, lanes[1])
    assert timeline.FAULT_TEXT in colours(marked, 0, TOP - 30, WIDTH, TOP)
    everything = colours(plain, 0, 0, WIDTH, len(plain))
    assert MARK not in everything and timeline.FAULT_TEXT not in everything
    # the pending rank's lane carries the outline (its top and bottom edges), the others only the
    # dashed column where the first rank entered the collective
    last = TOP + 3 * LANE
    assert sum(px == MARK for px in marked[last]) > 50  # the box around the long pending bar
    columns = {x for y in range(TOP, last) for x, px in enumerate(marked[y]) if px == MARK}
    assert len(columns) == 1
    # a caret over that column, above the lanes
    (x,) = columns
    assert marked[TOP - 4][x] == MARK


def test_the_label_of_the_fault_is_the_one_given(tmp_path):
    dumps = run_of()
    seq = pending_seq(dumps)

    def label_extent(label):
        write_timeline(dumps, tmp_path / "t.png", mark=seq, group="ep", mark_label=label)
        _, _, rows = decode(tmp_path / "t.png")
        xs = [x for row in rows[TOP - 30:TOP] for x, px in enumerate(row) if px == timeline.FAULT_TEXT]
        return max(xs) - min(xs)

    short, long = label_extent("x"), label_extent("layer.0.moe.dispatch")
    assert long - short == pixelfont.text_width("layer.0.moe.dispatch", 2) - pixelfont.text_width("x", 2)
    # hostile labels: cut to the picture, odd characters drawn as '?'
    assert label_extent("\x00\n\u00e9" * 5000) < WIDTH


def test_a_fault_outside_the_window_is_said_so(tmp_path):
    dumps = run_of()
    write_timeline(dumps, tmp_path / "t.png", mark=0, group="ep", mark_label="layer.0.moe.dispatch")
    _, _, rows = decode(tmp_path / "t.png")
    assert timeline.FAULT_TEXT in colours(rows, 0, TOP - 30, WIDTH, TOP)
    assert MARK not in colours(rows, 0, TOP, WIDTH, len(rows))  # nothing to outline in the lanes


def test_doctor_labels_the_fault(tmp_path):
    for rank, (header, entries) in run_of().items():
        (tmp_path / f"rank{rank}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [header, *entries]))
    report = analyse(tmp_path)
    assert report["verdict"] == "hang" and report["label"] == "layer.0.moe.dispatch"
    _, _, rows = decode(tmp_path / "timeline.png")
    assert timeline.FAULT_TEXT in colours(rows, 0, TOP - 30, WIDTH, TOP)
    assert MARK in colours(rows, LEFT - 4, TOP, WIDTH, TOP + 4 * LANE)


def test_large_rank_numbers_keep_their_labels_in_the_margin(tmp_path):
    dumps = {65535: run_of(world=1)[0], 7: run_of(world=1)[0]}
    write_timeline(dumps, tmp_path / "t.png")
    width, height, rows = decode(tmp_path / "t.png")
    assert (width, height) == (WIDTH, TOP + 2 * LANE + BOTTOM)
    for i in range(2):
        y0 = TOP + i * LANE
        assert timeline.TEXT in colours(rows, 0, y0, LEFT - 6, y0 + LANE - 2)
        assert timeline.TEXT not in colours(rows, LEFT - 6, y0, LEFT, y0 + LANE - 2)


def test_the_font():
    assert set("0123456789 .-:[],()_/=?") <= set(pixelfont.GLYPHS)
    assert set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") <= set(pixelfont.GLYPHS)
    for ch in pixelfont.GLYPHS:
        for dy, x0, x1 in pixelfont.runs(ch, 2):
            assert 0 <= dy < pixelfont.GLYPH_H * 2 and 0 <= x0 < x1 <= pixelfont.GLYPH_W * 2
    assert list(pixelfont.runs("\u00e9")) == list(pixelfont.runs("?"))
    assert not list(pixelfont.runs(" "))
    assert pixelfont.text_width("rank 0", 2) == 70
    assert pixelfont.fit("rank 0", 70, 2) == "rank 0" and pixelfont.fit("rank 0", 69, 2) == "ran.."
