"""Prefix caching (KV blocks keyed by the hash chain of their tokens) on CPU in float32: greedy
tokens identical with the cache on and off and to transformers, for prefixes that end on and off
block boundaries, prompts identical to a cached one, a prefix reused after part of it was evicted;
no block or state snapshot leaks under random load with cancellations; the allocator's rules.
Hybrid (GDN) models reuse a prefix only as far as a kept state snapshot: the same checks for them,
the snapshot taken where a request branches off a cached prefix, and a small snapshot pool that
evicts."""

from __future__ import annotations

import random

import pytest

from epinfer import LLM, SamplingParams
from epinfer.engine.cache import CacheAllocator, block_hashes
from epinfer.runner.cache import CacheLayout
from tests.checkpoints import HYBRIDS, hf_generate

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
BASE = [(i * 37 + 11) % 250 + 1 for i in range(70)]  # 4 full blocks of 16 and 6 tokens


def prompts() -> list[list[int]]:
    return [BASE, BASE + [5, 6, 7], BASE[:48] + [9] * 20, BASE[:40] + [3, 3], list(BASE), BASE[:16] + [1],
            [4] * 33]


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "qwen3_5_moe", "qwen3_next"])
def test_tokens_identical_with_the_cache_on_and_off(family, ckpt_dir):
    path = str(ckpt_dir(family))
    on = LLM(path, dtype="float32", device="cpu", max_num_seqs=2)
    off = LLM(path, dtype="float32", device="cpu", max_num_seqs=2, enable_prefix_caching=False)
    ps = prompts()
    got = [o.token_ids for o in on.generate(ps, GREEDY)]
    assert got == [o.token_ids for o in off.generate(ps, GREEDY)]
    stats = on.engine.scheduler.allocator.stats()
    # reused blocks, not a cache that is never hit (a hybrid only where a state snapshot was kept)
    assert stats["prefix_cache_hits"] >= (3 if family in HYBRIDS else 5) * 16, stats
    assert off.engine.scheduler.allocator.stats()["prefix_cache_hits"] == 0
    again = [o.token_ids for o in on.generate(ps, GREEDY)]  # everything cached now
    assert again == got
    assert on.engine.scheduler.allocator.stats()["prefix_cache_hits"] - stats["prefix_cache_hits"] >= 12 * 16
    for p, tokens in zip(ps, got, strict=True):
        assert tokens == hf_generate(path, p, 8)[0]


def test_reuse_after_partial_eviction(ckpt_dir):
    path = str(ckpt_dir("qwen3_moe"))
    ref = LLM(path, dtype="float32", device="cpu", enable_prefix_caching=False)
    # room for few blocks: later requests evict parts of earlier prefixes
    llm = LLM(path, dtype="float32", device="cpu", max_num_seqs=1, max_model_len=96, cache_memory_gb=0.00019)
    alloc = llm.engine.scheduler.allocator
    assert alloc.layout.num_blocks < 16, alloc.layout.num_blocks
    gen = random.Random(0)
    others = [[gen.randrange(1, 250) for _ in range(60)] for _ in range(3)]
    order = [BASE, others[0], BASE + [2], others[1], BASE[:50], others[2], BASE]
    got = [o.token_ids for o in llm.generate(order, GREEDY)]
    assert got == [o.token_ids for o in ref.generate(order, GREEDY)]
    assert alloc.evictions > 0 and alloc.hit_tokens > 0


def test_hybrid_state_snapshots(ckpt_dir):
    """A shares 3 blocks with B, C and D; A keeps its state only at its own end (4 blocks), so B finds
    the 3 blocks' KV but no state: it prefills in full and snapshots where it branches off; C and D
    then reuse the 3 blocks. With one snapshot kept the pool evicts, and tokens stay exact."""
    path = str(ckpt_dir("qwen3_5_moe"))
    system = BASE[:48]
    order = [system + [5] * 30, system + [6] * 20, system + [7] * 9, system + [8] * 17, system + [6] * 20]
    off = [o.token_ids for o in LLM(path, dtype="float32", device="cpu", enable_prefix_caching=False)
           .generate(order, GREEDY)]
    llm = LLM(path, dtype="float32", device="cpu")
    alloc = llm.engine.scheduler.allocator
    hits = []
    for prompt, want in zip(order, off, strict=True):
        before = alloc.hit_tokens
        assert llm.generate([prompt], GREEDY)[0].token_ids == want
        hits.append(alloc.hit_tokens - before)
    assert hits == [0, 0, 48, 48, 64], hits  # the last: B's own end (4 blocks) was kept too
    for prompt, want in zip(order, off, strict=True):
        assert want == hf_generate(path, prompt, 8)[0]
    small = LLM(path, dtype="float32", device="cpu", max_num_seqs=1, prefix_state_snapshots=1)
    assert [o.token_ids for o in small.generate(order + order[::-1], GREEDY)] == off + off[::-1]
    stats = small.engine.scheduler.allocator.stats()
    assert stats["snapshot_evictions"] > 0 and stats["state_snapshots"] == 1 and stats["prefix_cache_hits"] > 0


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_5_moe"])
def test_no_leak_under_random_load_with_cancellations(family, ckpt_dir):
    llm = LLM(str(ckpt_dir(family)), dtype="float32", device="cpu", max_num_seqs=3, max_num_batched_tokens=40,
              prefix_state_snapshots=4)
    eng, rng = llm.engine, random.Random(1)
    alloc = eng.scheduler.allocator
    total = alloc.layout.num_blocks
    seqs = []
    for step in range(120):
        if step < 80 and rng.random() < 0.4:
            prompt = BASE[:rng.choice([17, 32, 48, 70])] + [rng.randrange(1, 250) for _ in range(rng.randrange(0, 20))]
            seqs.append(eng.add_request(prompt, SamplingParams(max_tokens=rng.randrange(1, 10), temperature=0,
                                                               ignore_eos=True)))
        running = [s for s in eng.scheduler.running if s.finish_reason is None]
        if running and rng.random() < 0.15:  # a client goes away: the request is cancelled
            victim = rng.choice(running)
            victim.finish_reason = "cancelled"
            eng.scheduler.finish(victim)
            eng.pending_resets.append(victim.state_slot)
        if eng.has_work():
            eng.step()
    while eng.has_work():
        eng.step()
    assert alloc.hit_tokens > 0 and all(r == 0 for r in alloc.refs)
    assert len(alloc.free_blocks) + len(alloc.evictable) == total
    assert len(alloc.free_slots) == alloc.layout.num_state_slots
    alloc.clear_prefix_cache()
    assert sorted(alloc.free_blocks) == list(range(total)) and not alloc.cached and not alloc.hash_of
    assert sorted(alloc.free_snapshots) == list(range(alloc.layout.num_snapshots)) and not alloc.snapshots
    assert alloc.layout.num_snapshots == (4 if family == "qwen3_5_moe" else 0)


def test_allocator_rules():
    alloc = CacheAllocator(CacheLayout(4, 6, 3), prefix_caching=True)
    tokens = list(range(10))
    hashes = block_hashes(tokens, 4)
    assert len(hashes) == 2 and block_hashes(tokens[:8] + [99], 4) == hashes  # full blocks only
    assert block_hashes([0, 1, 2, 3, 9, 5, 6, 7], 4)[1] != hashes[1]  # a block's hash covers its tokens
    assert block_hashes([7, 1, 2, 3, 4, 5, 6, 7], 4)[1] != hashes[1]  # ... and every block before it
    a, slot_a = alloc.allocate(10)
    for b, h in zip(a, hashes, strict=False):
        alloc.register(b, h)
    assert alloc.match(hashes) == a[:2]
    b, slot_b = alloc.allocate(12, alloc.match(hashes))  # shares two blocks, takes one
    assert b[:2] == a[:2] and alloc.refs[a[0]] == 2 and not alloc.can_allocate(12, [])
    alloc.free(a, slot_a)
    assert alloc.refs[a[0]] == 1 and a[2] in alloc.free_blocks  # the unregistered block is free at once
    alloc.free(b, slot_b)
    assert list(alloc.evictable) == [a[1], a[0]]  # released: cached, evictable (the chain's end first)
    c, _ = alloc.allocate(4 * 5)  # one block more than the free ones: evicts the least recently released
    assert alloc.evictions == 1 and list(alloc.cached.values()) == [a[0]] and len(c) == 5


def test_chats_keep_their_latest_turn_in_a_pool_the_size_of_the_chats(ckpt_dir):
    """Three chats, one turn at a time each (a turn's prompt = the last one + its reply + 16 tokens,
    block multiples: the branch point and the turn's end are both snapshot), with three snapshots:
    a chat's earlier turns, passed by its later ones, are evicted first, so every chat's next turn
    finds its state (before, the newest chat's snapshots evicted the others'). Tokens stay exact."""
    path = str(ckpt_dir("qwen3_5_moe"))
    llm = LLM(path, dtype="float32", device="cpu", prefix_state_snapshots=3)
    off = LLM(path, dtype="float32", device="cpu", enable_prefix_caching=False)
    alloc = llm.engine.scheduler.allocator
    chats = [[(c * 31 + i * 7) % 250 + 1 for i in range(32)] for c in range(3)]
    hits = []
    for turn in range(3):
        for c, prompt in enumerate(chats):
            before = alloc.hit_tokens
            got = llm.generate([prompt], GREEDY)[0].token_ids
            assert got == off.generate([prompt], GREEDY)[0].token_ids
            hits.append(alloc.hit_tokens - before)
            chats[c] = prompt + got + [(turn * 13 + c * 5 + i) % 250 + 1 for i in range(16)]
    # turn 1: nothing; turn 2: the first prompt's state at its last reusable block (16 of 32 tokens);
    # turn 3: the whole second prompt (56 tokens: 3 blocks)
    assert hits == [0] * 3 + [16] * 3 + [48] * 3, hits


def test_start_up_prefill_warm_up_leaves_no_trace(ckpt_dir):
    """The start-up warm-up (on GPUs with graphs; called directly here) runs a full-budget prefill
    and a few decode steps of stand-in requests, then leaves the engine as it found it: no cached
    prefix, counters at zero, every block and slot free, and the same tokens as a fresh engine."""
    path = str(ckpt_dir("qwen3_5_moe"))
    fresh = LLM(path, dtype="float32", device="cpu", max_num_seqs=3, max_num_batched_tokens=64)
    warmed = LLM(path, dtype="float32", device="cpu", max_num_seqs=3, max_num_batched_tokens=64)
    engine, alloc = warmed.engine, warmed.engine.scheduler.allocator
    free_blocks, free_slots = len(alloc.free_blocks), len(alloc.free_slots)
    assert engine.warm_up_prefill() >= 0
    assert alloc.stats()["cached_blocks"] == 0 and alloc.queried_tokens == alloc.hit_tokens == 0
    assert (len(alloc.free_blocks), len(alloc.free_slots)) == (free_blocks, free_slots)
    assert engine.num_requests == 0 and not engine.has_work()
    ps = prompts()
    assert [o.token_ids for o in warmed.generate(ps, GREEDY)] == [o.token_ids for o in fresh.generate(ps, GREEDY)]


def test_a_small_cache_holds_a_request_of_the_max_model_length(ckpt_dir):
    """With no --max-model-len the length is what the cache holds, in whole blocks: a request of
    that length is admitted (and the start-up warm-up, whose stand-ins are nearly that long, runs)."""
    path = str(ckpt_dir("qwen3_5_moe"))
    llm = LLM(path, dtype="float32", device="cpu", max_num_seqs=2, max_num_batched_tokens=256, cache_memory_gb=0.00019)
    layout = llm.engine.scheduler.allocator.layout
    assert llm.engine.max_model_len <= layout.num_blocks * layout.block_size < 16 * 16
    assert llm.engine.warm_up_prefill() >= 0
    prompt = [(i * 13) % 250 + 1 for i in range(llm.engine.max_model_len - 1)]
    out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 1  # the length allows one generated token


def test_more_snapshots_in_one_step_than_rows(ckpt_dir):
    """Three prompts reach their snapshot point in the same step with one snapshot row: the later
    ones evict the earlier, the row is written three times in one step (the last one kept, as the
    cache records), and tokens stay those of a run without the cache."""
    path = str(ckpt_dir("qwen3_5_moe"))
    ps = [[(c * 31 + i * 7) % 250 + 1 for i in range(33)] for c in range(3)]  # snapshots at 32 tokens
    llm = LLM(path, dtype="float32", device="cpu", max_num_seqs=4, prefix_state_snapshots=1)
    off = LLM(path, dtype="float32", device="cpu", max_num_seqs=4, enable_prefix_caching=False)
    want = [o.token_ids for o in off.generate(ps, GREEDY)]
    assert [o.token_ids for o in llm.generate(ps, GREEDY)] == want
    assert llm.engine.scheduler.allocator.stats()["snapshot_evictions"] >= 2
    hits = llm.engine.scheduler.allocator.hit_tokens
    assert [o.token_ids for o in llm.generate(ps[2:], GREEDY)] == want[2:]  # the row kept is the third's
    assert llm.engine.scheduler.allocator.hit_tokens == hits + 32  # restored from it


def check_hybrid_reuse(path: str, device: str, snapshots: int = 0, **kw) -> None:
    """Hybrid prefix caching against the same engine without it and against transformers: three
    snapshots taken in the same steps, then two prompts restored from one row in the same step and
    two more from branch points (128 tokens reused at least); `snapshots`: the rows kept (0: the
    default; 1: the cache evicts)."""
    system = BASE[:48]
    first = [system + [5] * 30, system + [6] * 20, BASE[:70]]
    then = [system + [7] * 9, system + [8] * 17, BASE[:70] + [9] * 3, BASE[:70] + [10] * 5]
    kw = {"dtype": "float32", "device": device, "max_num_seqs": 8, **kw}
    want = [o.token_ids for o in LLM(path, enable_prefix_caching=False, **kw).generate(first + then, GREEDY)]
    llm = LLM(path, prefix_state_snapshots=snapshots, **kw)
    got = [o.token_ids for o in llm.generate(first, GREEDY)] + [o.token_ids for o in llm.generate(then, GREEDY)]
    assert got == want
    for prompt, tokens in zip(first + then, got, strict=True):
        assert tokens == hf_generate(path, prompt, 8)[0]
    stats = llm.engine.scheduler.allocator.stats()
    assert stats["prefix_cache_hits"] >= (128 if snapshots == 0 else 0), stats
    assert snapshots == 0 or stats["snapshot_evictions"] > 0, stats


@pytest.mark.parametrize("snapshots", [0, 1])
def test_hybrid_reuse_of_one_row_by_two(snapshots, ckpt_dir):
    check_hybrid_reuse(str(ckpt_dir("qwen3_5_moe")), "cpu", snapshots)


def test_hybrid_snapshots_captured_inside_chunks(ckpt_dir, monkeypatch):
    """A snapshot point inside a prompt chunk: the state is captured there (at the last block
    boundary at or before it that lies a multiple of 64 rows into the chunk) instead of the chunk
    being cut, so a prompt still prefills in one step; a repeat and prompts branching off restore
    from the captures. Tokens identical to the engine without the cache, to the one that cuts
    (EPINFER_STATE_CAPTURE=0), and to transformers."""
    path = str(ckpt_dir("qwen3_5_moe"))
    gen = random.Random(5)
    long = [gen.randrange(1, 250) for _ in range(200)]
    order = [long, list(long), long[:150] + [7] * 30, long[:150] + [8] * 40, long[:100] + [9] * 5]
    off = LLM(path, dtype="float32", device="cpu", enable_prefix_caching=False)
    want = [o.token_ids for o in off.generate(order, GREEDY)]

    def run(llm: LLM) -> tuple[list[int], list[int]]:
        alloc, hits, steps, calls = llm.engine.scheduler.allocator, [], [], []
        step = llm.engine.step
        llm.engine.step = lambda: calls.append(1) or step()
        for prompt, tokens in zip(order, want, strict=True):
            before, first = alloc.hit_tokens, len(calls)
            assert llm.generate([prompt], GREEDY)[0].token_ids == tokens
            hits.append(alloc.hit_tokens - before)
            steps.append(len(calls) - first)
        return hits, steps

    captured = LLM(path, dtype="float32", device="cpu")
    hits, steps = run(captured)
    # 192 = the repeat's last reusable block (12 of 16 tokens); 128: the branch point (144) moved back
    # to 2 x 64 rows; the fourth prompt starts at 128, off the 64-row grid of its points: it cuts
    assert hits == [0, 192, 0, 128, 0], hits
    assert captured.engine.scheduler.allocator.stats()["snapshot_captures"] == 3
    assert steps[0] == steps[2] == steps[4] == 8, steps  # prefilled in one step: first token at once
    monkeypatch.setenv("EPINFER_STATE_CAPTURE", "0")
    cut = LLM(path, dtype="float32", device="cpu")
    cut_hits, cut_steps = run(cut)
    assert cut.engine.scheduler.allocator.stats()["snapshot_captures"] == 0
    assert cut_hits[1] == 192 and cut_steps[0] == 9, (cut_hits, cut_steps)  # the cut costs a step
    for prompt, tokens in zip(order, want, strict=True):
        assert tokens == hf_generate(path, prompt, 8)[0]


def test_reserved_snapshots_wait_for_their_step():
    """A snapshot reserved for a state the step in flight captures is not found before `ready`, and
    no other reservation evicts it meanwhile (two would write one row in one forward)."""
    alloc = CacheAllocator(CacheLayout(4, 8, 2, num_snapshots=2), prefix_caching=True)
    hashes = block_hashes(list(range(12)), 4)
    for b, h in zip(alloc.allocate(12)[0], hashes, strict=True):
        alloc.register(b, h)
    first = alloc.reserve_snapshot(hashes[0])
    assert alloc.with_state(hashes, 3) == (0, None)  # written by the step in flight: not yet
    alloc.ready(hashes[0])
    assert alloc.with_state(hashes, 3) == (1, first)
    second, third = alloc.reserve_snapshot(hashes[1]), alloc.reserve_snapshot(hashes[2])
    assert third == first and alloc.snapshot_evictions == 1  # the ready one goes, the reserved one stays
    assert alloc.reserve_snapshot(99) is None  # every row reserved: the caller cuts its chunk instead
    assert second != third and alloc.with_state(hashes, 3) == (0, None)


def test_capture_planning_in_the_scheduler():
    """Without a model: a prompt whose first 5 blocks' KV are cached with no state snapshots at its
    branch point (80) and its last reusable block (96); both move back to 64 rows and are captured
    once, and its own capture is not marked to be evicted first. A chunk cut by the budget is
    rounded to whole capture rows only when no snapshot point lies inside it and it gives up at most
    an eighth of it; a point the next chunk could not capture is taken at this chunk's end."""
    from epinfer.core.sampling_params import SamplingParams
    from epinfer.engine.scheduler import Scheduler, Sequence

    def plan(budget: int, prompt_len: int, capture_rows: int = 64,
             shared: int = 80) -> tuple[list[int], Sequence, CacheAllocator]:
        alloc = CacheAllocator(CacheLayout(16, 128, 4, num_snapshots=4), prefix_caching=True)
        cached = list(range(1, 91))
        for b, h in zip(alloc.allocate(96)[0], block_hashes(cached, 16), strict=False):
            alloc.register(b, h)
        sched = Scheduler(alloc, 4, budget, capture_rows)
        seq = Sequence(0, cached[:shared] + [300 + i for i in range(prompt_len - shared)],
                       SamplingParams(max_tokens=1), prompt_len + 1)
        sched.add(seq)
        chunks = []
        while seq.num_computed < prompt_len:
            (item,) = sched.schedule()
            chunks.append(item.num_new)
            if len(chunks) == 1 and budget >= prompt_len:
                assert seq.capturing == [(4, 0)], seq.capturing
            seq.num_computed += item.num_new
            sched.computed(seq)
        return chunks, seq, alloc

    chunks, seq, alloc = plan(512, 100)
    assert chunks == [100] and list(alloc.snapshots) == [seq.block_hashes[3]] and not alloc.superseded
    assert plan(100, 200)[0] == [100, 92, 8]  # the point at 80 is in the first chunk: no rounding
    assert plan(100, 200, capture_rows=0)[0] == [80, 100, 12, 8]  # every point cuts
    # a fresh 1024-token prompt, its point at 1008: 1000 rows rounded to 960, where it is then taken
    assert plan(1000, 1024, shared=0)[0] == [960, 64] and plan(1000, 1024, 0, shared=0)[0] == [1000, 8, 16]
    assert plan(100, 1024, shared=0)[0] == [100] * 10 + [8, 16]  # 36 of 100 rows: not rounded
    assert plan(700, 1024, shared=0)[0] == [640, 384]  # rounded, then captured at 960 inside the chunk
