"""Engine behaviour: continuous batching, cache slot reuse and reset, chunked prefill, sampling
with seeds, stop rules, sizing errors."""

from __future__ import annotations

import pytest

from epinfer import LLM, SamplingParams
from epinfer.core.config import EngineConfig
from epinfer.core.errors import UserError

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
P1 = [5, 17, 99, 3, 250, 41, 7]
P2 = list(range(10, 80))
P3 = [200, 100, 50]


@pytest.fixture(scope="module")
def hybrid(ckpt_dir):
    return str(ckpt_dir("qwen3_5_moe"))


def alone(path: str, prompt: list[int], params=GREEDY, **kw) -> list[int]:
    return LLM(path, dtype="float32", device="cpu", **kw).generate([prompt], params)[0].token_ids


def test_request_joins_while_others_decode(hybrid):
    llm = LLM(hybrid, dtype="float32", device="cpu")
    eng = llm.engine
    first = eng.add_request(P1, GREEDY)
    second = eng.add_request(P2, GREEDY)
    for _ in range(4):
        eng.step()
    late = eng.add_request(P3, GREEDY)  # joins while the first two decode
    while eng.scheduler.has_work():
        eng.step()
    assert first.output_ids == alone(hybrid, P1)
    assert second.output_ids == alone(hybrid, P2)
    assert late.output_ids == alone(hybrid, P3)


def test_slot_reuse_gives_fresh_results(hybrid):
    # one sequence slot: every request reuses the slot (and KV blocks) of the previous one
    llm = LLM(hybrid, dtype="float32", device="cpu", max_num_seqs=1)
    outs = llm.generate([P2, P1, P3], GREEDY)
    assert [o.token_ids for o in outs] == [alone(hybrid, p) for p in (P2, P1, P3)]


def test_chunked_prefill_matches(hybrid):
    chunked = alone(hybrid, P2, max_num_batched_tokens=16)
    assert chunked == alone(hybrid, P2)


def test_seeded_sampling_is_reproducible_and_batch_independent(hybrid):
    llm = LLM(hybrid, dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7,
                            ignore_eos=True)
    a = llm.generate([P1], params)[0].token_ids
    b = llm.generate([P3, P1, P2], [GREEDY, params, GREEDY])[1].token_ids
    assert a == b
    other = SamplingParams(max_tokens=16, temperature=1.0, seed=8, ignore_eos=True)
    c = llm.generate([P1], other)[0].token_ids
    assert c != a


def test_top_k_one_is_greedy(hybrid):
    llm = LLM(hybrid, dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=1, seed=3, ignore_eos=True)
    assert llm.generate([P1], params)[0].token_ids == alone(hybrid, P1)


def test_stop_token_ids_and_max_tokens(hybrid):
    llm = LLM(hybrid, dtype="float32", device="cpu")
    ref = alone(hybrid, P1)
    stop_at = ref[5]
    out = llm.generate([P1], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == ref[: ref.index(stop_at) + 1]
    assert out.finish_reason == "stop"
    out = llm.generate([P1], SamplingParams(max_tokens=3, temperature=0))[0]
    assert out.token_ids == ref[:3] and out.finish_reason == "length"


def test_eos_from_config_and_ignore_eos(ckpt_dir):
    path = str(ckpt_dir("qwen3_moe"))
    ref = alone(path, P1)
    eos = ref[3]
    with_eos = str(ckpt_dir("qwen3_moe", generation_config={"eos_token_id": eos, "do_sample": False}))
    out = LLM(with_eos, dtype="float32", device="cpu").generate([P1], SamplingParams(max_tokens=12))[0]
    assert out.token_ids == ref[: ref.index(eos) + 1] and out.finish_reason == "stop"
    out = LLM(with_eos, dtype="float32", device="cpu").generate(
        [P1], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert out.token_ids == ref


def test_max_model_len(hybrid):
    llm = LLM(hybrid, dtype="float32", device="cpu", max_model_len=20)
    out = llm.generate([P1], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert len(P1) + len(out.token_ids) == 20 and out.finish_reason == "length"
    with pytest.raises(UserError, match="max model length"):
        llm.generate([list(range(1, 30))], GREEDY)


def test_cache_too_small_is_a_clear_error(hybrid, ckpt_dir):
    with pytest.raises(UserError, match="recurrent state for 256 sequences"):
        LLM(hybrid, dtype="float32", device="cpu", cache_memory_gb=0.0001)
    with pytest.raises(UserError, match="needs more KV cache than the budget holds"):
        LLM(str(ckpt_dir("qwen3_moe")), dtype="float32", device="cpu", max_model_len=512,
            cache_memory_gb=0.0001)


def test_bad_prompts(hybrid):
    llm = LLM(hybrid, dtype="float32", device="cpu")
    with pytest.raises(UserError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(UserError, match="outside the vocabulary"):
        llm.generate([[1, 2, 256]], GREEDY)
    with pytest.raises(UserError, match="no tokenizer"):
        llm.generate(["hello"], GREEDY)
    with pytest.raises(UserError, match="max_tokens"):
        llm.generate([P1], SamplingParams(max_tokens=0))


@pytest.mark.parametrize("fast", [False, True])
def test_async_scheduling_gives_the_same_tokens(hybrid, fast):
    """Planning step n+1 before step n's tokens reach the host (inputs fed from the device,
    finished requests learnt a step late) changes nothing: stops at random steps, seeded
    sampling, chunked prefill, queued requests joining, one slot reused; on the eager and the
    decode fast path."""
    prompts = [P1, P2, P3, [9], list(range(100, 140)), [5, 5, 5, 5]]
    params = [GREEDY, SamplingParams(max_tokens=9, temperature=0, stop_token_ids=[P1[0], 77, 120, 3]),
              SamplingParams(max_tokens=11, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True),
              SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=1.0, top_k=20, seed=9, stop_token_ids=[42, 7]),
              GREEDY]

    def run(async_scheduling: bool):
        llm = LLM(hybrid, dtype="float32", device="cpu", max_num_seqs=3, max_num_batched_tokens=16,
                  async_scheduling=async_scheduling)
        llm.engine.runner.fast_decode = fast
        pending_steps = []
        plan_step = llm.engine.plan_step

        def counted():
            scheduled, plan = plan_step()
            pending_steps.append(plan.has_pending)
            return scheduled, plan

        llm.engine.plan_step = counted
        outs = llm.generate(prompts, params)
        return [(o.token_ids, o.finish_reason) for o in outs], sum(pending_steps)

    sync, none_pending = run(False)
    assert none_pending == 0
    asynced, pending = run(True)
    assert pending > 5  # the device fed inputs to most decode steps
    assert asynced == sync


def test_half_precision_recurrent_state(hybrid):
    """--mamba-ssm-cache-dtype bfloat16: the GDN recurrent state is kept (and snapshotted) in bf16,
    half the bytes; the arithmetic stays float32, so the prefill's first token is the float32
    state's, and a prompt prefilled in chunks (each starting from the rounded state) and its decode
    stay close to it. A bad name is one line."""
    import torch

    from epinfer.engine.device import resolve_state_dtype
    from epinfer.runner.cache import state_bytes_per_slot

    llm = LLM(hybrid, dtype="float32", device="cpu", max_num_batched_tokens=16, mamba_ssm_cache_dtype="bfloat16")
    cache = llm.engine.runner.cache
    states = [cache.per_layer[i][1] for i in cache.gdn_layers]
    assert states and all(s.dtype == torch.bfloat16 for s in states)
    cfg = llm.engine.model_config
    assert state_bytes_per_slot(cfg, torch.float32, 1, torch.bfloat16) < state_bytes_per_slot(cfg, torch.float32)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    whole = LLM(hybrid, dtype="float32", device="cpu", mamba_ssm_cache_dtype="bfloat16").generate([P2], params)[0]
    exact = alone(hybrid, P2, params)
    assert whole.token_ids[0] == exact[0]  # the prompt in one step: no rounded state read yet
    for half in (whole.token_ids, llm.generate([P2], params)[0].token_ids):  # chunks read the rounded state
        assert sum(a == b for a, b in zip(half, exact, strict=True)) >= 6, (half, exact)
    assert resolve_state_dtype("auto", torch.bfloat16) == torch.bfloat16
    # the default is the compute dtype (vLLM's): float32 here, bf16 in a bf16 run
    assert EngineConfig().mamba_ssm_cache_dtype == "auto"
    default = LLM(hybrid, dtype="bfloat16", device="cpu").engine.runner.cache
    assert default.gdn_layers and all(default.per_layer[i][1].dtype == torch.bfloat16 for i in default.gdn_layers)
    with pytest.raises(UserError, match="unknown --mamba-ssm-cache-dtype 'fp4'"):
        LLM(hybrid, dtype="float32", device="cpu", mamba_ssm_cache_dtype="fp4")


def test_startup_objects_frozen_and_released_by_the_next_engine(hybrid):
    """`freeze_heap` (the programs that keep their engine: a rank, generate, bench --workload) moves
    what start-up built out of the cyclic collector's sight; `LLM` alone freezes nothing; the next
    engine in the process brings the frozen objects back first, so a dropped engine is still freed,
    cycles and all."""
    import gc
    import weakref

    from epinfer.engine.engine import freeze_heap

    first = LLM(hybrid, dtype="float32", device="cpu")
    assert gc.get_freeze_count() == 0  # (an earlier test's freeze released by this engine, none of its own)
    freeze_heap()
    assert gc.get_freeze_count() > 1000
    model = weakref.ref(first.engine.runner.model)
    first.engine.self_cycle = first.engine  # garbage only the cyclic collector can free
    del first
    gc.collect()
    assert model() is not None  # frozen: a collection does not see it
    second = LLM(hybrid, dtype="float32", device="cpu")
    assert model() is None and gc.get_freeze_count() == 0
    assert second.generate([P1], SamplingParams(max_tokens=3, temperature=0))[0].token_ids
