"""`epinfer bench`: prefill and decode speed on a real model shape with random weights, against the
memory floor measured on the same device in the same run.

For each batch size: prefill tokens/s, decode tokens/s, per-token (decode step) latency median and
p90, the bytes one decode step must move (weights touched, KV cache, GDN state) over the measured
copy bandwidth (the floor), and the fraction of it reached (also against a datasheet bandwidth);
a per-part step breakdown from the profiler (`profiling`), and with `--compare-hf` transformers'
`generate` on the same shape. `parallel` runs the same measurement on DP × TP spawned ranks.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from epinfer.bench.profiling import breakdown, steps_needed
from epinfer.core.checkpoint_files import read_json_object
from epinfer.core.config import ModelConfig
from epinfer.core.errors import UserError
from epinfer.core.sampling_params import SamplingParams
from epinfer.core.untrusted import shown_path
from epinfer.engine.device import DTYPES
from epinfer.engine.engine import Engine, EngineConfig

SHAPES = Path(__file__).resolve().parent.parent / "shapes"  # public config.json of real models
BUILTIN = {"qwen3-30b-a3b": "qwen3-30b-a3b.json", "qwen3.5-35b-a3b": "qwen3.5-35b-a3b-text.json",
           "qwen3-next-80b-a3b": "qwen3-next-80b-a3b.json"}
DATASHEET_TBPS = {"H100": 3.35, "H200": 4.8}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceilings(device: torch.device) -> dict:
    """Device copy bandwidth (bytes read + written per second) and bf16 matmul rate."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)

    def best(fn, reps: int = 10) -> float:
        fn()
        _sync(device)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t)
        return min(times)

    copy_s = best(lambda: dst.copy_(src))
    mm_s = best(lambda: a @ b, reps=5)
    # three significant digits: a slow CPU's bf16 rate (~0.01 TFLOP/s) must not round to 0
    return {"copy_GBps": float(f"{2 * n / copy_s / 1e9:.3g}"), "bf16_TFLOPs": float(f"{2 * size**3 / mm_s / 1e12:.3g}")}


def _weights_per_layer(cfg: ModelConfig) -> tuple[int, int, int, int]:
    """Weight elements of one layer's (attention mixer, GDN mixer, one routed expert, shared expert
    + its gate)."""
    D = cfg.hidden_size
    attn = cfg.num_heads * cfg.head_dim * (2 if cfg.attn_output_gate else 1) * D \
        + 2 * cfg.num_kv_heads * cfg.head_dim * D + cfg.num_heads * cfg.head_dim * D
    nk, nv, dk, dv = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                      cfg.linear_value_head_dim)
    gdn = (2 * nk * dk + 2 * nv * dv + 2 * nv) * D + nv * dv * D
    return attn, gdn, 3 * D * cfg.moe_intermediate_size, 3 * D * cfg.shared_expert_intermediate_size + D


FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def decode_bytes(cfg: ModelConfig, batch: int, ctx_len: int, itemsize: int, fp8: bool = False,
                 state_itemsize: int = 4) -> int:
    """Bytes one decode step of `batch` sequences at context `ctx_len` must read (and write).
    `fp8`: the projections and experts are FP8 weights (1 byte, plus a float32 scale per block);
    `state_itemsize`: bytes of a GDN recurrent state element (--mamba-ssm-cache-dtype; auto: the compute dtype)."""
    D = cfg.hidden_size
    attn, gdn, expert, shared = _weights_per_layer(cfg)
    if fp8:  # in units of `itemsize` bytes, as everything below is counted
        attn, gdn, expert, shared = (int(n * (1 + 4 / (128 * 128)) / itemsize) for n in (attn, gdn, expert, shared))
    nv, dk, dv = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    touched = cfg.num_experts * (1 - (1 - cfg.top_k / max(cfg.num_experts, 1)) ** batch)
    total = 0
    for kind, mlp in zip(cfg.layer_types, cfg.mlp_types, strict=True):
        total += (attn if kind == "attention" else gdn) * itemsize
        if mlp == "moe":
            total += (cfg.num_experts * D + touched * expert + shared) * itemsize
        else:
            total += 3 * D * cfg.intermediate_size * itemsize
        if kind == "attention":
            total += batch * ctx_len * 2 * cfg.num_kv_heads * cfg.head_dim * itemsize
        else:
            total += batch * nv * dk * dv * state_itemsize * 2  # recurrent state read + write
    total += cfg.vocab_size * D * itemsize  # LM head
    return int(total)


def prefill_flops_per_token(cfg: ModelConfig, prompt_len: int) -> float:
    """FLOPs per prompt token: 2 x the active weights (mixer, router, top-k experts, shared expert)
    plus causal attention scores and values (average context prompt_len / 2) and the GDN update."""
    D = cfg.hidden_size
    attn, gdn, expert, shared = _weights_per_layer(cfg)
    nv, dk, dv = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    flops = 0.0
    for kind, mlp in zip(cfg.layer_types, cfg.mlp_types, strict=True):
        if kind == "attention":
            flops += 2 * attn + 4 * (prompt_len / 2) * cfg.num_heads * cfg.head_dim
        else:
            flops += 2 * gdn + 4 * nv * dk * dv
        flops += 2 * (cfg.num_experts * D + cfg.top_k * expert + shared) if mlp == "moe" \
            else 6 * D * cfg.intermediate_size
    return flops


def shape_folder(shape: str, layers: int | None, tmp: str, fp8: bool = False) -> Path:
    """A folder holding the shape's config.json (`layers`: cut to that depth; `fp8`: with an FP8
    quantization_config of 128 x 128 blocks unless it has one)."""
    if shape in BUILTIN:
        path = SHAPES / BUILTIN[shape]
    else:
        path = Path(shape)
        path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"unknown shape {shape!r}: use {', '.join(BUILTIN)} or a config.json / folder")
    raw = read_json_object(path)  # bounded, never blocks; the engine checks every field
    if layers is not None:
        text = raw.get("text_config", raw)  # multimodal configs keep the language model's fields there
        depth = text.get("num_hidden_layers", 0) if isinstance(text, dict) else 0
        if not isinstance(depth, int) or not 1 <= layers <= depth:
            raise UserError(f"--layers {layers}: the {shape} shape has {depth} layers (give 1 to {depth})")
        text["num_hidden_layers"] = layers
        if isinstance(text.get("layer_types"), list):
            text["layer_types"] = text["layer_types"][:layers]
    if fp8 and not raw.get("quantization_config"):
        target = raw["text_config"] if isinstance(raw.get("text_config"), dict) else raw
        target["quantization_config"] = dict(FP8_CONFIG)
    # checked here, so that a fault names the user's file, not the copy in `tmp`
    ModelConfig.from_hf(raw, f"the {shape} shape" if shape in BUILTIN else shown_path(path))
    Path(tmp, "config.json").write_text(json.dumps(raw))
    return Path(tmp)


BENCH_TOKENS = 1 << 25  # prompt and output tokens of a benchmark in all: its prompts are built in host memory


def check_bench_tokens(total: int) -> None:
    if total > BENCH_TOKENS:
        raise UserError(f"this benchmark's requests hold {total:,} tokens (prompts and outputs) in all; at most "
                        f"{BENCH_TOKENS:,} (its prompts are built in host memory): lower --batch / --num-requests "
                        "or the lengths")


def bench_model_len(model: Path | ModelConfig, longest: int, margin: int) -> int:
    """The max model length for requests of up to `longest` tokens (prompt and output) and the
    `margin` the benchmark gives them; beyond the shape's positions (of the shape folder or its parsed
    config), one line before any engine."""
    cfg = model if isinstance(model, ModelConfig) else ModelConfig.from_dir(model)
    positions = cfg.max_position_embeddings
    if longest + margin > positions:
        raise UserError(f"requests of {longest:,} tokens (prompt + output, and {margin} the benchmark adds) are "
                        f"beyond the shape's {positions:,} positions (max_position_embeddings): lower --input-len "
                        "/ --output-len")
    return longest + margin


def warm_up(engine: Engine, input_len: int) -> None:
    """Two short requests end to end, so kernel compilation (Triton, torch.compile) and the first
    CUDA graphs are not timed as prefill."""
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for _ in range(2):
        engine.add_request(list(range(1, 1 + min(input_len, 1024))), params)
    while engine.has_work():
        engine.step()


def submit_random(engine: Engine, count: int, prefilled_together: int, input_len: int, output_len: int,
                  seed: int) -> list:
    """`count` random prompts, greedy, never stopping early. Prompts prefilled in chunks start
    decoding at different steps, so each gets enough extra tokens that at least `output_len` steps
    run with all `prefilled_together` requests (the largest set sharing the chunks) decoding."""
    prefill_steps = -(-prefilled_together * input_len // engine.scheduler.max_num_batched_tokens)
    params = SamplingParams(max_tokens=output_len + prefill_steps + 1, temperature=0, ignore_eos=True)
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    return [engine.add_request(torch.randint(1, vocab, (input_len,), generator=gen).tolist(), params)
            for _ in range(count)]


def trace_folder(trace: str | None) -> str | None:
    """`--trace DIR`: created here, before any model is built."""
    if trace:
        try:
            Path(trace).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--trace {trace}: cannot create the folder ({exc.strerror})") from None
    return trace


def p90(values: list[float]) -> float:
    """Nearest rank: the smallest value with at least 90 % of the values at or below it."""
    return sorted(values)[max(0, math.ceil(0.9 * len(values)) - 1)] if values else float("nan")


def run_batch(engine: Engine, batch: int, input_len: int, output_len: int, with_breakdown: bool,
              trace: str | None = None) -> dict:
    """Prefill `batch` random prompts, then time the decode steps in which all of them decode. An
    untimed prefill of the same shape goes first: the timed one measures steady state, not the
    first use of a shape (kernel selection, compilation). `trace`: a folder for the breakdown's
    Chrome trace."""
    sched = engine.scheduler
    submit_random(engine, batch, batch, input_len, 1, seed=10_000 + batch)
    while engine.has_work():
        engine.step()
    seqs = submit_random(engine, batch, batch, input_len, output_len, seed=batch)
    t0 = time.perf_counter()
    most = 0  # the most sequences running at once
    while any(len(s.output_ids) == 0 for s in seqs):
        engine.step()
        most = max(most, len(sched.running))
    prefill_s = time.perf_counter() - t0
    profile_steps = 3
    with_breakdown = with_breakdown and output_len >= 8 + steps_needed(profile_steps)
    steps, parts = [], None
    while engine.has_work():
        most = max(most, len(sched.running))
        full = len(sched.running) == batch and not sched.waiting
        left = min(output_len - len(s.output_ids) for s in seqs)  # (the first sequences to finish: prefilled first)
        if with_breakdown and parts is None and full and left <= steps_needed(profile_steps) + 3:
            parts = breakdown(engine, profile_steps, trace=trace and f"{trace}/trace_b{batch}.json")
            continue
        t = time.perf_counter()
        engine.step()  # ends with a host sync (the sampled tokens)
        if full:
            steps.append(time.perf_counter() - t)
    if not steps:
        raise UserError(f"batch {batch}: at most {most} of its {batch} sequences ran at once (the cache holds no "
                        f"more at {input_len + output_len} tokens each); lower the batch or raise "
                        "--gpu-memory-utilization")
    steps = steps[1:] or steps  # the first full decode step warms up (and captures a CUDA graph)
    median = statistics.median(steps)
    out = {"prefill_tok_s": round(batch * input_len / prefill_s, 1),
           "decode_tok_s": round(batch / median, 1), "step_ms_median": round(median * 1e3, 3),
           "step_ms_p90": round(p90(steps) * 1e3, 3), "decode_steps": len(steps)}
    if parts is not None:
        parts["host_overhead"] = round(max(0.0, median * 1e3 - parts["device_busy"]), 3)
        parts["top_kernels"] = parts.pop("top_kernels")  # last: the long one
        out["breakdown_ms"] = parts
    return out


def hf_decode_speed(folder: Path, batches: list[int], input_len: int, output_len: int,
                    device: torch.device, dtype: torch.dtype) -> dict[int, dict]:
    """transformers `generate` on the same shape (its own random weights): decode tokens/s from the
    difference between `output_len` and 1 new tokens, per batch size."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(str(folder))
    with torch.device(device):
        try:
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, experts_implementation="grouped_mm")
        except (TypeError, ValueError):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    results = {}
    for batch in batches:
        ids = torch.randint(1, cfg.get_text_config().vocab_size, (batch, input_len), device=device)
        _hf_time(model, ids, 2)  # warm-up
        one, full = _hf_time(model, ids, 1), _hf_time(model, ids, output_len)
        per_step = (full - one) / max(1, output_len - 1)
        results[batch] = {"hf_decode_tok_s": round(batch / per_step, 1), "hf_step_ms": round(per_step * 1e3, 3)}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def _hf_time(model, ids: torch.Tensor, n: int) -> float:
    import transformers

    gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                        pad_token_id=0, temperature=None, top_p=None, top_k=None)
    _sync(ids.device)
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    _sync(ids.device)
    return time.perf_counter() - t


def bench(shape: str, batches: list[int], input_len: int, output_len: int, layers: int | None = None,
          device: str = "auto", dtype: str = "bfloat16", compare_hf: bool = False, cuda_graphs: bool = True,
          gpu_memory_utilization: float = 0.9, async_scheduling: bool | None = None,
          trace: str | None = None, fp8: bool = False, state_dtype: str = "auto") -> list[dict]:
    """`trace`: a folder; each batch's profiled steps go there as a Chrome trace (host and device;
    on CPU, host only, which turns the breakdown on there). No prefix caching: the random prompts
    share no prefix, and a hybrid model's state snapshots would only take the cache's memory."""
    trace = trace_folder(trace)
    check_bench_tokens(max(batches) * (input_len + output_len))
    with tempfile.TemporaryDirectory() as tmp:
        folder = shape_folder(shape, layers, tmp, fp8)
        ecfg = EngineConfig(model=str(folder), dtype=dtype, device=device, random_weights=True, fp8_weights=fp8,
                            max_num_seqs=max(batches),
                            max_model_len=bench_model_len(folder, input_len + output_len, 16),
                            max_num_batched_tokens=max(16384, input_len), cuda_graphs=cuda_graphs,
                            gpu_memory_utilization=gpu_memory_utilization, async_scheduling=async_scheduling,
                            mamba_ssm_cache_dtype=state_dtype, enable_prefix_caching=False)
        engine = Engine(ecfg)
        dev = engine.device
        ceil = ceilings(dev)
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        datasheet = next((v for k, v in DATASHEET_TBPS.items() if k in name), None)
        records = []
        warm_up(engine, input_len)
        for batch in batches:
            speed = run_batch(engine, batch, input_len, output_len, dev.type == "cuda" or trace is not None, trace)
            nbytes = decode_bytes(engine.model_config, batch, input_len + output_len // 2,
                                  DTYPES[dtype].itemsize, fp8, engine.runner.layout.state_dtype.itemsize)
            floor_s = nbytes / (ceil["copy_GBps"] * 1e9)
            rec = {"shape": shape, "layers": engine.model_config.num_layers, "batch": batch,
                   "input_len": input_len, "output_len": output_len, "dtype": dtype, "device": name,
                   "weights": "fp8" if fp8 else dtype,
                   "ssm_state": str(engine.runner.layout.state_dtype).removeprefix("torch."),
                   "cuda_graphs": engine.runner.graphs is not None,
                   "async_scheduling": engine.ecfg.async_scheduling, **ceil, **speed,
                   "decode_bytes_GB": round(nbytes / 1e9, 3), "floor_ms": round(floor_s * 1e3, 3),
                   "fraction_of_floor": round(floor_s * 1e3 / speed["step_ms_median"], 4)}
            flops = prefill_flops_per_token(engine.model_config, input_len) * speed["prefill_tok_s"]
            rec["prefill_fraction_of_matmul"] = round(flops / (ceil["bf16_TFLOPs"] * 1e12), 4)
            if datasheet:
                rec["fraction_of_datasheet_floor"] = round(
                    nbytes / (datasheet * 1e12) * 1e3 / speed["step_ms_median"], 4)
            records.append(rec)
            print(f"epinfer bench: batch {batch}: prefill {rec['prefill_tok_s']} tok/s, decode {rec['decode_tok_s']} "
                  f"tok/s, step {rec['step_ms_median']} ms, {rec['fraction_of_floor']:.1%} of the floor",
                  file=sys.stderr, flush=True)
        if compare_hf:
            del engine  # one model in memory at a time
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            hf = hf_decode_speed(folder, batches, input_len, output_len, dev, DTYPES[dtype])
            for rec in records:
                rec.update(hf[rec["batch"]])
                rec["speedup_vs_hf"] = round(rec["decode_tok_s"] / rec["hf_decode_tok_s"], 2)
                print(f"epinfer bench: batch {rec['batch']}: transformers {rec['hf_decode_tok_s']} tok/s "
                      f"({rec['speedup_vs_hf']}x)", file=sys.stderr, flush=True)
    return records


def format_table(records: list[dict]) -> str:
    """The readable form: one row per batch, then each batch's breakdown."""
    if not records:
        return ""
    r0 = records[0]
    lines = [f"{r0['shape']}  layers={r0['layers']}  {r0['dtype']}  {r0['device']}  in={r0['input_len']} "
             f"out={r0['output_len']}  copy={r0['copy_GBps']} GB/s  bf16={r0['bf16_TFLOPs']} TFLOP/s  "
             f"graphs={r0['cuda_graphs']}"]
    cols = [("batch", "batch"), ("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s"),
            ("step_ms_median", "step ms"), ("step_ms_p90", "p90 ms"), ("floor_ms", "floor ms"),
            ("fraction_of_floor", "of floor"), ("fraction_of_datasheet_floor", "of datasheet"),
            ("prefill_fraction_of_matmul", "prefill/mm"),
            ("hf_decode_tok_s", "HF tok/s"), ("speedup_vs_hf", "vs HF")]
    cols = [(k, h) for k, h in cols if any(k in r for r in records)]
    lines.append("  ".join(f"{h:>13}" for _, h in cols))
    for r in records:
        lines.append("  ".join(f"{_cell(k, r.get(k, '-')):>13}" for k, _ in cols))
    for r in records:
        if "breakdown_ms" in r:
            parts = "  ".join(f"{k}={v}" for k, v in r["breakdown_ms"].items())
            lines.append(f"batch {r['batch']} breakdown (ms/step): {parts}")
    return "\n".join(lines)


def _cell(key: str, value) -> str:
    """Fractions as percentages, as the progress lines print them (`0.0117` is `1.2%`)."""
    if key.startswith(("fraction_of", "prefill_fraction")) and isinstance(value, float):
        return f"{value:.1%}"
    return str(value)
