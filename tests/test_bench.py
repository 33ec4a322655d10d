"""`epinfer bench` on CPU with a tiny shape: records are complete and self-consistent."""

from __future__ import annotations

import dataclasses
import json

import pytest

from epinfer.bench.parallel import bench_parallel
from epinfer.bench.single import SHAPES, bench, decode_bytes, prefill_flops_per_token
from epinfer.core.config import ModelConfig
from epinfer.core.errors import UserError
from epinfer.engine.engine import EngineConfig
from epinfer.runtime.job import Job
from tests.checkpoints import tiny_config


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_bench_records(tmp_path, async_scheduling):
    (tmp_path / "config.json").write_text(tiny_config("qwen3_5_moe").to_json_string())
    records = bench(str(tmp_path), [1, 3], input_len=12, output_len=5, device="cpu", dtype="float32",
                    async_scheduling=async_scheduling)
    assert [r["batch"] for r in records] == [1, 3]
    assert all(r["async_scheduling"] == async_scheduling for r in records)
    for r in records:
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["step_ms_p90"] >= r["step_ms_median"]
        assert r["fraction_of_floor"] > 0 and r["floor_ms"] > 0 and r["copy_GBps"] > 0
    json.dumps(records)


def test_bench_trace(tmp_path):
    """`--trace DIR` on CPU: the breakdown runs (device times 0 here) and writes its profiled steps."""
    from epinfer.cli import main

    (tmp_path / "config.json").write_text(tiny_config("qwen3_moe").to_json_string())
    out = tmp_path / "t" / "new"
    assert main(["bench", "--shape", str(tmp_path), "--batch", "2", "--input-len", "8", "--output-len", "16",
                 "--device", "cpu", "--dtype", "float32", "--async-scheduling", "--json", "--trace", str(out)]) == 0
    assert [p.name for p in out.iterdir()] == ["trace_b2.json"]
    events = json.loads((out / "trace_b2.json").read_text())["traceEvents"]
    assert sum(e.get("ph") == "X" for e in events) > 50


def test_trace_folder_that_cannot_be_made(tmp_path, capsys):
    from epinfer.cli import main

    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "traces"
    assert main(["bench", "--shape", "qwen3-30b-a3b", "--layers", "1", "--batch", "1", "--trace", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"epinfer: error: --trace {bad}: cannot create the folder (Not a directory)"]


def test_prefill_flops_count_active_parameters():
    cfg = ModelConfig.from_hf(json.loads((SHAPES / "qwen3-30b-a3b.json").read_text()))
    per_token = prefill_flops_per_token(cfg, 2)  # attention scores negligible at 2 tokens
    # PERFORMANCE.md: 3.0 B active parameters, of which the LM head (0.31 B) is not run per prompt token
    assert 2 * 2.5e9 < per_token < 2 * 2.9e9
    assert prefill_flops_per_token(cfg, 2048) > per_token  # attention grows with the prompt


def test_decode_bytes_grow_with_batch_and_touch_experts():
    cfg = ModelConfig.from_hf(json.loads((SHAPES / "qwen3-30b-a3b.json").read_text()))
    one, many = decode_bytes(cfg, 1, 1024, 2), decode_bytes(cfg, 256, 1024, 2)
    # PERFORMANCE.md: batch 1 reads ~6.1 GB, batch 256 ~60.4 GB of weights + 25.8 GB of KV at ctx 1k
    assert 5.5e9 < one < 6.8e9
    assert 80e9 < many < 92e9


def test_fp8_decode_bytes_and_bench(tmp_path):
    """--quant fp8: the floor counts the projections and experts at one byte (the 30B shape's batch-1
    weights ~6.1 GB in bf16, ~3.2 GB in FP8); the bench runs the shape with FP8 weights."""
    cfg = ModelConfig.from_hf(json.loads((SHAPES / "qwen3-30b-a3b.json").read_text()))
    bf16, fp8 = decode_bytes(cfg, 1, 16, 2), decode_bytes(cfg, 1, 16, 2, fp8=True)
    assert 0.5 < fp8 / bf16 < 0.56
    (tmp_path / "config.json").write_text(tiny_config("qwen3_5_moe").to_json_string())
    records = bench(str(tmp_path), [2], input_len=12, output_len=3, device="cpu", dtype="float32", fp8=True)
    assert records[0]["weights"] == "fp8" and records[0]["decode_tok_s"] > 0


def test_unknown_shape():
    try:
        bench("no-such-shape", [1], 4, 2, device="cpu")
    except UserError as exc:
        assert "unknown shape" in str(exc)
    else:
        raise AssertionError("no error")


def test_p90_is_nearest_rank():
    from epinfer.bench.single import p90

    assert p90([3.0, 1.0]) == 3.0 and p90([5.0]) == 5.0 and p90([float(i) for i in range(10)]) == 8.0


@pytest.mark.parametrize("argv,message", [
    (["--dp", "0", "--batch", "1"], "--dp and --tp must be >= 1 (got dp=0, tp=1)"),
    (["--dp", "2", "--replica-batch", "64,x"], "--replica-batch '64,x': give counts like 64,8"),
    (["--gpu-memory-utilization", "1.5", "--batch", "1"],
     "gpu_memory_utilization (--gpu-memory-utilization) must be in (0, 1], got 1.5"),
    (["--input-len", "40940", "--output-len", "8", "--batch", "1"], "requests of 40,948 tokens (prompt + output, "
     "and 16 the benchmark adds) are beyond the shape's 40,960 positions (max_position_embeddings): lower "
     "--input-len / --output-len"),
    (["--dp", "2", "--replica-batch", "40000,1", "--input-len", "1000"], "this benchmark's requests hold "
     "82,560,000 tokens (prompts and outputs) in all; at most 33,554,432 (its prompts are built in host memory): "
     "lower --batch / --num-requests or the lengths"),
    (["--batch", "65536", "--input-len", "1000"], "this benchmark's requests hold 67,633,152 tokens (prompts and "
     "outputs) in all; at most 33,554,432 (its prompts are built in host memory): lower --batch / --num-requests "
     "or the lengths"),
    (["--workload", "throughput", "--num-requests", "100000"], "this benchmark's requests hold 115,200,000 tokens "
     "(prompts and outputs) in all; at most 33,554,432 (its prompts are built in host memory): lower --batch / "
     "--num-requests or the lengths"),
    (["--batch", "8", "--num-requests", "100", "--max-num-seqs", "4"],
     "--num-requests, --max-num-seqs: for a --workload run only; add --workload NAME"),
    (["--batch", "1", "--serve"], "--serve: for a --workload run only; add --workload NAME"),
    (["--workload", "throughput", "--batch", "64", "--compare-hf"], "--batch, --compare-hf: not for --workload (it "
     "sizes the run from the profile and --num-requests / --input-len / --output-len)"),
    (["--workload", "throughput", "--sampling", "temp=1"], "--sampling: 'temp' is not one of temperature, top_p, "
     "top_k, min_p, presence_penalty, frequency_penalty, repetition_penalty (KEY=VALUE,...)"),
    (["--workload", "throughput", "--sampling", "top_k=20,presence_penalty=5"],
     "--sampling: presence_penalty must be in [-2, 2], got 5.0"),
    (["--workload", "throughput", "--sampling", "top_p=x"], "--sampling: top_p='x' is not a number"),
    (["--batch", "1", "--sampling", "top_k=20"], "--sampling: for a --workload run only; add --workload NAME"),
    (["--workload", "long-context", "--input-len", "50000"], "requests of 50,100 tokens (prompt + output, and 16 "
     "the benchmark adds) are beyond the shape's 40,960 positions (max_position_embeddings): lower --input-len / "
     "--output-len"),
])
def test_bad_bench_flags(capsys, argv, message):
    from epinfer.cli import main

    assert main(["bench", "--shape", "qwen3-30b-a3b", "--layers", "1", "--device", "cpu", *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"epinfer: error: {message}"]


def test_a_bad_shape_file_is_named(capsys, tmp_path):
    """A fault in a --shape config.json names the user's file (the benchmark runs on a copy)."""
    from epinfer.cli import main

    raw = json.loads((SHAPES / "qwen3-30b-a3b.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "num_experts_per_tok": 0}))
    for shape in (tmp_path, tmp_path / "config.json"):
        assert main(["bench", "--shape", str(shape), "--layers", "1", "--device", "cpu", "--batch", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"epinfer: error: {tmp_path / 'config.json'}: field 'num_experts_per_tok'"), err


@pytest.mark.parametrize("layers", [0, -1, 49])
def test_layers_out_of_range(capsys, layers):
    from epinfer.cli import main

    assert main(["bench", "--shape", "qwen3-30b-a3b", "--layers", str(layers), "--batch", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"epinfer: error: --layers {layers}: the qwen3-30b-a3b shape has 48 layers (give 1 to 48)"]


def test_weight_bytes_of_the_30b_shape(tmp_path):
    import torch

    from epinfer.bench.single import shape_folder
    from epinfer.runner.model_runner import weight_bytes

    cfg = ModelConfig.from_dir(shape_folder("qwen3-30b-a3b", None, str(tmp_path)))
    assert 30.0e9 < weight_bytes(cfg, torch.bfloat16) / 2 < 31.0e9  # Qwen3-30B-A3B: 30.5 B parameters


def test_weights_that_do_not_fit_stop_before_allocating(capsys, monkeypatch):
    """A model whose weights exceed the free memory stops with one line (exit 2) before any weight is
    allocated, instead of an out-of-memory kill; the estimate is this rank's shard in the run's dtype."""
    from epinfer.cli import main
    from epinfer.runner import model_runner

    monkeypatch.setattr(model_runner, "available_bytes", lambda device: 1 << 20)

    def no_init(model):
        raise AssertionError("weights were allocated and initialised before the check")

    monkeypatch.setattr(model_runner, "random_init", no_init)
    assert main(["bench", "--shape", "qwen3-30b-a3b", "--layers", "2", "--batch", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("epinfer: error: the weights need ") and "2 layers" in err[0], err


@pytest.mark.timeout(240)
def test_bench_parallel_records(tmp_path):
    """`epinfer bench --dp/--tp` on CPU (Gloo): per-rank step times, padding waste that follows
    from the DP decisions, collective time and skew per kind, for round-robin and fixed loads."""
    (tmp_path / "config.json").write_text(tiny_config("qwen3_5_moe").to_json_string())
    cpu = EngineConfig(device="cpu", dtype="float32")
    recs = bench_parallel(Job(cpu, 2, 2), str(tmp_path), [3, 4], 12, 10, None)
    assert [r["batch"] for r in recs] == [3, 4] and [r["replica_batch"] for r in recs] == [[2, 1], [2, 2]]
    # uniform padding, TP 2: both replicas run 2 rows; 3 real of 4 rows, then 4 of 4
    assert recs[0]["pad_waste"] == 0.25 and recs[1]["pad_waste"] == 0.0
    for r in recs:
        assert r["ep"] == 4 and r["decode_steps"] >= 9 and len(r["step_ms_by_rank"]) == 4
        assert r["decode_tok_s"] > 0 and r["step_ms_p90"] > 0
        assert {"dispatch", "combine", "dp_sync", "tp_plan"} <= set(r["collective_ms_by_rank"][0])
        assert {"dispatch", "dp_sync"} <= set(r["skew_ms"]) and r["skew_ms"]["dispatch"]["max"] >= 0
    json.dumps(recs)
    fixed = bench_parallel(Job(cpu, 2, 1, dp_padding="none"), str(tmp_path), [], 12, 10, None, replica_batch=[3, 1])
    assert fixed[0]["replica_batch"] == [3, 1] and fixed[0]["pad_waste"] == 0.0  # rows = tokens per replica
    # --no-expert-parallel: TP-sharded experts, summed by a TP all-reduce; no dispatch at all
    # (with --trace: the profiled steps of both ranks in one Chrome trace, on the host here)
    tp_only = bench_parallel(Job(cpu, 1, 2, expert_parallel=False), str(tmp_path), [1], 12, 16, None,
                             trace=str(tmp_path / "trace"))
    assert tp_only[0]["ep"] == 1 and tp_only[0]["pad_waste"] == 0.0
    assert "tp_collectives" in tp_only[0]["collective_ms_by_rank"][0]
    assert "dispatch" not in tp_only[0]["collective_ms_by_rank"][0]
    assert sorted(p.name for p in (tmp_path / "trace").iterdir()) == ["trace_b1.json"]  # rank files merged
    assert_ranks_traced(tmp_path / "trace" / "trace_b1.json", 2)


def assert_ranks_traced(path, ranks: int) -> None:
    """A merged trace: every rank's host process named and apart, with work in the profiled steps."""
    events = json.loads(path.read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    for r in range(ranks):
        pids = {pid for pid, name in names.items() if name.startswith(f"rank {r}: ")}
        assert pids and all(pid // 1000 == r for pid in pids), names
        assert sum(e.get("ph") == "X" and e["pid"] in pids for e in events) > 50


def test_batch_the_cache_cannot_hold_at_once_is_one_line(tmp_path):
    """A batch whose sequences never all run at once (here: a sequence limit below it, as a cache
    too small for them gives) has no step to time: a UserError naming how many ran, not a crash."""
    from epinfer.bench.single import run_batch
    from epinfer.engine.engine import Engine

    (tmp_path / "config.json").write_text(tiny_config("qwen3_moe").to_json_string())
    engine = Engine(EngineConfig(model=str(tmp_path), dtype="float32", device="cpu", random_weights=True,
                                 max_num_seqs=2))
    with pytest.raises(UserError, match="batch 3: at most 2 of its 3 sequences ran at once"):
        run_batch(engine, 3, 6, 4, with_breakdown=False)


def test_breakdown_runs_on_a_decoding_engine(tmp_path):
    """The profiler breakdown's plumbing (module ranges, the sampling range, the comm hook) on CPU,
    where device times are zero; on CUDA `epinfer bench` reports it per batch."""
    from epinfer.bench.profiling import breakdown
    from epinfer.core.sampling_params import SamplingParams
    from epinfer.engine.engine import Engine, EngineConfig

    (tmp_path / "config.json").write_text(tiny_config("qwen3_5_moe").to_json_string())
    engine = Engine(EngineConfig(model=str(tmp_path), dtype="float32", device="cpu", random_weights=True))
    seqs = [engine.add_request(list(range(1, 9)), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
            for _ in range(2)]
    engine.step()
    parts = breakdown(engine, 3)
    assert {"device_busy", "eager_device", "top_kernels"} <= set(parts)
    assert all(len(s.output_ids) == 9 for s in seqs)  # the 8 profiled steps (2 warm-up) decoded normally


def test_breakdown_attributes_kernels_by_device_span():
    """On GPUs each kernel counts once, for the innermost `part.*` span on the device timeline that
    contains its start, whatever launched it; other annotations are not kernels; kernels outside
    every span go by name (Triton) or to "other". No device spans (CPU): None, the op-link path."""
    from types import SimpleNamespace

    import torch

    from epinfer.bench.profiling import _by_device_span, _device_work

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def evt(name, start, end, device=cuda, annotation=False):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end),
                               device_time_total=end - start, is_user_annotation=annotation)

    events = [evt("part.moe_block", 0, 100, annotation=True), evt("part.experts", 40, 90, annotation=True),
              evt("## Call CompiledFxGraph ##", 0, 30, annotation=True), evt("nvjet_gemm", 0, 10),
              evt("_grouped_up", 40, 70), evt("_grouped_down", 70, 90), evt("triton_red_fused_norm", 100, 104),
              evt("_split_kernel", 110, 116), evt("aten::mm", 0, 200, device=cpu)]
    parts, total = _by_device_span(events)
    assert parts == {"moe_block": 10, "experts": 50, "compiled_small_ops": 4, "attention": 6} and total == 70
    assert _by_device_span([evt("aten::mm", 0, 5, device=cpu)]) is None
    # the normal path's busy time and top kernels: the same device work, whether host ops were profiled or not
    work = _device_work(SimpleNamespace(events=lambda: events + [evt("_grouped_up", 200, 230)]))
    assert work == {"nvjet_gemm": 10, "_grouped_up": 60, "_grouped_down": 20, "triton_red_fused_norm": 4,
                    "_split_kernel": 6}


def test_table_prints_fractions_as_its_summary_line_does():
    from epinfer.bench.single import format_table

    rec = {"shape": "s", "layers": 1, "dtype": "bfloat16", "device": "cpu", "input_len": 8, "output_len": 4,
           "copy_GBps": 10.0, "bf16_TFLOPs": 0.01, "cuda_graphs": False, "batch": 1, "decode_tok_s": 5.0,
           "fraction_of_floor": 0.0117, "prefill_fraction_of_matmul": 0.25}
    table = format_table([rec])
    assert "1.2%" in table and "25.0%" in table and "0.0117" not in table
    assert f"{rec['fraction_of_floor']:.1%}" == "1.2%"  # what the per-batch summary line prints


def test_workload_runs_every_request_to_its_length(tmp_path, monkeypatch):
    """`bench --workload`: every request submitted at once, each generates exactly its output length
    (long-tailed lengths in `mixed`), steps counted by kind, latencies within the wall time."""
    from epinfer.bench.workload import WORKLOADS, bench_workload, lengths

    (tmp_path / "config.json").write_text(tiny_config("qwen3_5_moe").to_json_string())
    w = dataclasses.replace(WORKLOADS["mixed"], requests=10, input_len=30, output_len=8)
    pairs = lengths(w)
    assert len(set(pairs)) > 5 and max(i for i, _ in pairs) > 30 > min(i for i, _ in pairs)
    assert lengths(w) == pairs  # seeded
    cpu = EngineConfig(device="cpu", dtype="float32", max_num_batched_tokens=64)
    log = tmp_path / "steps.jsonl"
    rec = bench_workload(str(tmp_path), "mixed", cpu, requests=10, input_len=30, output_len=8, step_log=str(log))
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    for kind, summary in rec["steps"].items():  # the log is the record's steps, one line each
        mine = [s for s in steps if s["kind"] == kind]
        assert len(mine) == summary["count"] and all(s["rows"] <= 64 for s in mine)
        assert not mine or summary["median_ms"] <= summary["p90_ms"] <= summary["max_ms"]
        assert not mine or abs(summary["max_ms"] - max(s["ms"] for s in mine)) < 0.01
    assert sum(s["rows"] for s in steps) == sum(i + o - 1 for i, o in pairs)  # a row per prompt and generated token
    assert all(s["decode_rows"] == s["rows"] for s in steps if s["kind"] == "decode")
    assert rec["requests"] == 10 and rec["prompt_tokens"] == sum(i for i, _ in pairs)
    assert rec["output_tokens"] == sum(o for _, o in pairs)
    assert rec["steps"]["prefill"]["count"] + rec["steps"]["mixed"]["count"] >= sum(i for i, _ in pairs) // 64
    assert rec["steps"]["decode"]["count"] > 0 and 0 < rec["ttft_ms_p50"] <= rec["wall_s"] * 1e3
    assert rec["total_tok_s"] > rec["output_tok_s"] > 0 and rec["startup_s"]["engine"] > 0
    phases = rec["startup_s"]
    assert {"weights", "cache", "graphs", "pieces", "warm_up", "warm_up_first_step"} <= set(phases)
    assert phases["weights"] + phases["cache"] + phases["graphs"] + phases["pieces"] <= phases["engine"] + 0.03
    assert 0 <= phases["warm_up_first_step"] <= phases["warm_up"] + 0.02
    assert 1 <= rec["most_running"] <= 10  # (admitted as the token budget lets their prompts in)
    for g in rec["gc"].values():  # the collector's pauses in the measured run, by generation (if any ran)
        assert g["count"] >= 1 and 0 <= g["max_ms"] <= g["total_ms"] + 0.1 <= rec["wall_s"] * 1e3 + 0.1
    from epinfer.engine.engine import Engine

    seen, add = [], Engine.add_request  # --sampling: every request (warm-up too) with those fields
    monkeypatch.setattr(Engine, "add_request", lambda self, p, params=None: seen.append(params) or add(self, p, params))
    sampling = {"temperature": 0.7, "top_k": 20, "presence_penalty": 1.5}
    few = bench_workload(str(tmp_path), "mixed", dataclasses.replace(cpu, max_num_seqs=3), requests=10, input_len=30,
                         output_len=8, sampling=sampling)
    assert few["most_running"] == 3 == few["max_num_seqs"] and few["output_tokens"] == rec["output_tokens"]
    assert few["sampling"] == sampling and rec["sampling"] == {"temperature": 0}
    assert len(seen) > 10 and all((p.temperature, p.top_k, p.presence_penalty) == (0.7, 20, 1.5) for p in seen)


@pytest.mark.timeout(240)
def test_workload_through_the_server_in_parallel(tmp_path):
    """`bench --workload --serve --dp 2 --tp 2`: every request streams through `epinfer serve` (4
    Gloo ranks) to its full length, from clients in two processes; a server that cannot start is
    one line with its log's end."""
    from epinfer.bench.serve_workload import bench_serve_workload, client_processes

    assert client_processes(512, cores=16) == 8 and client_processes(100, cores=16) == 2
    assert client_processes(512, cores=2) == 1 and client_processes(1, cores=64) == 1

    (tmp_path / "config.json").write_text(tiny_config("qwen3_5_moe").to_json_string())
    flags = ["--dtype", "float32", "--device", "cpu", "--dp", "2", "--tp", "2"]
    rec = bench_serve_workload(str(tmp_path), "throughput", flags, requests=7, input_len=20, output_len=5,
                               concurrency=3, budget=32, client_procs=2, sampling={"temperature": 0.5,
                                                                                  "repetition_penalty": 1.2})
    assert rec["sampling"] == {"temperature": 0.5, "repetition_penalty": 1.2}
    assert rec["failed"] == 0 and rec["server_exit"] == 0 and rec["concurrency"] == 3
    assert rec["client_processes"] == 2
    assert rec["requests"] == 7 and rec["prompt_tokens"] == 7 * 20 and rec["output_tokens"] == 7 * 5
    assert 0 < rec["ttft_ms_p50"] <= rec["ttft_ms_p99"] and rec["tpot_ms_p50"] > 0
    assert rec["startup_s"]["server_healthy"] > 0 and rec["total_tok_s"] > rec["output_tok_s"] > 0
    with pytest.raises(UserError, match="exited with 2 before it was healthy.*--tp 3"):
        bench_serve_workload(str(tmp_path), "throughput", ["--device", "cpu", "--tp", "3"], requests=1,
                             input_len=20, output_len=5)


def test_shared_prefix_and_multi_turn_workloads(tmp_path):
    """The prefix-caching workloads: every request after one shared system prompt; chats whose turns
    resend the whole history and are submitted as the previous reply completes. With the cache the
    repeated tokens are hits; without it, none."""
    from epinfer.bench.workload import bench_workload

    (tmp_path / "config.json").write_text(tiny_config("qwen3_moe", max_position_embeddings=8192).to_json_string())
    for caching in (True, False):
        cpu = EngineConfig(device="cpu", dtype="float32", enable_prefix_caching=caching)
        shared = bench_workload(str(tmp_path), "shared-prefix", cpu, requests=6, input_len=20, output_len=4)
        assert shared["requests"] == 6 and shared["prompt_tokens"] == 6 * (4096 + 20)
        chats = bench_workload(str(tmp_path), "multi-turn", cpu, requests=10, input_len=20, output_len=4)
        # 2 chats x 5 turns: turn t sends t x 20 new tokens and the t - 1 replies before it
        assert chats["requests"] == 10 and chats["prompt_tokens"] == 2 * sum(20 * t + 4 * (t - 1) for t in range(1, 6))
        assert chats["output_tokens"] == 10 * 4
        if caching:
            # (the first two requests share the first step: neither finds the other's blocks yet)
            assert shared["prefix_cache_hit_rate"] > 0.6 and chats["prefix_cache_hit_rate"] > 0.4
        else:
            assert shared["prefix_cache_hit_rate"] == chats["prefix_cache_hit_rate"] == 0


def test_a_signal_while_the_server_starts_stops_it(tmp_path, monkeypatch):
    """`bench --serve`: Ctrl-C or SIGTERM (`Interrupted`) while the server is not yet healthy stops
    the server too, rather than leaving it running."""
    import subprocess
    import sys

    import httpx

    from epinfer.bench import serve_workload
    from epinfer.core.errors import Interrupted

    started = []
    real_popen = subprocess.Popen

    def popen(cmd, **kw):  # a stand-in server that would run for a minute
        started.append(real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kw))
        return started[-1]

    def health(*a, **k):
        raise Interrupted(15)

    monkeypatch.setattr(serve_workload.subprocess, "Popen", popen)
    monkeypatch.setattr(httpx, "get", health)
    with pytest.raises(Interrupted):
        serve_workload.start_server(["--model", "x"], tmp_path / "server.log")
    assert started and started[0].poll() is not None
