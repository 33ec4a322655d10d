"""`epinfer doctor` on hostile dump folders, in-process (no ranks spawned): rank files are written by
hand in the format `Ledger.dump` writes. A valid folder gives exit 0 and a verdict; every malformed
one gives exit 2 and exactly one `epinfer: error:` line naming the file and the fault; a rank file
cut off in its last line is used without it and reported; a seeded fuzz of mutated folders never
lets anything else out."""

from __future__ import annotations

import json
import os
import random
import struct
import time
from collections import defaultdict
from pathlib import Path

import pytest

from epinfer import cli
from epinfer.core.errors import UserError
from epinfer.diagnostics import dump_format
from epinfer.diagnostics.ledger import read_dump

T_START = 1_764_300_000.0
GRAPH = "decode.b2"


def make_dump(world: int = 4, steps: int = 3, graph: bool = False) -> dict[int, list[dict]]:
    """rank -> [header, *entries] of a clean run: per step and layer a TP all_reduce and the EP
    dispatch and combine. With `graph`, rank 0 ran its last step as one CUDA graph replay."""
    tp_groups = {r: f"tp[{r - r % 2},{r - r % 2 + 1}]" for r in range(world)}
    groups = {name: [int(x) for x in name[3:-1].split(",")] for name in tp_groups.values()}
    groups |= {"ep": list(range(world)), "graph": list(range(world))}
    dump = {}
    for rank in range(world):
        mine = {name: members for name, members in groups.items() if rank in members}
        header = {"kind": "header", "rank": rank, "world": world, "dp": world // 2, "tp": 2, "groups": mine,
                  "status": "ok", "reason": None, "step": steps - 1, "time": T_START + 10, "pid": 1000 + rank}
        seqs: dict[str, int] = defaultdict(int)
        entries, schedule = [], []
        for step in range(steps):
            calls = []
            for layer in range(2):
                calls += [[tp_groups[rank], "all_reduce", f"layer.{layer}.attn.out", [[2, 8]], ["float32"], None],
                          ["ep", "all_gather", f"layer.{layer}.moe.dispatch", [[2, 8]], ["float32"], [2] * world],
                          ["ep", "reduce_scatter", f"layer.{layer}.moe.combine", [[8, 8]], ["float32"], [2] * world]]
            t0 = T_START + step * 0.1 + rank * 1e-4
            if graph and rank == 0 and step == steps - 1:
                covers = {}
                for call in calls:
                    covers.setdefault(call[0], seqs[call[0]])
                    seqs[call[0]] += 1
                schedule = calls
                entries.append({"group": "graph", "seq": seqs["graph"], "op": "graph", "label": f"graph.{GRAPH}",
                                "step": step, "shapes": [], "dtypes": [], "sizes": None, "covers": covers,
                                "t0": t0, "t1": t0 + 0.01, "state": "done"})
                seqs["graph"] += 1
                continue
            for i, (group, op, label, shapes, dtypes, sizes) in enumerate(calls):
                entries.append({"group": group, "seq": seqs[group], "op": op, "label": label, "step": step,
                                "shapes": shapes, "dtypes": dtypes, "sizes": sizes, "t0": t0 + i * 1e-3,
                                "t1": t0 + i * 1e-3 + 5e-4, "state": "done"})
                seqs[group] += 1
        if schedule:
            header["graphs"] = {GRAPH: schedule}
        header["entries"] = len(entries)
        dump[rank] = [header, *entries]
    return dump


def write_dump(folder: Path, dump: dict[int, list[dict]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for rank, lines in dump.items():
        (folder / f"rank{rank}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def run_doctor(capsys, folder, *flags: str) -> tuple[int, str, str]:
    code = cli.main(["doctor", str(folder), *flags])
    out, err = capsys.readouterr()
    return code, out, err


def edit(folder: Path, rank: int, lineno: int, change) -> None:
    """Applies `change` to the JSON object on line `lineno` (1: the header) of rank's file."""
    path = folder / f"rank{rank}.jsonl"
    lines = path.read_text().splitlines()
    obj = json.loads(lines[lineno - 1])
    change(obj)
    lines[lineno - 1] = json.dumps(obj)  # (NaN and Infinity written as such)
    path.write_text("\n".join(lines) + "\n")


def replace_line(folder: Path, rank: int, lineno: int, text: str) -> None:
    path = folder / f"rank{rank}.jsonl"
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


def setter(key, value):
    return lambda obj: obj.__setitem__(key, value)


def test_valid_dumps_are_ok(tmp_path, capsys):
    for graph in (False, True):
        folder = write_dump(tmp_path / f"graph{graph}", make_dump(graph=graph))
        code, out, err = run_doctor(capsys, folder, "--json")
        assert code == 0 and err == ""
        report = json.loads(out)
        assert report["verdict"] == "ok" and report["truncated_ranks"] == [] and report["notes"] == []
        assert report["missing_ranks"] == [] and report["steps_by_rank"] == {str(r): 2 for r in range(4)}
        code, out, err = run_doctor(capsys, folder)
        assert code == 0 and out.startswith("verdict: ok\nAll 4 ranks issued the same") and err == ""
        assert json.loads((folder / "trace.json").read_text())["traceEvents"]
        assert (folder / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    # the replay expands to the collectives rank 0 would have run eagerly
    _, replayed = read_dump(tmp_path / "graphTrue" / "rank0.jsonl")
    _, eager = read_dump(tmp_path / "graphFalse" / "rank0.jsonl")
    keys = ("group", "seq", "op", "label", "step", "shapes", "sizes")
    assert [[e[k] for k in keys] for e in replayed] == [[e[k] for k in keys] for e in eager]


def test_a_collective_out_of_order_is_still_a_mismatch(tmp_path, capsys):
    dump = make_dump()
    for x in dump[2][1:]:
        if x["label"] == "layer.1.moe.dispatch" and x["step"] == 1:
            x["op"], x["label"] = "reduce_scatter", "layer.1.moe.combine"
    code, out, _ = run_doctor(capsys, write_dump(tmp_path, dump), "--json")
    report = json.loads(out)
    assert code == 0 and report["verdict"] == "mismatch" and report["culprit_ranks"] == [2]
    assert report["step"] == 1 and report["label"] == "layer.1.moe.dispatch"


def _fifo(folder: Path, _mp) -> None:
    (folder / "rank0.jsonl").unlink()
    os.mkfifo(folder / "rank0.jsonl")


def _symlink(target: str):
    def make(folder: Path, _mp) -> None:
        (folder / "rank2.jsonl").unlink()
        (folder / "rank2.jsonl").symlink_to(target)
    return make


def _too_big(folder: Path, mp) -> None:
    mp.setattr(dump_format, "MAX_FILE_BYTES", 200)


def _line_too_long(folder: Path, mp) -> None:
    mp.setattr(dump_format, "MAX_LINE_BYTES", 300)
    edit(folder, 3, 4, setter("label", "x" * 400))


def _rewrite(rank: int, data: bytes):
    return lambda folder, _mp: (folder / f"rank{rank}.jsonl").write_bytes(data)


def _edit(rank: int, lineno: int, change):
    return lambda folder, _mp: edit(folder, rank, lineno, change)


def _line(rank: int, lineno: int, text: str):
    return lambda folder, _mp: replace_line(folder, rank, lineno, text)


def _del(key):
    return lambda obj: obj.pop(key)


def _set_member(group: str, value):
    return lambda obj: obj["groups"][group].__setitem__(1, value)


GARBAGE = bytes(random.Random(7).randrange(256) for _ in range(3000)) + b"\xff\xfe\xc3\x28"

# (id, folder mutation, the file at fault or None, a fragment of the message)
MALFORMED = [
    ("empty-file", _rewrite(1, b""), "rank1.jsonl", "empty file"),
    ("only-whitespace", _rewrite(1, b"  \n\t\n\n   "), "rank1.jsonl", "blank"),
    ("binary-garbage", _rewrite(1, b"\x80\x00" + GARBAGE), "rank1.jsonl", "line 1 is not a JSON header object"),
    ("header-a-list", _line(1, 1, "[1, 2, 3]"), "rank1.jsonl", "line 1 is not a JSON header object"),
    ("header-kind-missing", _edit(1, 1, _del("kind")), "rank1.jsonl", "'kind'"),
    ("world-huge", _edit(0, 1, setter("world", 10**7)), "rank0.jsonl",
     "header field 'world' must be an integer in [1, 65536], got 10000000"),
    ("world-a-string", _edit(0, 1, setter("world", "4")), "rank0.jsonl", "header field 'world'"),
    ("world-disagrees", _edit(2, 1, setter("world", 8)), "rank2.jsonl", "'world' is 8 but rank0.jsonl says 4"),
    ("rank-negative", _edit(1, 1, setter("rank", -1)), "rank1.jsonl", "header field 'rank'"),
    ("rank-not-below-world", _edit(3, 1, setter("rank", 4)), "rank3.jsonl", "below 'world'"),
    ("rank-duplicated", _edit(1, 1, setter("rank", 0)), "rank1.jsonl", "duplicate rank 0"),
    ("rank-not-the-file-name", _edit(1, 1, setter("rank", 3)), "rank1.jsonl", "the file name says rank 1"),
    ("step-a-float", _edit(1, 1, setter("step", 2.5)), "rank1.jsonl", "header field 'step'"),
    ("groups-not-a-dict", _edit(2, 1, setter("groups", [[0, 1]])), "rank2.jsonl", "header field 'groups'"),
    ("group-member-a-string", _edit(2, 1, _set_member("ep", "1")), "rank2.jsonl", "group 'ep'"),
    ("group-member-out-of-world", _edit(2, 1, _set_member("ep", 70000)), "rank2.jsonl", "group 'ep'"),
    ("entry-not-an-object", _line(1, 3, "[1, 2]"), "rank1.jsonl", "line 3: entry is not a JSON object"),
    ("entry-seq-a-string", _edit(1, 2, setter("seq", "0")), "rank1.jsonl", "line 2: entry field 'seq'"),
    ("entry-seq-negative", _edit(1, 2, setter("seq", -3)), "rank1.jsonl", "line 2: entry field 'seq'"),
    ("entry-group-missing", _edit(1, 5, _del("group")), "rank1.jsonl", "line 5: entry field 'group'"),
    ("entry-t0-nan", _edit(3, 4, setter("t0", float("nan"))), "rank3.jsonl", "line 4: entry field 't0'"),
    ("entry-t0-infinity-string", _edit(3, 4, setter("t0", "Infinity")), "rank3.jsonl", "entry field 't0'"),
    ("entry-t0-infinity", _edit(3, 4, setter("t0", float("inf"))), "rank3.jsonl", "entry field 't0'"),
    ("entry-t1-a-string", _edit(3, 4, setter("t1", "soon")), "rank3.jsonl", "entry field 't1'"),
    ("entry-shapes-not-a-list", _edit(0, 6, setter("shapes", 8)), "rank0.jsonl", "line 6: entry field 'shapes'"),
    ("entry-shape-of-strings", _edit(0, 6, setter("shapes", [["2", 8]])), "rank0.jsonl", "'shapes'"),
    ("entry-sizes-a-dict", _edit(0, 6, setter("sizes", {"a": 1})), "rank0.jsonl", "'sizes'"),
    ("entry-dtypes-of-ints", _edit(0, 6, setter("dtypes", [1])), "rank0.jsonl", "'dtypes'"),
    ("entry-state-null", _edit(0, 6, setter("state", None)), "rank0.jsonl", "'state'"),
    ("entry-huge-int", _line(0, 6, '{"seq": ' + "9" * 5000 + "}"), "rank0.jsonl", "line 6 is not a JSON object"),
    ("entry-nested-deeply", _line(0, 6, "[" * 100_000), "rank0.jsonl", "line 6 is not a JSON object"),
    ("middle-line-garbage", _line(1, 3, '{"group": "ep", "se\x01q'), "rank1.jsonl", "line 3 is not a JSON object"),
    ("symlink-to-dev-zero", _symlink("/dev/zero"), "rank2.jsonl", "not a regular file"),
    ("symlink-dangling", _symlink("/nonexistent/rank2.jsonl"), "rank2.jsonl", "cannot read"),
    ("fifo", _fifo, "rank0.jsonl", "not a regular file"),
    ("a-folder", lambda f, _mp: (f / "rank7.jsonl").mkdir(), "rank7.jsonl", "not a regular file"),
    ("rank-number-too-big", _rewrite(99999999, b"{}\n"), "rank99999999.jsonl", "must be below 65536"),
    ("file-over-the-cap", _too_big, "rank0.jsonl", "more than"),
    ("line-over-the-cap", _line_too_long, "rank3.jsonl", "line 4 is longer than"),
]
GRAPH_MALFORMED = [
    ("graph-unknown", _edit(0, 14, setter("label", "graph.prefill.b9")), "rank0.jsonl", "unknown graph"),
    ("graph-covers-missing", _edit(0, 14, _del("covers")), "rank0.jsonl", "'covers'"),
    ("graph-covers-lacks-a-group", _edit(0, 14, lambda e: e["covers"].pop("ep")), "rank0.jsonl", "group 'ep'"),
    ("graph-schedule-malformed", _edit(0, 1, lambda h: h["graphs"][GRAPH].__setitem__(2, ["ep", "x"])),
     "rank0.jsonl", "graphs"),
    ("graphs-not-a-dict", _edit(0, 1, setter("graphs", [])), "rank0.jsonl", "header field 'graphs'"),
]


def assert_one_error_line(code: int, out: str, err: str, name: str | None, fragment: str) -> None:
    assert code == 2, (out, err)
    assert out == "" and "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("epinfer: error: "), err
    if name is not None:
        assert f"{name}: " in err, err
    assert fragment in err, err


@pytest.mark.timeout(20)  # a FIFO that is opened blocks: fail instead of hanging
@pytest.mark.parametrize("graph,mutate,name,fragment",
                         [pytest.param(False, *case[1:], id=case[0]) for case in MALFORMED]
                         + [pytest.param(True, *case[1:], id=case[0]) for case in GRAPH_MALFORMED])
def test_malformed_dump_is_one_error_line(graph, mutate, name, fragment, tmp_path, capsys, monkeypatch):
    folder = write_dump(tmp_path / "dump", make_dump(graph=graph))
    assert graph is False or json.loads((folder / "rank0.jsonl").read_text().splitlines()[13])["op"] == "graph"
    mutate(folder, monkeypatch)
    for flags in ((), ("--json",)):
        assert_one_error_line(*run_doctor(capsys, folder, *flags), name, fragment)


@pytest.mark.parametrize("folder,fragment", [
    ("missing", "no such folder"),
    ("empty", "no rank*.jsonl dumps in"),
    ("others", "no rank*.jsonl dumps in"),
    ("a-file", "not a folder"),
])
def test_folder_without_dumps_is_one_error_line(folder, fragment, tmp_path, capsys):
    path = tmp_path / folder
    if folder in ("empty", "others"):
        path.mkdir()
    if folder == "others":
        for name in ("rank0.jsonl.bak", "rankX.jsonl", "rank1.stacks.txt", "trace.json"):
            (path / name).write_text("{}\n")
    if folder == "a-file":
        path.write_text("{}\n")
    for flags in ((), ("--json",)):
        code, out, err = run_doctor(capsys, path, *flags)
        assert_one_error_line(code, out, err, None, fragment)
        assert str(path) in err


@pytest.mark.parametrize("keep_newline", [False, True])
def test_cut_off_last_line_is_a_rank_stopped_while_writing(keep_newline, tmp_path, capsys):
    folder = write_dump(tmp_path, make_dump())
    path = folder / "rank1.jsonl"
    text = path.read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    cut = text[: len(text) - 1 - len(last) // 2] + ("\n" if keep_newline else "")
    path.write_text(cut)
    code, out, err = run_doctor(capsys, folder, "--json")
    assert code == 0 and err == ""
    report = json.loads(out)
    assert report["verdict"] == "ok" and report["truncated_ranks"] == [1]
    lines = len(text.splitlines())
    assert f"Rank 1 stopped while writing its dump: line {lines} of rank1.jsonl is cut off" in report["summary"]
    assert report["notes"] and "Rank 1 stopped while writing" in report["notes"][0]
    code, out, err = run_doctor(capsys, folder)
    assert code == 0 and "verdict: ok" in out and "Rank 1 stopped while writing its dump" in out
    header, entries = read_dump(path)  # other readers get the rest of the file too
    assert header["rank"] == 1 and len(entries) == lines - 2


def test_read_dump_raises_user_error(tmp_path):
    folder = write_dump(tmp_path, make_dump(world=2))
    replace_line(folder, 0, 2, "{not json")
    with pytest.raises(UserError, match=r"rank0\.jsonl: line 2 is not a JSON object"):
        read_dump(folder / "rank0.jsonl")


def test_odd_times_and_many_ranks_keep_pictures_bounded(tmp_path, capsys):
    """Valid but odd: times at the ends of the allowed range, pending entries with no end, a rank
    with no entries, and more ranks than the PNG has lanes."""
    dump = make_dump(world=2)
    dump[0][1]["t0"], dump[0][2]["t0"] = -dump_format.MAX_TIME_S, dump_format.MAX_TIME_S
    dump[0][3]["t1"] = None
    dump[1] = dump[1][:1]
    folder = write_dump(tmp_path / "odd", dump)
    code, out, err = run_doctor(capsys, folder, "--json")
    assert code == 0 and err == "" and json.loads(out)["verdict"] in ("ok", "hang", "mismatch")
    assert json.loads((folder / "trace.json").read_text())["traceEvents"]

    world = 300
    header = {"kind": "header", "world": world, "groups": {"ep": list(range(world))}, "step": 0}
    many = {r: [{**header, "rank": r}, {"group": "ep", "seq": 0, "op": "all_gather", "label": "x", "step": 0,
                                        "shapes": [], "dtypes": [], "sizes": None, "t0": r * 1e9,
                                        "t1": None, "state": "pending"}] for r in range(world)}
    folder = write_dump(tmp_path / "many", many)
    code, out, err = run_doctor(capsys, folder, "--json")
    assert code == 0 and json.loads(out)["verdict"] == "hang"
    png = (folder / "timeline.png").read_bytes()
    width, height = struct.unpack(">II", png[16:24])
    assert width == 1100 and height == 88 + 256 * 24 + 58 and len(png) < 1_000_000  # title, legend; the axis

    empty = write_dump(tmp_path / "empty", {r: [{**header, "world": 2, "groups": {}, "rank": r}] for r in range(2)})
    code, out, err = run_doctor(capsys, empty, "--json")
    assert code == 0 and json.loads(out)["verdict"] == "ok"


def test_pictures_replace_what_is_in_their_way(tmp_path, capsys):
    """trace.json a folder, timeline.png a symlink to a file elsewhere: the diagnosis still comes,
    the link is replaced (never written through) and the failed write is a note."""
    folder = write_dump(tmp_path / "dump", make_dump(world=2))
    (folder / "trace.json").mkdir()
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    (folder / "timeline.png").symlink_to(outside)
    code, out, err = run_doctor(capsys, folder, "--json")
    report = json.loads(out)
    assert code == 0 and err == "" and report["verdict"] == "ok"
    assert any("Could not write trace.json" in note for note in report["notes"])
    assert outside.read_text() == "keep me" and not (folder / "timeline.png").is_symlink()
    assert (folder / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in folder.iterdir()) == ["rank0.jsonl", "rank1.jsonl", "timeline.png", "trace.json"]


def test_over_the_entry_limit_keeps_the_newest(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dump_format, "MAX_ENTRIES_PER_RANK", 10)
    folder = write_dump(tmp_path, make_dump(graph=True))
    code, out, err = run_doctor(capsys, folder, "--json")
    report = json.loads(out)
    assert code == 0 and report["verdict"] == "ok", report
    assert any("only its newest" in note for note in report["notes"])


# --- fuzz ------------------------------------------------------------------------------------
def random_value(rng: random.Random, depth: int = 0):
    kinds = ["none", "bool", "int", "neg", "huge", "float", "nan", "inf", "str", "list", "dict"]
    kind = rng.choice(kinds if depth < 3 else kinds[:-2])
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "dict":
        return {rng.choice(["ep", "graph", "tp[0,1]", "x", ""]): random_value(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    return {"none": None, "bool": rng.random() < 0.5, "int": rng.randint(0, 5), "neg": -rng.randint(1, 10**6),
            "huge": rng.choice([2**63, 10**30, 65536, 10**7]), "float": rng.uniform(-1e13, 1e13),
            "nan": float("nan"), "inf": rng.choice([float("inf"), float("-inf")]),
            "str": rng.choice(["", "ep", "graph", "graph." + GRAPH, "pending", "done", "\u00e9\n\x00", "4"])}[kind]


def substitute(rng: random.Random, obj):
    """Replaces (or deletes) one value somewhere inside `obj`, walking down a random path."""
    holder, key = None, None
    node = obj
    while isinstance(node, (dict, list)) and node and (holder is None or rng.random() < 0.5):
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        holder, node = node, node[key]
    if holder is None:
        return random_value(rng)
    if isinstance(holder, dict) and rng.random() < 0.15:
        del holder[key]
    else:
        holder[key] = random_value(rng)
    return obj


def mutate(rng: random.Random, data: bytes) -> bytes:
    how = rng.choice(["flip", "truncate", "value", "value", "value", "lines"])
    if how == "flip" and data:
        buf = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        return bytes(buf)
    if how == "truncate":
        return data[: rng.randrange(len(data) + 1)]
    lines = data.decode().splitlines()
    if how == "lines":
        i = rng.randrange(len(lines))
        lines.insert(rng.randrange(len(lines) + 1), lines.pop(i) if rng.random() < 0.5 else lines[i])
    else:
        i = 0 if rng.random() < 0.4 else rng.randrange(len(lines))
        lines[i] = json.dumps(substitute(rng, json.loads(lines[i])))
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.timeout(120)
def test_fuzzed_dumps_give_a_verdict_or_one_error_line(tmp_path, capsys):
    rng = random.Random(1234)
    valid = {graph: {r: "".join(json.dumps(x) + "\n" for x in lines).encode()
                     for r, lines in make_dump(graph=graph).items()} for graph in (False, True)}
    folder = tmp_path / "dump"
    folder.mkdir()
    codes: dict[int, int] = defaultdict(int)
    start = time.monotonic()
    for _ in range(300):
        files = dict(valid[rng.random() < 0.5])
        rank = rng.randrange(len(files))
        files[rank] = mutate(rng, files[rank])
        for r, data in files.items():
            (folder / f"rank{r}.jsonl").write_bytes(data)
        code, out, err = run_doctor(capsys, folder, "--json")
        codes[code] += 1
        assert code in (0, 2), (code, out, err)
        assert "Traceback" not in err
        if code == 2:
            assert out == "" and err.startswith("epinfer: error: ") and err.count("\n") == 1, err
        else:
            report = json.loads(out)
            assert isinstance(report, dict) and report["verdict"] in ("ok", "mismatch", "crash", "hang"), out
            assert err == ""
    assert codes[0] > 30 and codes[2] > 30, dict(codes)  # both outcomes are exercised
    assert time.monotonic() - start < 60
