"""Unit tests of the diagnostics (no processes): `doctor` on synthetic ledgers and dumps (graph
replays, hangs inside them, a raising rank, a lost link, a failed dump) and the watchdog's reports."""

from __future__ import annotations

import json

import torch


def test_doctor_crash_without_pending_entries(tmp_path):
    """On NCCL a survivor's collectives all look 'done' (enqueued): the crash is still placed."""
    from epinfer.diagnostics.doctor import analyse

    header = {"kind": "header", "rank": 0, "world": 2, "groups": {"ep": [0, 1]}, "step": 4}
    entries = [{"group": "ep", "seq": i, "op": "all_gather", "label": f"layer.{i}.moe.dispatch", "step": 4,
                "shapes": [[1, 8]], "dtypes": ["uint8"], "sizes": None, "t0": 100.0 + i, "t1": 100.5 + i,
                "state": "done"} for i in range(3)]
    (tmp_path / "rank0.jsonl").write_text("\n".join(json.dumps(x) for x in [header, *entries]) + "\n")
    report = analyse(tmp_path)
    assert report["verdict"] == "crash" and report["missing_ranks"] == [1] and report["culprit_ranks"] == [1]
    assert report["label"] == "layer.2.moe.dispatch" and report["step"] == 4
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"


def test_doctor_says_the_store_went_away_when_the_launcher_is_killed(tmp_path):
    """The launcher SIGKILLed: ranks lost the rendezvous store, one rank's collective broke as its
    peers left. No rank is at fault (the doctor named that one's error, or a hang, before)."""
    from epinfer.diagnostics.doctor import analyse

    reasons = ["lost the rendezvous store (DistNetworkError: Broken pipe)",
               "RuntimeError in dp.sync (dp[1,3] seq 57, step 57): Read error [127.0.0.1]:14223: "
               "Connection reset by peer",
               "lost the rendezvous store (DistNetworkError: Broken pipe)"]
    for rank, reason in enumerate(reasons):
        header = {"kind": "header", "rank": rank, "world": 3, "groups": {"ep": [0, 1, 2]}, "step": 57,
                  "status": "error" if "Runtime" in reason else "fault", "reason": reason}
        entry = {"group": "ep", "seq": 0, "op": "all_gather", "label": "layer.0.moe.dispatch", "step": 57,
                 "shapes": [[1, 8]], "dtypes": ["uint8"], "sizes": None, "t0": 100.0, "t1": None, "state": "pending"}
        (tmp_path / f"rank{rank}.jsonl").write_text(json.dumps(header) + "\n" + json.dumps(entry) + "\n")
    report = analyse(tmp_path)
    assert report["verdict"] == "store-lost" and report["culprit_ranks"] == [], report
    assert "Ranks [0, 2] lost the rendezvous store" in report["summary"] and "No rank is at fault" in report["summary"]
    header = json.loads((tmp_path / "rank1.jsonl").read_text().splitlines()[0])
    header["reason"] = "RuntimeError: CUDA error: an illegal memory access"  # a cause of its own: not the store
    (tmp_path / "rank1.jsonl").write_text(json.dumps(header) + "\n")
    assert analyse(tmp_path)["verdict"] == "error"


def test_graph_replays_are_ledgered_once_and_expand_for_the_doctor(tmp_path):
    """Captured collectives skip the hooks; each replay is one ledger entry that the doctor reads
    back as the collectives it ran, with the same seqs an eager rank gives them."""
    from types import SimpleNamespace

    from epinfer.diagnostics.doctor import analyse
    from epinfer.diagnostics.ledger import Ledger, read_dump
    from epinfer.distributed.communicator import Communicator

    ep = SimpleNamespace(name="ep")
    ledgers = []
    for rank in range(2):
        comm = Communicator()
        ledger = Ledger({"rank": rank, "world": 2, "groups": {"ep": [0, 1]}})
        comm.add_plugin(ledger)
        x = torch.zeros(2, 4)

        def forward(c=comm, t=x):
            for layer in range(2):
                c._run("all_gather", f"layer.{layer}.moe.dispatch", ep, [t], lambda: None)
                c._run("reduce_scatter", f"layer.{layer}.moe.combine", ep, [t], lambda: None)

        comm.step = 0
        forward()  # an eager step
        if rank == 0:  # rank 0 captures and replays twice, rank 1 runs eagerly
            schedule = []
            with comm.recording(schedule):
                forward()
            assert len(schedule) == 4 and len(ledger.entries) == 4
            for step in (1, 2):
                comm.step = step
                ran = [False]
                comm.replayed("decode.b2", schedule, SimpleNamespace(query=lambda r=ran: r[0]))
                # until the device has run it, a replay (stuck in its collectives?) is where this rank is
                assert ledger.position()["current"]["label"] == "graph.decode.b2"
                ran[0] = True
                assert ledger.position()["current"] is None and ledger.entries[-1]["state"] == "done"
        else:
            for step in (1, 2):
                comm.step = step
                forward()
        ledger.dump(tmp_path, "ok")
        ledgers.append(ledger)
    assert len(ledgers[0].entries) == 4 + 2 and ledgers[0].seq["ep"] == ledgers[1].seq["ep"] == 12
    _, expanded = read_dump(tmp_path / "rank0.jsonl")
    _, eager = read_dump(tmp_path / "rank1.jsonl")
    keys = ("group", "seq", "op", "label", "step", "shapes")
    assert [[e[k] for k in keys] for e in expanded] == [[e[k] for k in keys] for e in eager]
    assert analyse(tmp_path)["verdict"] == "ok"


def test_doctor_places_a_hang_inside_a_graph_replay(tmp_path):
    """A replay whose collectives never finish (no host sync came back) is a hang at its first
    collective, named with the graph."""
    from types import SimpleNamespace

    from epinfer.diagnostics.doctor import analyse
    from epinfer.diagnostics.ledger import Ledger
    from epinfer.distributed.communicator import Communicator

    ep = SimpleNamespace(name="ep")
    for rank in range(2):
        comm = Communicator()
        ledger = Ledger({"rank": rank, "world": 2, "groups": {"ep": [0, 1], "graph": [0, 1]}})
        comm.add_plugin(ledger)
        schedule = []
        with comm.recording(schedule):
            for layer in range(2):
                comm._run("all_gather", f"layer.{layer}.moe.dispatch", ep, [torch.zeros(2, 4)], lambda: None)
        comm.step = 3
        comm.replayed("decode.b2", schedule, SimpleNamespace(query=lambda: False))  # the device is stuck in it
        ledger.dump(tmp_path, "fault", "stuck")
    report = analyse(tmp_path)
    assert report["verdict"] == "hang" and report["label"] == "layer.0.moe.dispatch" and report["step"] == 3
    assert "none finished" in report["summary"] and "graph.decode.b2" in report["summary"]


def test_doctor_names_the_rank_that_raised(tmp_path):
    """Rank 0 raised (its dump says so); rank 1 was left waiting in the next collective: the
    verdict is the error on rank 0, not a hang."""
    from types import SimpleNamespace

    from epinfer.diagnostics.doctor import analyse
    from epinfer.diagnostics.ledger import Ledger
    from epinfer.distributed.communicator import Communicator

    ep = SimpleNamespace(name="ep")
    for rank in range(2):
        comm = Communicator()
        ledger = Ledger({"rank": rank, "world": 2, "groups": {"ep": [0, 1]}})
        comm.add_plugin(ledger)
        comm.step = 4
        comm._run("all_gather", "layer.0.moe.dispatch", ep, [torch.zeros(2, 4)], lambda: None)
        if rank == 1:
            ledger.before(SimpleNamespace(group=ep, op="all_gather", label="layer.1.moe.dispatch", step=4,
                                          shapes=[[2, 4]], dtypes=["float32"], sizes=None))
            ledger.dump(tmp_path, "fault", "stopping because rank 0 RuntimeError: ...")
        else:
            ledger.dump(tmp_path, "error", "RuntimeError: probability tensor contains either inf, nan\n or < 0")
    report = analyse(tmp_path)
    assert report["verdict"] == "error" and report["culprit_ranks"] == [0] and report["step"] == 4
    assert report["summary"].startswith("Rank 0 stopped on an error at step 4: RuntimeError: probability tensor")
    assert "waiting in layer.1.moe.dispatch (ep seq 1)" in report["summary"]


def test_watchdog_names_a_replay_against_eager_mismatch():
    """One rank replays a CUDA graph holding ep seqs 4-7 while its peer sits eagerly in ep seq 4:
    each side's watchdog reports a mismatch naming the other, not 'all peers passed' / 'waiting'."""
    from types import SimpleNamespace

    from epinfer.diagnostics.ledger import Ledger
    from epinfer.diagnostics.watchdog import Watchdog, hb_key
    from epinfer.distributed.communicator import Communicator

    class Store(dict):
        def set(self, k, v):
            self[k] = v.encode() if isinstance(v, str) else v

        def get(self, k):
            return self[k]

        def check(self, keys):
            return all(k in self for k in keys)

    store, ep, t = Store(), SimpleNamespace(name="ep"), torch.zeros(2)
    groups = {"ep": [0, 1], "graph": [0, 1]}
    comms, ledgers = [], []
    for _ in range(2):
        comm, ledger = Communicator(), Ledger({"rank": 0, "world": 2, "groups": groups})
        comm.add_plugin(ledger)
        comm.step = 0
        for i in range(4):  # an eager step on both ranks: ep seqs 0-3
            comm._run("all_gather", f"layer.{i}.moe.dispatch", ep, [t], lambda: None)
        comms.append(comm)
        ledgers.append(ledger)
    schedule = []
    with comms[0].recording(schedule):
        for i in range(4):
            comms[0]._run("all_gather", f"layer.{i}.moe.dispatch", ep, [t], lambda: None)
    comms[0].step = comms[1].step = 1
    comms[0].replayed("decode.b2", schedule, SimpleNamespace(query=lambda: False))  # stuck on the device
    ledgers[1].before(SimpleNamespace(group=ep, op="all_gather", label="layer.0.moe.dispatch", step=1,
                                      shapes=[], dtypes=[], sizes=None))  # rank 1: eager, stuck
    dogs = [Watchdog(ledgers[r], store, r, 2, 1.0, "/tmp", groups) for r in range(2)]
    for r in range(2):
        store.set(hb_key(r), json.dumps(ledgers[r].position()))
    said0 = dogs[0]._waiting_for(ledgers[0].position()["current"])
    said1 = dogs[1]._waiting_for(ledgers[1].position()["current"])
    assert said0 == "mismatch: rank 1 in layer.0.moe.dispatch outside any graph", said0
    assert said1 == "mismatch: rank 0 in the CUDA graph replay graph.decode.b2", said1


def test_watchdog_reports_a_stuck_teardown_and_lets_peers_leave():
    """After the run, peers exiting is expected (no 'dead peer' alarm), and a process-group shutdown
    that outlives its limit is reported (it used to hang silently with graph-captured collectives)."""
    from epinfer.diagnostics.ledger import Ledger
    from epinfer.diagnostics.watchdog import Watchdog, hb_key

    store = {hb_key(1): json.dumps({"t": 0.0, "step": 3, "seq": {}, "current": None}).encode()}

    class Store:
        def set(self, k, v):
            store[k] = v

        def get(self, k):
            return store[k]

        def check(self, keys):
            return all(k in store for k in keys)

    dog = Watchdog(Ledger({"rank": 0, "world": 2, "groups": {}}), Store(), 0, 2, 600.0, "/tmp", {})
    fired = []
    dog.fire = lambda message, **_: fired.append(message)
    dog._tick(0.0)
    assert fired and "stopped sending heartbeats" in fired[0]  # a stale peer mid-run is an alarm
    fired.clear()
    dog.tearing_down(60.0)
    dog._tick(0.0)
    assert not fired
    dog.teardown = (0.0, 60.0)  # the limit has passed
    dog._tick(0.0)
    assert fired == ["the process group did not shut down within 60 s after the run finished "
                     "(destroy_process_group stuck; results may be complete)"]


def test_doctor_names_a_lost_link():
    """Every rank in one collective, none finishing: the ranks' own reasons say whom they lost."""
    from epinfer.diagnostics.doctor import lost_link

    headers = {0: {"reason": "stopping because rank 1 ranks [2] stopped sending heartbeats (dead?); ..."},
               1: {"reason": "stuck 20.4 s in layer.3.moe.dispatch (ep seq 9, step 2); waiting for ranks [2, 3]"},
               2: {"reason": "stopped by SIGTERM (torchrun stops every rank of a host once one has failed)"},
               3: {"reason": "the rendezvous store at 10.0.0.1:29500 has not answered for 21 s (its host ...)"}}
    ranks, text = lost_link(headers)
    assert ranks == [2, 3]
    for r, h in headers.items():  # torchrun: ranks 0, 1 on node 0, 2, 3 on node 1; rank 2 named by no one
        h["node"] = r // 2
        h["reason"] = h["reason"].replace("[2, 3]", "[3]").replace("[2]", "[3]")
    assert lost_link(headers)[0] == [2, 3] and "node ranks) [1] hold ranks [2, 3]" in lost_link(headers)[1]
    assert "ranks [0, 1] stopped hearing ranks [2, 3]" in text and "ranks [3] lost the rendezvous store" in text
    assert lost_link({0: {"reason": None}, 1: {"reason": "stuck 20 s in x; mismatch: rank 0 in y"}}) is None
    from epinfer.diagnostics.doctor import CONNECTION_LOST

    assert CONNECTION_LOST.search("RuntimeError in layer.1.moe.dispatch: Connection closed by peer [10.0.0.2]:5")


def test_a_rank_whose_dump_fails_still_prints_its_line(tmp_path):
    """`Watchdog.fire`: the one line is printed (naming the dump that failed) and the rank exits 3
    even when its dump cannot be written."""
    import subprocess
    import sys
    import textwrap

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the dump folder should be")
    code = textwrap.dedent(f"""
        from epinfer.diagnostics.ledger import Ledger
        from epinfer.diagnostics.watchdog import Watchdog
        class Store:
            def compare_set(self, *a): pass
        dog = Watchdog(Ledger({{"rank": 1, "world": 2, "groups": {{}}}}), Store(), 1, 2, 600.0, {str(blocked)!r}, {{}})
        dog.fire("CollectiveMismatch: test")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("epinfer: rank 1: CollectiveMismatch: test; its dump could "
                                                   f"not be written to {blocked} (FileExistsError"), proc.stderr


def test_failure_line_sends_to_doctor_only_where_a_rank_dumped(tmp_path):
    from epinfer.runtime.launch import failure_line

    line = failure_line((1, -9), [], str(tmp_path / "none"), [])
    assert line == "parallel run failed: rank 1 was killed by SIGKILL; no rank wrote a dump", line
    (tmp_path / "rank1.stderr.txt").write_text("oops\n")
    (tmp_path / "rankings.jsonl").write_text("{}\n")  # the user's, not a ledger
    line = failure_line((1, -9), [], str(tmp_path), ["rank1.stderr.txt"])
    assert line.endswith("no rank wrote a dump (the ranks' own output in " + str(tmp_path) + ": rank1.stderr.txt)")
    (tmp_path / "rank0.jsonl").write_text("{}\n")
    line = failure_line((1, -9), [], str(tmp_path), [])
    assert line.endswith(f"dumps in {tmp_path}: run `epinfer doctor {tmp_path}`"), line
