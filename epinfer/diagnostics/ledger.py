"""The collective ledger: always on, one entry per collective, per rank.

A communicator plugin. Each group has its own sequence number; an entry records op, label, step id,
shapes, dtypes, per-rank sizes, enqueue and completion times and state (`pending` until the call
returns). A CUDA graph replay is one entry of group `graph` whose `covers` gives, per group, the
first seq of the collectives it ran; the graph's schedule is in the header (`graphs`), and
`expand_replays` turns the entry back into one entry per collective. Kept in a ring buffer
(default 200,000 entries, a whole short run) and written as JSON lines: a header line describing
the rank, then the entries. Cheap by design: a dict per call.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import time
from pathlib import Path

from epinfer.diagnostics.dump_format import expand, read_rank_file


class Ledger:
    def __init__(self, info: dict, capacity: int = 200_000) -> None:
        self.info = info  # rank, world, dp, tp, dp_rank, tp_rank, groups {name: ranks}
        self.entries: collections.deque = collections.deque(maxlen=capacity)
        self.seq: dict[str, int] = collections.defaultdict(int)
        self.current: dict | None = None  # the collective this rank is inside, if any
        self.replay_done = None  # the event that says the current graph replay has run
        self.step = -1

    # --- communicator plugin -----------------------------------------------------------------
    def before(self, call) -> None:
        self.close_replay()
        name = call.group.name
        entry = {"group": name, "seq": self.seq[name], "op": call.op, "label": call.label,
                 "step": call.step, "shapes": call.shapes, "dtypes": call.dtypes, "sizes": call.sizes,
                 "t0": time.time(), "t1": None, "state": "pending"}
        if getattr(call, "path", "nccl") != "nccl":
            entry["path"] = call.path  # (EPINFER_SYMM_MEM: the group's symmetric buffer)
        self.seq[name] += 1
        self.entries.append(entry)
        self.current = entry
        self.step = call.step
        call.entry = entry

    def at_step(self, step: int) -> None:
        """The lockstep loop runs step `step`: the position moves on where no collective says so (a
        run of one rank has none), so the watchdog's step limit counts from each step's start."""
        self.step = step

    def after(self, call) -> None:
        entry = call.entry
        entry["t1"] = time.time()
        entry["state"] = "done"
        self.current = None

    def replayed(self, name: str, schedule: list, step: int, done) -> None:
        self.close_replay()
        graphs = self.info.setdefault("graphs", {})
        if name not in graphs:
            graphs[name] = [[c.group.name, c.op, c.label, c.shapes, c.dtypes, c.sizes] for c in schedule]
        covers = {}
        for c in schedule:
            covers.setdefault(c.group.name, self.seq[c.group.name])
            self.seq[c.group.name] += 1
        entry = {"group": "graph", "seq": self.seq["graph"], "op": "graph", "label": f"graph.{name}",
                 "step": step, "shapes": [], "dtypes": [], "sizes": None, "covers": covers,
                 "t0": time.time(), "t1": None, "state": "pending"}
        self.entries.append(entry)
        self.seq["graph"] += 1
        self.step = step
        # pending until the device has run it (`done`, polled by `position`) or the host moved on
        # to the next collective: a replay stuck in its collectives shows as this rank's current entry
        self.current = entry
        self.replay_done = done

    def close_replay(self) -> None:
        """Close the current replay entry, if any."""
        cur = self.current
        if cur is not None and cur["op"] == "graph":
            cur["t1"] = time.time()
            cur["state"] = "done"
            self.current = None

    # --- positions and dumps ---------------------------------------------------------------
    def position(self) -> dict:
        """What peers need to know about this rank: step, next seq per group, current call."""
        cur = self.current
        if cur is not None and cur["op"] == "graph" and self.replay_done.query():
            self.close_replay()
            cur = None
        return {"t": time.time(), "step": self.step, "seq": dict(self.seq),
                "current": None if cur is None else {k: cur[k] for k in ("group", "seq", "label", "t0", "covers")
                                                     if k in cur}}

    def dump(self, folder: str | Path, status: str, reason: str | None = None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"rank{self.info['rank']}.jsonl"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        header = {"kind": "header", **self.info, "status": status, "reason": reason, "step": self.step,
                  "time": time.time(), "pid": os.getpid(), "entries": len(self.entries)}
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps(header) + "\n")
                for entry in list(self.entries):
                    f.write(json.dumps(entry) + "\n")
            os.replace(tmp, path)
        except BaseException:  # (a full disk): no half-written file left behind
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path


def read_dump(path: str | Path) -> tuple[dict, list[dict]]:
    """One rank's dump: its header and its collectives, graph replays expanded. Every field is
    checked (see `dump_format`): a malformed file raises UserError naming the file, line and field;
    a cut-off last line (a rank killed while writing) is left out."""
    dump = read_rank_file(path)
    return dump.header, dump.entries


def expand_replays(header: dict, entries: list[dict]) -> list[dict]:
    """Each graph-replay entry becomes the entries of the collectives it ran, as if eager."""
    return expand(header, entries)[0]
