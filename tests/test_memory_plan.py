"""The memory plan and the defaults sized by the device (`epinfer.engine.memory`): the activation
headroom and the graph pieces' pool, the step's token budget, the allocator's settings."""

from __future__ import annotations

import torch


def test_gpu_memory_kept_from_the_cache_grows_with_the_step():
    """The activation headroom: 2 GiB up to 8192 rows a step, in proportion beyond, and with graphs
    the largest decode graph's logits twice (compute dtype + float32, per sequence slot); the graph
    pieces' pool only when pieces are captured, and more for a larger step."""
    import dataclasses

    from epinfer.core.config import DEMO_MODEL, EngineConfig, ModelConfig
    from epinfer.engine.memory import activation_headroom, pieces_pool_bytes

    cfg = ModelConfig.from_dir(DEMO_MODEL)
    step = EngineConfig(model="x", max_num_batched_tokens=8192, cuda_graphs=True, piecewise_graphs=True,
                        max_num_seqs=512)
    eager = dataclasses.replace(step, cuda_graphs=False)
    bf16 = torch.bfloat16
    assert activation_headroom(dataclasses.replace(eager, max_num_batched_tokens=512), cfg, bf16) == 2 * 2**30
    assert activation_headroom(eager, cfg, bf16) == 2 * 2**30
    assert activation_headroom(dataclasses.replace(eager, max_num_batched_tokens=16384), cfg, bf16) == 4 * 2**30
    logits = 512 * cfg.vocab_size * 6
    assert activation_headroom(step, cfg, bf16) == 2 * 2**30 + 2 * logits
    assert activation_headroom(dataclasses.replace(step, max_num_seqs=1024), cfg, bf16) == 2 * 2**30 + 4 * logits
    assert pieces_pool_bytes(cfg, dataclasses.replace(step, piecewise_graphs=False), torch.bfloat16) == 0
    assert 0 < pieces_pool_bytes(cfg, step, torch.bfloat16) < pieces_pool_bytes(
        cfg, dataclasses.replace(step, max_num_batched_tokens=16384), torch.bfloat16)
    # (steps over 16,384 rows run eagerly: no larger pieces)
    assert pieces_pool_bytes(cfg, dataclasses.replace(step, max_num_batched_tokens=65536), bf16) == pieces_pool_bytes(
        cfg, dataclasses.replace(step, max_num_batched_tokens=16384), bf16)


def test_step_token_budget_by_device():
    """No --max-num-batched-tokens: 16384 tokens a step on a GPU of 70 GiB or more, 8192 elsewhere; the engine
    resolves the default before it sizes anything by it."""
    from epinfer.core.config import DEMO_MODEL, EngineConfig
    from epinfer.engine.engine import Engine, auto_max_num_batched_tokens

    assert auto_max_num_batched_tokens(torch.device("cuda"), 141 * 10**9) == 16384  # an H200
    assert auto_max_num_batched_tokens(torch.device("cuda"), 24 * 2**30) == 8192
    assert auto_max_num_batched_tokens(torch.device("cpu")) == 8192
    engine = Engine(EngineConfig(model=str(DEMO_MODEL), device="cpu", dtype="float32"))
    assert engine.ecfg.max_num_batched_tokens == engine.scheduler.max_num_batched_tokens == 8192


def test_no_graph_pieces_pool_where_no_pieces_are_built():
    """Pieces (and the memory pool kept for them) only where the runner builds them: a forward
    with collectives, a debug mode or poisoned pads turns them off in the engine's settings too,
    even when asked for."""
    from epinfer.core.config import DEMO_MODEL, EngineConfig
    from epinfer.distributed.parallel import ParallelContext
    from epinfer.engine.engine import Engine
    from epinfer.runner.model_runner import pieces_allowed

    ecfg = EngineConfig(model=str(DEMO_MODEL), device="cpu", dtype="float32", piecewise_graphs=True)
    assert Engine(ecfg).ecfg.piecewise_graphs and pieces_allowed(ParallelContext())
    for ctx in (ParallelContext(poison_pads=True), ParallelContext(eager_only=True)):
        engine = Engine(ecfg, ctx)
        assert not pieces_allowed(ctx) and not engine.ecfg.piecewise_graphs and engine.runner.pieces is None


def test_expandable_segments_only_where_asked_for(monkeypatch):
    """The allocator's expandable segments: set for a single-process CUDA run, never on the CPU, in a
    parallel run, with EPINFER_EXPANDABLE_SEGMENTS=0, or over the user's own PYTORCH_CUDA_ALLOC_CONF."""
    from epinfer.distributed.parallel import ParallelContext
    from epinfer.engine import memory
    from epinfer.engine.memory import expandable_segments

    calls = []
    monkeypatch.setattr(memory, "allocator_settings", calls.append)
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "EPINFER_EXPANDABLE_SEGMENTS"):
        monkeypatch.delenv(var, raising=False)
    cuda, single = torch.device("cuda"), ParallelContext()
    assert not expandable_segments(torch.device("cpu"), single) and not calls
    assert not expandable_segments(cuda, ParallelContext(groups=object())) and not calls
    assert expandable_segments(cuda, single) and calls == ["expandable_segments:True"]
    monkeypatch.setenv("EPINFER_EXPANDABLE_SEGMENTS", "0")  # an earlier engine's setting undone
    assert not expandable_segments(cuda, single) and calls[-1] == "expandable_segments:False"
    monkeypatch.delenv("EPINFER_EXPANDABLE_SEGMENTS")
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(var, "max_split_size_mb:512")
        assert not expandable_segments(cuda, single) and len(calls) == 2
        monkeypatch.delenv(var)


def test_allocator_settings_reach_torch():
    """The setter `expandable_segments` calls exists in this torch and takes the setting (checked
    with the default value, on a CPU build too)."""
    from epinfer.engine.memory import allocator_settings

    allocator_settings("expandable_segments:False")  # the default


def test_cache_beyond_free_memory_is_one_line(ckpt_dir, tmp_path, monkeypatch, capsys):
    """A cache budget or a sequence count (the block table's rows) beyond the free memory is a
    one-line error before anything is allocated, not an allocator traceback or an out-of-memory kill;
    a large budget that few sequences can use is fine (blocks past what they can use are not made)."""
    import dataclasses
    import json

    import pytest

    from epinfer.cli import main
    from epinfer.core.config import DEMO_MODEL, EngineConfig, ModelConfig
    from epinfer.core.errors import UserError
    from epinfer.engine import memory

    cfg, cpu = ModelConfig.from_dir(DEMO_MODEL), torch.device("cpu")
    ecfg = EngineConfig(cache_memory_gb=64.0, max_num_seqs=4096, enable_prefix_caching=False)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**30, raising=False)
    memory.plan_cache(cfg, dataclasses.replace(ecfg, max_num_seqs=4), torch.float32, cpu)
    with pytest.raises(UserError, match=r"need .* GiB on cpu but only 1.00 GiB is free: lower --cache-memory-gb"):
        memory.plan_cache(cfg, ecfg, torch.float32, cpu)
    monkeypatch.undo()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_token_ids": [1, 2]}) + "\n")
    assert main(["generate", "--model", str(ckpt_dir("qwen3_moe")), "--prompts-file", str(prompts),
                 "--max-num-seqs", str(10**12)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is free: lower --cache-memory-gb or --max-num-seqs" in err, err
