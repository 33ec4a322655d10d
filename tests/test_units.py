"""Pure unit tests (no processes): the DP decision, packing, expert partitioning, scheduler."""

from __future__ import annotations

import os

import torch

from epinfer.core.sampling_params import SamplingParams
from epinfer.distributed.communicator import pack_rows, row_views
from epinfer.distributed.dp_sync import decide
from epinfer.distributed.parallel import split_evenly
from epinfer.engine.cache import CacheAllocator
from epinfer.engine.scheduler import Scheduler, Sequence
from epinfer.runner.cache import CacheLayout


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
    packed, fields = pack_rows([x, w, ids])
    assert packed.dtype == torch.uint8 and packed.shape == (4, 32)  # 12 + 8 + 8 bytes, rows to 16
    a, b, c = row_views(packed, fields)
    assert torch.equal(a, x) and torch.equal(b, w) and torch.equal(c, ids)
    empty, fields = pack_rows([x[:0], w[:0]])
    assert empty.shape == (0, 32) and row_views(empty, fields)[1].shape == (0, 2)


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


def test_decision_pads_decode_steps_to_a_shared_graph_bucket():
    buckets = [2, 4, 8, 16]
    d = decide([3, 1], [1, 1], 5, tp=2, padding="uniform", decode_only=[1, 1], buckets=buckets)
    assert d.graph and d.rows == (4, 4) and d.moe_sizes(2, True) == [2, 2, 2, 2]
    idle = decide([3, 0], [1, 1], 5, tp=2, padding="uniform", decode_only=[1, 1], buckets=buckets)
    assert idle.graph and idle.rows == (4, 4)  # the idle replica's dummy batch replays too
    for case in (dict(decode_only=[1, 0], buckets=buckets),  # a replica prefills: everybody eager
                 dict(decode_only=[1, 1], buckets=None),  # some rank has no graphs
                 dict(decode_only=[1, 1], buckets=[2, 4])):  # wider than the largest graph
        d = decide([5, 1], [1, 1], 5, 2, "uniform", **case)
        assert not d.graph and d.rows == (6, 6)
    d = decide([5, 1], [1, 1], 5, 1, "none", [1, 1], buckets)
    assert not d.graph and d.rows == (5, 1)  # unequal rows per replica: no shared graph
    assert decide([5], [1], 5, 1, "none", [1], buckets).rows == (8,)  # one replica: padding is moot


def test_stacked_linears_share_memory_and_match():
    """q/k/v (or gate/up) as one GEMM: the Linears' weights become views of the stacked tensor and
    the outputs match the separate GEMMs; float32 is never stacked (reference arithmetic)."""
    from epinfer.layers.linear import Linear, stack_linears

    torch.manual_seed(0)
    with torch.device("cpu"):
        lins = [Linear(32, n, bias=b).to(torch.bfloat16) for n, b in ((48, True), (16, False), (16, True))]
    for lin in lins:
        torch.nn.init.normal_(lin.weight)
        if lin.bias is not None:
            torch.nn.init.normal_(lin.bias)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    separate = [lin(x) for lin in lins]
    stacked = stack_linears(lins)
    assert stacked is not None
    for lin, ref, out in zip(lins, separate, stacked(x), strict=True):
        assert lin.weight.untyped_storage().data_ptr() == stacked.weight.untyped_storage().data_ptr()
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(lin(x), ref, rtol=0, atol=0)
    assert stack_linears([Linear(8, 8), Linear(8, 8)]) is None  # float32
    # 24 + 1 rows: padded with zeros to 32 (cuBLAS alignment), the outputs are the two projections alone
    with torch.device("cpu"):
        odd = [Linear(32, n, bias=True).to(torch.bfloat16) for n in (24, 1)]
    for lin in odd:
        torch.nn.init.normal_(lin.weight)
        torch.nn.init.normal_(lin.bias)
    separate = [lin(x) for lin in odd]
    stacked = stack_linears(odd)
    assert stacked.weight.shape == (32, 32) and not stacked.weight[25:].any() and not stacked.bias[25:].any()
    outs = stacked(x)
    assert [tuple(o.shape) for o in outs] == [(5, 24), (5, 1)]
    for ref, out in zip(separate, outs, strict=True):
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_batched_sampling_filters_like_one_row_at_a_time():
    """Unseeded sampling rows are filtered together: per row the same probabilities as the
    one-row reference (temperature, top-k with ties kept, top-p), draws inside the kept set, and
    top_k=1 rows equal greedy; seeded rows keep drawing from their own generator."""
    import torch.nn.functional as F

    from epinfer.runner.sampler import _filtered_probs, sample_tokens

    def reference(logits_V, p):
        logits = logits_V.float() / p.temperature
        if p.min_p:  # (vLLM: after the temperature, before top-k / top-p)
            probs = torch.softmax(logits, -1)
            logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        if 0 < p.top_k < logits.shape[-1]:
            logits = logits.masked_fill(logits < torch.topk(logits, p.top_k).values[-1], float("-inf"))
        if p.top_p < 1.0:
            s, order = torch.sort(logits, descending=True)
            drop = (torch.softmax(s, -1).cumsum(-1) - torch.softmax(s, -1)) >= p.top_p
            logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        return F.softmax(logits, -1)

    torch.manual_seed(0)
    logits = torch.randn(8, 50) * 3
    logits[2, :4] = 9.0  # a tie at the k-th value
    params = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.0, top_p=0.8),
              SamplingParams(temperature=1.3, top_k=3), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.5, top_k=10, top_p=0.6), SamplingParams(temperature=1.0, top_k=1),
              SamplingParams(temperature=1.5, min_p=0.002), SamplingParams(temperature=0.8, min_p=0.2, top_p=0.9)]
    params = [p.resolved({}) for p in params]  # as the engine hands them over
    probs = _filtered_probs(logits, params)
    for i, p in enumerate(params):
        torch.testing.assert_close(probs[i], reference(logits[i], p), rtol=1e-6, atol=1e-7)
    assert (probs[2] > 0).sum() == 4  # ties at the k-th value stay
    assert 1 < (probs[6] > 0).sum() < (probs[3] > 0).sum()  # min-p dropped some, not all
    for batched in (True, False) * 10:
        tokens = sample_tokens(logits, params, [None] * 8, batched)
        assert (probs.gather(1, tokens[:, None]) > 0).all()
        assert tokens[5] == logits[5].argmax()
    gens = [torch.Generator().manual_seed(5) for _ in range(2)]
    a = sample_tokens(logits[:2], params[:2], [gens[0], None], True)[0]
    b = sample_tokens(logits[:1], params[:1], [gens[1]])[0]
    assert a == b  # a seeded row does not depend on the rest of the batch


def test_gdn_and_shared_expert_projections_stacked_in_low_precision(tmp_path, monkeypatch):
    """bf16: the four GDN input projections run as one GEMM, and so do the shared expert's gate / up
    with its gate column (views of one weight tensor each). A generate (prefill, then decode steps on
    the batched decode path) gives the first GDN layer and MoE block the outputs the separate
    projections give; float32 keeps them separate."""
    from epinfer.engine.engine import Engine, EngineConfig
    from epinfer.layers.gdn import GatedDeltaNet
    from epinfer.layers.linear import GatedMLP
    from epinfer.layers.moe import MoEBlock
    from tests.checkpoints import tiny_config

    (tmp_path / "config.json").write_text(tiny_config("qwen3_5_moe").to_json_string())

    def outputs(dtype: str, stacked: bool) -> list[torch.Tensor]:
        engine = Engine(EngineConfig(model=str(tmp_path), dtype=dtype, device="cpu", random_weights=True))
        modules = engine.runner.model.modules
        gdn = next(m for m in modules() if isinstance(m, GatedDeltaNet))
        moe = next(m for m in modules() if isinstance(m, MoEBlock) and m.shared_expert is not None)
        assert (gdn.in_proj is not None) == stacked and (moe.shared_expert.gate_up is not None) == stacked
        if stacked:
            for stack, part in ((gdn.in_proj, gdn.in_proj_a), (moe.shared_expert.gate_up, moe.shared_expert_gate)):
                assert part.weight.untyped_storage().data_ptr() == stack.weight.untyped_storage().data_ptr()
        outs: list[torch.Tensor] = []
        for m in (gdn, moe):
            m.register_forward_hook(lambda mod, args, out: outs.append(out.float()))
        engine.add_request(list(range(1, 9)), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        while engine.has_work():
            engine.step()
        return outs

    outputs("float32", stacked=False)
    together = outputs("bfloat16", stacked=True)
    monkeypatch.setattr(GatedDeltaNet, "stack", lambda self: None)
    monkeypatch.setattr(GatedMLP, "stack", lambda self: None)
    apart = outputs("bfloat16", stacked=False)
    assert len(together) == len(apart) == 8  # each module: the prefill, then 3 decode steps
    for a, b in zip(together, apart, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_varlen_chunk_index():
    """The varlen GDN kernel's per-step index: row offsets and (sequence, chunk) pairs of 64 rows."""
    from epinfer.kernels.gdn_prefill import varlen_index

    idx = varlen_index([1, 64, 65, 130], torch.device("cpu"))
    assert idx["cu_seqlens"].tolist() == idx["cu_seqlens_cpu"].tolist() == [0, 1, 65, 130, 260]
    assert idx["chunk_indices"].tolist() == [[0, 0], [1, 0], [2, 0], [2, 1], [3, 0], [3, 1], [3, 2]]


def test_graph_pieces_capture_without_autograd():
    """The pieces are captured in inference mode, and the model's parameters need no gradient: a
    capture that recorded autograd graphs kept every saved intermediate of every piece alive
    (12.5 GiB at the Qwen3.5 shape on an H200)."""
    from epinfer.core.config import DEMO_MODEL, EngineConfig
    from epinfer.engine.engine import Engine
    from epinfer.runner.piecewise import PiecewiseGraphs

    engine = Engine(EngineConfig(model=str(DEMO_MODEL), dtype="float32", device="cpu", piecewise_graphs=True,
                                 max_num_batched_tokens=64))
    pieces = engine.runner.pieces
    assert pieces is not None
    assert not any(p.requires_grad for p in engine.runner.model.parameters())
    seen = []
    original = PiecewiseGraphs._pieces
    try:
        PiecewiseGraphs._pieces = lambda self, size: seen.append(torch.is_inference_mode_enabled())
        pieces.capture_all()
    finally:
        PiecewiseGraphs._pieces = original
    assert seen and all(seen)


def test_open_file_limit_raised_to_the_hard_one():
    """A server holds a socket per client: its soft open-file limit goes up to the hard one."""
    import subprocess
    import sys

    code = ("import resource\nfrom epinfer.core.env import raise_open_file_limit\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
            "raise_open_file_limit()\nprint(resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard) or hard == -1)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "True", proc.stderr


def test_queued_stream_updates_merge_into_one_event():
    """A stream whose HTTP side fell behind sends the queued token updates as one event (same
    tokens, logprobs and finish); an error behind them is kept for the next event, not merged."""
    import asyncio

    from epinfer.server.client import Update, merged

    async def run():
        q = asyncio.Queue()
        for u in (Update([2], [("b",)]), Update([3, 4], [("c",), ("d",)]), Update([5], [("e",)], "length", 7)):
            q.put_nowait(u)
        one, held = merged(Update([1], [("a",)]), q)
        assert (one.token_ids, one.logprobs, one.finish_reason, one.stop_text_end, held) == \
            ([1, 2, 3, 4, 5], [("a",), ("b",), ("c",), ("d",), ("e",)], "length", 7, None)
        assert q.empty()
        failure = Update([], finish_reason="error", error="engine failed")
        q.put_nowait(Update([2]))
        q.put_nowait(failure)
        q.put_nowait(Update([3]))
        one, held = merged(Update([1]), q)
        assert one.token_ids == [1, 2] and one.logprobs is None and held is failure and q.qsize() == 1
        assert merged(failure, q) == (failure, None) and q.qsize() == 1  # an error is never merged into

    asyncio.run(run())


def test_prompt_chunk_tiles_heaviest_first():
    """Every query tile of every chunk once; with the cached context given, in the order of the
    keys each tile reads, most first; without it, in chunk order."""
    from epinfer.kernels.prefill_attention import tile_map

    lens, ctx = [300, 1, 128, 40], [0, 900, 50, 0]
    plain = tile_map(lens, 128)
    assert plain == ([0, 0, 0, 1, 2, 3], [0, 128, 256, 0, 0, 0])
    chunk, first = tile_map(lens, 128, ctx)
    assert sorted(zip(chunk, first, strict=True)) == sorted(zip(*plain, strict=True))
    keys = [ctx[c] + min(m0 + 128, lens[c]) for c, m0 in zip(chunk, first, strict=True)]
    assert keys == sorted(keys, reverse=True) and keys[0] == 901 and keys[-1] == 40


def test_checkpoint_prefetch_reads_the_ranges_of_the_next_units(tmp_path, monkeypatch):
    """Tensor byte ranges as safetensors lays them out; a unit's adjacent ranges read as one, in
    16 MiB pieces, the next `lead` units queued ahead of the loader; a file that is not safetensors
    gives no ranges and an unreadable range is skipped (the loader's own read reports it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from epinfer.models import prefetch

    path = tmp_path / "a.safetensors"
    tensors = {"x": torch.arange(10, dtype=torch.float32), "y": torch.ones(3, 4, dtype=torch.bfloat16)}
    save_file(tensors, str(path))
    spans = prefetch.tensor_spans(path)
    raw = path.read_bytes()
    with safe_open(str(path), framework="pt") as f:
        for k in tensors:
            b, e = spans[k]
            assert raw[b:e] == f.get_tensor(k).contiguous().view(torch.uint8).numpy().tobytes()
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 20)
    assert prefetch.tensor_spans(tmp_path / "bad.safetensors") == {}
    assert prefetch.merged([(path, 40, 50), (path, 0, 40), (path, 60, 70)]) == [(path, 0, 50), (path, 60, 70)]

    monkeypatch.setattr(prefetch, "PIECE", 16)
    reads = []
    real_read = prefetch.Prefetcher._read
    monkeypatch.setattr(prefetch.Prefetcher, "_read", lambda self, p, o, n: reads.append((p.name, o, n))
                        or real_read(self, p, o, n))
    os.mkfifo(tmp_path / "fifo")  # (a shard swapped for a FIFO: skipped, no reader blocks)
    units = [[(path, 0, 40)], [(path, 40, 50)], [(path, 50, 60)],
             [(tmp_path / "gone", 0, 8), (tmp_path / "fifo", 0, 8)]]
    pf = prefetch.Prefetcher(units, threads=2, lead=1)
    pf.advance(0)
    [f.result() for f in pf.futures]  # (close() drops the reads not yet started)
    pf.close()
    assert sorted(reads) == [("a.safetensors", 0, 16), ("a.safetensors", 16, 16), ("a.safetensors", 32, 8),
                             ("a.safetensors", 40, 10)]
    pf = prefetch.Prefetcher(units, threads=1, lead=5)
    pf.advance(2)  # the missing file's range is read too, and skipped
    [f.result() for f in pf.futures]
    pf.close()
    assert ("gone", 0, 8) in reads


def test_garbage_collections_timed_by_generation():
    """`collections_timed` counts the collections inside its block by generation, with their pauses,
    and stops listening when the block ends."""
    import gc

    from epinfer.bench.workload import collections_timed

    with collections_timed() as got:
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
    gc.collect(2)
    assert got["gen2"]["count"] == 2 and got["gen0"]["count"] >= 1
    assert 0 <= got["gen2"]["max_ms"] <= got["gen2"]["total_ms"]


def test_scheduler_cuts_long_prompts_at_aligned_rows():
    """With an alignment (rows, prompt length), a long prompt's chunk that the budget cuts short ends
    at a multiple of the rows where that gives up at most an eighth of the step, and a long prompt
    waits rather than start with a sliver of a step; short prompts, costly cuts and a step's only
    prompt chunk are not cut."""
    params = SamplingParams(max_tokens=2).resolved({})

    def scheduler(budget, align):
        return Scheduler(CacheAllocator(CacheLayout(block_size=4, num_blocks=256, num_state_slots=8)), 8, budget,
                         align=lambda: align)

    def step(sched) -> list[tuple[int, int]]:
        plan = sched.schedule()
        for p in plan:
            samples = p.samples
            p.seq.num_computed += p.num_new
            if samples:
                p.seq.output_ids.append(1)
                if len(p.seq.output_ids) == 2:
                    sched.finish(p.seq)
        return [(p.seq.index, p.num_new) for p in plan]

    sched = scheduler(64, (8, 32))
    for i, n in enumerate((58, 100, 20, 70)):  # long, long, short, long
        sched.add(Sequence(i, list(range(n)), params, n + 2))
    assert step(sched) == [(0, 58)]  # 6 rows left: the next long prompt waits
    assert step(sched) == [(0, 1), (1, 56), (2, 7)]  # 63 rows cut to 56; the short one takes the rest
    assert step(sched) == [(1, 44), (2, 13)]  # (7 rows left: the long one waits)
    assert step(sched) == [(1, 1), (2, 1), (3, 56)]
    assert step(sched) == [(3, 14)]
    for budget, align, contexts in ((24, (8, 32), [0, 24, 48]),  # aligned already
                                    (24, (16, 32), [0, 24, 48]),  # a cut to 16 would give up 8 of 24
                                    (36, (16, 32), [0, 32, 64]),
                                    (36, (0, 0), [0, 36])):
        sched = scheduler(budget, align)
        long = Sequence(0, list(range(70)), params, 72)
        sched.add(long)
        seen = []
        while long.num_computed < 70:
            seen.append(long.num_computed)
            assert step(sched), "no progress"
        assert seen == contexts, (budget, align)


def test_scheduler_chunk_of_nothing_keeps_the_snapshot_point():
    """A prefilling sequence the step's budget does not reach keeps its state snapshot point (it was
    moved to the sequence's current position, where no chunk ends, and every later chunk was 0)."""
    from epinfer.engine.cache import block_hashes

    alloc = CacheAllocator(CacheLayout(block_size=4, num_blocks=64, num_state_slots=4, num_snapshots=2), True)
    sched = Scheduler(alloc, 4, 2, capture_rows=32)
    params = SamplingParams(max_tokens=4).resolved({})
    for i in range(2):  # two decoding sequences take the whole budget of 2
        dec = Sequence(i, [1], params, 8)
        dec.block_ids, dec.state_slot = alloc.allocate(8, [], 1)
        dec.num_computed, dec.output_ids = 1, [5]
        sched.running.append(dec)
    seq = Sequence(2, list(range(40)), params, 42)
    seq.block_ids, seq.state_slot = alloc.allocate(42, [], 40)
    seq.num_computed, seq.snapshot_at, seq.block_hashes = 24, [8], block_hashes(seq.prompt_ids, 4)
    sched.running.append(seq)
    assert [(p.seq.index, p.num_new) for p in sched.schedule()] == [(0, 1), (1, 1)]
    assert seq.snapshot_at == [8]
    sched.max_num_batched_tokens = 40
    assert (2, 8) in [(p.seq.index, p.num_new) for p in sched.schedule()]  # up to the snapshot point
