"""Pure unit tests (no processes): the DP decision, packing, expert partitioning, scheduler."""

from __future__ import annotations

import json

import torch

from epinfer.distributed.communicator import pack_rows, unpack_rows
from epinfer.distributed.dp_sync import decide
from epinfer.distributed.parallel import split_evenly
from epinfer.engine.cache import CacheAllocator, CacheLayout
from epinfer.engine.sampling_params import SamplingParams
from epinfer.engine.scheduler import Scheduler, Sequence


def test_decision_uniform_and_variable():
    d = decide([5, 0], [1, 1], 3, tp=2, padding="uniform")
    assert d.run and not d.done and d.rows == (6, 6) and d.step_id == 3
    assert d.moe_sizes(2, sequence_parallel=True) == [3, 3, 3, 3]
    d = decide([5, 0], [1, 0], 0, tp=2, padding="none")
    assert d.rows == (6, 2)  # the idle replica still runs a dummy batch (>= 1 row, a multiple of TP)
    assert d.moe_sizes(2, True) == [3, 3, 1, 1] and d.moe_sizes(2, False) == [6, 6, 2, 2]
    assert decide([0, 0], [0, 0], 7, 1, "uniform").done
    skip = decide([0, 0], [1, 0], 7, 1, "uniform")
    assert not skip.run and not skip.done


def test_pack_roundtrip_mixed_dtypes_and_empty():
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    w = torch.rand(4, 2)
    ids = torch.randint(0, 100, (4, 2), dtype=torch.int32)
    packed, meta = pack_rows([x, w, ids])
    assert packed.dtype == torch.uint8 and packed.shape == (4, 12 + 8 + 8)
    a, b, c = unpack_rows(packed, meta)
    assert torch.equal(a, x) and torch.equal(b, w) and torch.equal(c, ids)
    empty, meta = pack_rows([x[:0], w[:0]])
    assert empty.shape == (0, 20) and unpack_rows(empty, meta)[1].shape == (0, 2)


def test_uneven_expert_split():
    parts = [split_evenly(6, 4, r) for r in range(4)]
    assert parts == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert [split_evenly(3, 4, r) for r in range(4)][-1] == (3, 3)  # a rank may own no expert


def test_scheduler_chunks_long_prompts_and_mixes_decode():
    alloc = CacheAllocator(CacheLayout(block_size=4, num_blocks=64, num_state_slots=4))
    sched = Scheduler(alloc, max_num_seqs=4, max_num_batched_tokens=8)
    params = SamplingParams(max_tokens=2).resolved({})
    short = Sequence(0, [1, 2, 3], params, 5)
    long = Sequence(1, list(range(20)), params, 22)
    sched.add(short)
    sched.add(long)
    plan = sched.schedule()
    assert [(p.seq.index, p.num_new) for p in plan] == [(0, 3), (1, 5)]
    assert plan[0].samples and not plan[1].samples
    for p in plan:
        p.seq.num_computed += p.num_new
    short.output_ids.append(7)
    plan = sched.schedule()  # decode of the short one first, then the next prefill chunk
    assert [(p.seq.index, p.num_new) for p in plan] == [(0, 1), (1, 7)]


def test_admission_waits_for_cache_room():
    alloc = CacheAllocator(CacheLayout(block_size=4, num_blocks=3, num_state_slots=4))
    sched = Scheduler(alloc, max_num_seqs=4, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=2).resolved({})
    a, b = Sequence(0, [1] * 6, params, 8), Sequence(1, [2] * 6, params, 8)
    sched.add(a)
    sched.add(b)
    assert [p.seq.index for p in sched.schedule()] == [0]  # b needs 2 more blocks, 1 is free
    sched.finish(a)
    assert [p.seq.index for p in sched.schedule()] == [1]


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
