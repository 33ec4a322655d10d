"""Where a mixed step's time goes (prompt chunks riding with running decodes, the steps that carry
most of the end-to-end workloads): `--running` sequences are prefilled and left decoding, then
prompts of `--len` tokens fill each step up to `--budget` rows. Two mixed steps are timed as the
engine runs them (graph pieces where they are on; host planning, host queueing and the stream's
time apart, so a host-bound step shows), then one is profiled eagerly: device-busy time,
time per model part and the top kernels. The defaults are the throughput profile's steps on an H200
(Qwen3.5-35B-A3B shape, 16384 rows, ≈ 480 of them decodes).

    python benchmarks/mixed_step_profile.py [--shape qwen3.5-35b-a3b] [--layers L] [--running 480]
        [--budget 16384] [--len 1024] [--state-dtype auto|float32] [--quant fp8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

from epinfer.bench.profiling import _by_part, _kernel_time, _profile_steps, _ranges, top_kernels, top_kernels_by_part
from epinfer.bench.single import shape_folder, submit_random
from epinfer.engine.engine import Engine, EngineConfig


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3.5-35b-a3b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--running", type=int, default=480)
    ap.add_argument("--budget", type=int, default=16384)
    ap.add_argument("--len", type=int, default=1024)
    ap.add_argument("--state-dtype", default="auto")
    ap.add_argument("--quant", choices=["fp8"], default=None, help="random FP8 weights, 128 x 128 block scales")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fp8 = args.quant == "fp8"
        folder = shape_folder(args.shape, args.layers, tmp, fp8)
        prompts_a_step = -(-(args.budget - args.running) // args.len)
        engine = Engine(EngineConfig(model=str(folder), dtype=args.dtype, device=args.device, random_weights=True,
                                     max_num_seqs=args.running + 6 * prompts_a_step, max_model_len=args.len + 600,
                                     max_num_batched_tokens=args.budget, mamba_ssm_cache_dtype=args.state_dtype,
                                     fp8_weights=fp8))
        sync = (lambda: torch.cuda.synchronize(engine.device)) if engine.device.type == "cuda" else (lambda: None)
        submit_random(engine, args.running, args.running, args.len, 400, seed=0)
        while any(not s.output_ids for s in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()  # prefill the running set (and compile what the mixed steps need)

        cuda = engine.device.type == "cuda"

        def mixed_step() -> dict:
            """One mixed step as the engine runs it, timed by phase: the host's planning, the host
            until `execute` returns (every launch queued), the stream from the first launch to the
            last kernel's end (CUDA events: idle gaps between launches count), and the wall time.
            A stream time near the queueing time and well above the profiled device time below
            means the host's launches, not the GPU, set the step's pace."""
            sync()
            t = time.perf_counter()
            scheduled, plan = engine.plan_step()
            planned = time.perf_counter()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            logits = engine.runner.execute(plan)
            queued = time.perf_counter()
            if cuda:
                end.record()
            sync()
            wall = time.perf_counter() - t
            engine.apply(scheduled, logits)
            return {"rows": sum(len(w.tokens) for w in plan.items),
                    "decode_rows": sum(len(w.tokens) == 1 for w in plan.items), "wall_ms": round(wall * 1e3, 2),
                    "plan_ms": round((planned - t) * 1e3, 2), "queue_ms": round((queued - planned) * 1e3, 2),
                    "stream_ms": round(start.elapsed_time(end), 2) if cuda else None}

        submit_random(engine, 6 * prompts_a_step, prompts_a_step, args.len, 8, seed=1)
        timed = [mixed_step() for _ in range(2)]
        pieces, engine.runner.pieces = engine.runner.pieces, None  # eager: the profiler sees each part
        graphs, engine.runner.graphs = engine.runner.graphs, None
        try:
            with _ranges(engine.runner.model):
                prof = _profile_steps(lambda: engine.step(), 1, sync, [torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if engine.device.type == "cuda" else []))
        finally:
            engine.runner.pieces, engine.runner.graphs = pieces, graphs
        parts, _ = _by_part(prof)
        rec = {"shape": args.shape, "layers": engine.model_config.num_layers, "budget": args.budget,
               "state_dtype": str(engine.runner.layout.state_dtype).removeprefix("torch."),
               "weights": "fp8" if fp8 else args.dtype,
               "device": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu",
               "graph_pieces": pieces is not None,
               "timed_steps": timed,
               "profiled_device_busy_ms": round(_kernel_time(prof) / 1e3, 2),
               "parts_ms": {k: round(v / 1e3, 2) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
               "top_kernels": top_kernels(prof, 1, 25), "top_kernels_by_part": top_kernels_by_part(prof, 1, 40)}
        print(json.dumps(rec))
        print(f"mixed steps ({args.budget} rows, {args.running} running): "
              f"{[t['wall_ms'] for t in rec['timed_steps']]} ms wall, eager profile "
              f"{rec['profiled_device_busy_ms']} ms device busy", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
