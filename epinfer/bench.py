"""`epinfer bench`: prefill and decode speed on a real model shape with random weights, against the
memory floor measured on the same device in the same run.

For each batch size: prefill tokens/s, decode tokens/s, per-token (decode step) latency median and
p90, the bytes one decode step must move (weights touched, KV cache, GDN state) over the measured
copy bandwidth (the floor), and the fraction of it reached (also against a datasheet bandwidth).
Not yet: the per-layer step breakdown and `--compare-hf` (issue 5).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from epinfer.config import ModelConfig
from epinfer.engine.engine import DTYPES, Engine, EngineConfig
from epinfer.engine.sampling_params import SamplingParams
from epinfer.errors import UserError

SHAPES = Path(__file__).resolve().parent / "shapes"  # public config.json of real models
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
    return {"copy_GBps": round(2 * n / copy_s / 1e9, 1), "bf16_TFLOPs": round(2 * size**3 / mm_s / 1e12, 1)}


def decode_bytes(cfg: ModelConfig, batch: int, ctx_len: int, itemsize: int) -> int:
    """Bytes one decode step of `batch` sequences at context `ctx_len` must read (and write)."""
    D = cfg.hidden_size
    attn = cfg.num_heads * cfg.head_dim * (2 if cfg.attn_output_gate else 1) * D \
        + 2 * cfg.num_kv_heads * cfg.head_dim * D + cfg.num_heads * cfg.head_dim * D
    nk, nv, dk, dv = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                      cfg.linear_value_head_dim)
    gdn = (2 * nk * dk + 2 * nv * dv + 2 * nv) * D + nv * dv * D
    expert = 3 * D * cfg.moe_intermediate_size
    touched = cfg.num_experts * (1 - (1 - cfg.top_k / max(cfg.num_experts, 1)) ** batch)
    shared = 3 * D * cfg.shared_expert_intermediate_size + D
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
            total += batch * nv * dk * dv * 4 * 2  # recurrent state read + write, fp32
    total += cfg.vocab_size * D * itemsize  # LM head
    return int(total)


def shape_folder(shape: str, layers: int | None, tmp: str) -> Path:
    if shape in BUILTIN:
        path = SHAPES / BUILTIN[shape]
    else:
        path = Path(shape)
        path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"unknown shape {shape!r}: use {', '.join(BUILTIN)} or a config.json / folder")
    raw = json.loads(path.read_text())
    if layers:
        raw["num_hidden_layers"] = layers
        if isinstance(raw.get("layer_types"), list):
            raw["layer_types"] = raw["layer_types"][:layers]
    Path(tmp, "config.json").write_text(json.dumps(raw))
    return Path(tmp)


def run_batch(engine: Engine, batch: int, input_len: int, output_len: int) -> dict:
    gen = torch.Generator().manual_seed(batch)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    seqs = [engine.add_request(torch.randint(1, vocab, (input_len,), generator=gen).tolist(), params)
            for _ in range(batch)]
    t0 = time.perf_counter()
    while any(len(s.output_ids) == 0 for s in seqs):
        engine.step()
    prefill_s = time.perf_counter() - t0
    steps = []
    while engine.scheduler.has_work():
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)  # step() ends with a host sync (sampled tokens)
    steps = steps[1:] or steps  # the first decode step warms up
    median = statistics.median(steps)
    return {"prefill_tok_s": round(batch * input_len / prefill_s, 1),
            "decode_tok_s": round(batch / median, 1), "step_ms_median": round(median * 1e3, 3),
            "step_ms_p90": round(sorted(steps)[int(0.9 * (len(steps) - 1))] * 1e3, 3)}


def bench(shape: str, batches: list[int], input_len: int, output_len: int, layers: int | None = None,
          device: str = "auto", dtype: str = "bfloat16") -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = shape_folder(shape, layers, tmp)
        ecfg = EngineConfig(model=str(folder), dtype=dtype, device=device, random_weights=True,
                            max_num_seqs=max(batches), max_model_len=input_len + output_len + 16,
                            max_num_batched_tokens=max(4096, input_len))
        engine = Engine(ecfg)
    dev = engine.device
    ceil = ceilings(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    datasheet = next((v for k, v in DATASHEET_TBPS.items() if k in name), None)
    records = []
    for batch in batches:
        speed = run_batch(engine, batch, input_len, output_len)
        nbytes = decode_bytes(engine.model_config, batch, input_len + output_len // 2, DTYPES[dtype].itemsize)
        floor_s = nbytes / (ceil["copy_GBps"] * 1e9)
        rec = {"shape": shape, "layers": engine.model_config.num_layers, "batch": batch, "input_len": input_len,
               "output_len": output_len, "dtype": dtype, "device": name, **ceil, **speed,
               "decode_bytes_GB": round(nbytes / 1e9, 3), "floor_ms": round(floor_s * 1e3, 3),
               "fraction_of_floor": round(floor_s * 1e3 / speed["step_ms_median"], 4)}
        if datasheet:
            rec["fraction_of_datasheet_floor"] = round(nbytes / (datasheet * 1e12) * 1e3 / speed["step_ms_median"], 4)
        records.append(rec)
    return records
