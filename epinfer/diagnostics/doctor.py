"""`epinfer doctor DIR`: reads every rank's ledger dump and says where the run went wrong.

Verdicts, the first that applies: `mismatch` (ranks disagree in op, label, shape or sizes at the
same group and seq) > `crash` (a rank died: its dump is missing; survivors' errors are its
consequence) > `error` (a rank stopped on an exception: its header's status is `error` and its
reason names the exception; not a lost socket when other ranks say whom they lost) > `hang`
(some ranks never arrived at a collective the others entered; when all did, the peers the ranks'
reasons say they lost, e.g. across a cut link between hosts) > `ok`. Culprits of a mismatch are
the ranks whose entry differs from the majority (the schedule the step's DP decision implies; every
other rank followed it). Stragglers: per rank, the largest lag at
one collective behind the median of the others, listed above 0.5 s. Also writes `trace.json` (Chrome
/ Perfetto, a track per rank) and `timeline.png` (swimlanes of the last seconds) into DIR.

The folder is read through `dump_format`: a malformed dump is one UserError line naming the file
and the fault; a rank file whose last line is cut off (the rank was killed while writing) is used
without that line and listed in `truncated_ranks` and the notes.
"""

from __future__ import annotations

import bisect
import json
import re
from collections import defaultdict
from pathlib import Path

from epinfer.diagnostics.dump_format import DumpFolder, load_folder
from epinfer.diagnostics.timeline import write_timeline, write_trace

STRAGGLER_S = 0.5


def load(folder: Path) -> dict[int, tuple[dict, list[dict]]]:
    """rank -> (header, entries) of every rank file in `folder`, checked (raises UserError)."""
    return load_folder(folder).dumps


def notes_of(loaded: DumpFolder) -> list[str]:
    notes = []
    for rank, dump in sorted(loaded.files.items()):
        if dump.cut_line is not None:
            notes.append(f"Rank {rank} stopped while writing its dump: line {dump.cut_line} of {dump.name} "
                         f"is cut off, the rest of the file was used.")
        if dump.left_out:
            notes.append(f"Rank {rank}: only its newest {len(dump.entries)} collectives were read "
                         f"({dump.left_out} older ones are over the doctor's limit).")
    return notes


def _key(e: dict) -> tuple:
    shapes = [s[1:] for s in e["shapes"]] if e["op"] == "all_to_all" else e["shapes"]
    sizes = None if e["op"] == "all_to_all" else e["sizes"]
    return (e["op"], e["label"], tuple(map(tuple, shapes)), tuple(e["dtypes"]),
            None if sizes is None else tuple(sizes))


def analyse(folder: Path) -> dict:
    loaded = load_folder(folder)
    dumps = loaded.dumps
    headers = {r: h for r, (h, _) in dumps.items()}
    world = max(h["world"] for h in headers.values())
    missing = [r for r in range(world) if r not in dumps]
    link = lost_link(headers)  # the peers the ranks' own reasons say they lost, if any
    members: dict[str, list[int]] = {}
    for h in headers.values():
        members.update(h["groups"])
    members["world"] = list(range(world))
    by_group: dict[str, dict[int, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r, (_, entries) in dumps.items():
        for e in entries:
            by_group[e["group"]][e["seq"]][r] = e
    result = {"verdict": "ok", "group": None, "seq": None, "label": None, "step": None,
              "steps_by_rank": {str(r): h["step"] for r, h in sorted(headers.items())},
              "culprit_ranks": [], "missing_ranks": missing, "stragglers": stragglers(by_group),
              "truncated_ranks": [r for r, d in sorted(loaded.files.items()) if d.cut_line is not None],
              "notes": notes_of(loaded)}
    found = first_mismatch(by_group)
    if found:
        group, seq, entries = found
        keys = {r: _key(e) for r, e in entries.items()}
        counts = defaultdict(list)
        for r, k in keys.items():
            counts[k].append(r)
        majority = max(counts.values(), key=len)
        if sum(len(v) == len(majority) for v in counts.values()) > 1:  # a tie: use the schedule
            expected = expected_label(by_group[group], seq, entries)
            on_schedule = [r for r, e in entries.items() if e["label"] == expected]
            if expected is not None and 0 < len(on_schedule) < len(entries):
                majority = on_schedule
        ref = entries[majority[0]]
        culprits = sorted(r for r in entries if r not in majority)
        result.update(verdict="mismatch", group=group, seq=seq, label=ref["label"], step=ref["step"],
                      culprit_ranks=culprits)
        odd = "; ".join(f"rank {r}: {entries[r]['op']} {entries[r]['label']} {entries[r]['shapes']}"
                        for r in culprits)
        result["summary"] = (f"Collective mismatch in group {group} at seq {seq} (step {ref['step']}): "
                             f"ranks {majority} issued {ref['op']} {ref['label']} {ref['shapes']}, but {odd}. "
                             f"Ranks {culprits} broke the schedule the step's DP decision implies.")
    elif not missing and (lost := store_lost(headers)):
        result.update(verdict="store-lost", culprit_ranks=[])
        others = " (the other ranks' collectives broke as their peers left)" if len(lost) < len(headers) else ""
        result["summary"] = (f"Ranks {lost} lost the rendezvous store{others}: the process holding it (the "
                             "launcher, `epinfer serve`, or torchrun's agent) went away or became unreachable, "
                             "killed or crashed. No rank is at fault.")
    elif missing:
        group, seq, entry = first_pending(by_group, prefer="ep", involving=missing, members=members)
        result.update(verdict="crash", culprit_ranks=missing, group=group, seq=seq,
                      label=entry and entry["label"], step=entry and entry["step"])
        where = f"{entry['label']} ({group} seq {seq}, step {entry['step']})" if entry else "no collective"
        result["summary"] = (f"Ranks {missing} died (no dump). The survivors were waiting for them in "
                             f"{where}; that is the last step the dead ranks reached.")
    elif errored := sorted(r for r, h in headers.items() if h.get("status") == "error"
                           and not (link and CONNECTION_LOST.search(str(h.get("reason"))))):
        # a rank raised (a kernel error, a bug) while all lived: the others then wait for it, which
        # alone reads as a hang
        group, seq, entry = first_pending(by_group, members=members)
        first = errored[0]
        reason = " ".join(str(headers[first].get("reason") or "an exception").split())[:300]
        result.update(verdict="error", culprit_ranks=errored, group=group, seq=seq,
                      label=entry and entry["label"], step=headers[first]["step"])
        waiting = f" The other ranks were waiting in {entry['label']} ({group} seq {seq})." if entry else ""
        step = headers[first]["step"]
        when = f" at step {step}" if isinstance(step, int) and step >= 0 else ""  # (-1: no step recorded)
        result["summary"] = f"Rank {first} stopped on an error{when}: {reason}.{waiting}"
    else:
        group, seq, entry = first_pending(by_group, members=members)
        if entry is not None:
            present = set(by_group[group][seq])
            absent = [r for r in members.get(group, []) if r not in present]
            result.update(verdict="hang", group=group, seq=seq, label=entry["label"], step=entry["step"],
                          missing_ranks=sorted(set(missing) | set(absent)), culprit_ranks=absent)
            where = f"{entry['label']} ({group} seq {seq}, step {entry['step']})"
            if entry.get("graph"):
                where += f" inside the CUDA graph replay {entry['graph']}"
            result["summary"] = (f"Hang: ranks {sorted(present)} entered {where} but ranks {absent} never arrived."
                                 if absent else f"Hang: every rank entered {where} and none finished it.")
            if not absent and link:
                result["culprit_ranks"], result["summary"] = link[0], result["summary"] + " " + link[1]
    if result["verdict"] == "ok":
        result["summary"] = (f"All {world} ranks issued the same {sum(len(s) for s in by_group.values())} "
                             f"collectives in the same order; no fault found.")
    if result["stragglers"]:
        worst = max(result["stragglers"], key=lambda s: s["late_s"])
        result["summary"] += (f" Slowest arrival: rank {worst['rank']} was {worst['late_s']:.1f} s late at "
                              f"{worst['label']}.")
    result["summary"] += f" Steps reached per rank: {result['steps_by_rank']}."
    writers = {"trace.json": lambda p: write_trace(dumps, p),
               "timeline.png": lambda p: write_timeline(dumps, p, mark=result["seq"], group=result["group"],
                                                        mark_label=result["label"])}
    for name, write in writers.items():
        try:
            write(folder / name)
        except OSError as exc:  # a read-only folder: the diagnosis itself still stands
            result["notes"].append(f"Could not write {name} ({exc.strerror or exc}).")
    for note in result["notes"]:
        result["summary"] += " " + note
    return result


# a collective's error that only says a peer's socket went away: when other ranks say whom they lost
# (`lost_link`), the consequence of that loss, not the cause
CONNECTION_LOST = re.compile(r"Connection (closed|reset) by peer|Read error|Broken pipe")
STORE_LOST = "lost the rendezvous store"  # (the watchdog's words when its store connection breaks)


def lost_link(headers: dict[int, dict]) -> tuple[list[int], str] | None:
    """When every rank entered one collective and none finished it: the peers the ranks' own reasons
    say they lost (heartbeats stopped, a collective left waiting for them, the rendezvous store
    unanswered); a cut link between hosts reads so."""
    unheard: set[int] = set()
    hearing: list[int] = []
    cut_off: list[int] = []
    for rank, header in sorted(headers.items()):
        reason = str(header.get("reason") or "")
        if m := re.search(r"ranks \[([\d, ]+)\] stopped sending heartbeats|waiting for ranks \[([\d, ]+)\]", reason):
            unheard.update(int(x) for x in (m.group(1) or m.group(2)).split(","))
            hearing.append(rank)
        elif "rendezvous store" in reason and "has not answered" in reason:
            cut_off.append(rank)
    if not unheard and not cut_off:
        return None
    parts = [f"ranks {hearing} stopped hearing ranks {sorted(unheard)}"] if unheard else []
    if cut_off:
        parts.append(f"ranks {cut_off} lost the rendezvous store")
    lost = unheard | set(cut_off)
    node = {r: h.get("node") for r, h in headers.items()}
    far = {node[r] for r in lost if node.get(r) is not None}
    if far and len(set(node.values())) > 1:  # under torchrun: every rank of the hosts cut off
        lost |= {r for r, n in node.items() if n in far}
        parts.append(f"hosts (torchrun node ranks) {sorted(far)} hold ranks {sorted(lost)}")
    return sorted(lost), f"The link between them was lost: {'; '.join(parts)}."


def store_lost(headers: dict[int, dict]) -> list[int]:
    """The ranks whose watchdog lost the rendezvous store, where every other rank's reason is only a
    peer's socket gone (the store's process died: each rank either saw that or its peers leave);
    empty otherwise."""
    lost = [r for r, h in sorted(headers.items()) if str(h.get("reason") or "").startswith(STORE_LOST)]
    others = [h for r, h in headers.items() if r not in lost]
    return lost if lost and all(CONNECTION_LOST.search(str(h.get("reason") or "")) for h in others) else []


def first_mismatch(by_group) -> tuple[str, int, dict] | None:
    best = None
    for group, seqs in by_group.items():
        for seq in sorted(seqs):
            entries = seqs[seq]
            if len({_key(e) for e in entries.values()}) > 1:
                t = min(e["t0"] for e in entries.values())
                if best is None or t < best[0]:
                    best = (t, group, seq, entries)
                break
    return None if best is None else best[1:]


def expected_label(seqs: dict[int, dict[int, dict]], seq: int, entries: dict[int, dict]) -> str | None:
    """The label the fixed per-forward schedule puts at `seq`: every forward issues the same
    collectives in a group, so it is the label at the same offset in the previous step."""
    step = min(e["step"] for e in entries.values())
    if step <= 0:
        return None
    first_of = {}
    for s in sorted(seqs):
        for e in seqs[s].values():
            first_of.setdefault(e["step"], s)
    if step not in first_of or step - 1 not in first_of:
        return None
    prev_seq = first_of[step - 1] + (seq - first_of[step])
    prev = seqs.get(prev_seq, {})
    labels = {e["label"] for e in prev.values() if e["step"] == step - 1}
    return labels.pop() if len(labels) == 1 else None


def first_pending(by_group, prefer: str | None = None, involving=(), members=None):
    """The earliest collective some rank entered and never completed (preferring group `prefer`)."""
    candidates = []
    involving = set(involving)
    for group, seqs in by_group.items():
        if involving and not any(m in involving for m in members.get(group, [])):
            continue
        for seq in sorted(seqs):
            pending = [e for e in seqs[seq].values() if e["state"] == "pending"]
            if pending:
                candidates.append((group != prefer, min(e["t0"] for e in pending), group, seq, pending[0]))
                break
    if not candidates and involving:
        # NCCL collectives return when enqueued, so a survivor may show nothing pending: take its
        # last collective shared with the dead ranks (the furthest point they were seen together)
        for group, seqs in by_group.items():
            if seqs and any(m in involving for m in members.get(group, [])):
                seq = max(seqs)
                entry = next(iter(seqs[seq].values()))
                candidates.append((group != prefer, -entry["t0"], group, seq, entry))
    if not candidates:
        return None, None, None
    _, _, group, seq, entry = min(candidates)
    return group, seq, entry


def stragglers(by_group) -> list[dict]:
    worst: dict[int, tuple[float, str]] = {}
    for seqs in by_group.values():
        for entries in seqs.values():
            # start-up collectives (step -1) wait for model loading on other ranks: not stragglers
            if len(entries) < 2 or next(iter(entries.values()))["step"] < 0:
                continue
            times = sorted(e["t0"] for e in entries.values())
            for r, e in entries.items():
                lag = e["t0"] - median_without(times, e["t0"])
                if lag > worst.get(r, (0.0, ""))[0]:
                    worst[r] = (lag, e["label"])
    return [{"rank": r, "label": label, "late_s": round(lag, 3)}
            for r, (lag, label) in sorted(worst.items()) if lag > STRAGGLER_S]


def median_without(times: list, t) -> float:
    """statistics.median of sorted `times` less one value equal to `t`, in O(log n): the
    median of the others at each collective, without building each rank's list of others."""
    skip = bisect.bisect_left(times, t)
    n = len(times) - 1

    def other(i: int):
        return times[i] if i < skip else times[i + 1]

    if n % 2 == 1:
        return other(n // 2)
    return (other(n // 2 - 1) + other(n // 2)) / 2


def main(folder: str, as_json: bool) -> int:
    """Prints the diagnosis of `folder`; a malformed dump raises UserError (one line, exit 2)."""
    path = Path(folder)
    result = analyse(path)
    if as_json:
        print(json.dumps(result))
    else:
        print(f"verdict: {result['verdict']}")
        print(result["summary"])
        print(f"trace: {path / 'trace.json'}   timeline: {path / 'timeline.png'}")
    return 0
