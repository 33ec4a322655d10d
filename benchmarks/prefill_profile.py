"""Where a prefill step's time goes: `BATCH` random prompts of `LEN` tokens prefilled in one step,
timed twice (the second is reported), then profiled once: wall time, device-busy time, time per
model part and the top kernels. The default is the prefill figure of RESULTS.md (8 x 2048 tokens).

    python benchmarks/prefill_profile.py [--shape qwen3-30b-a3b] [--layers 8] [--batch 8] [--len 2048]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

from epinfer.bench.profiling import _by_part, _kernel_time, _profile_steps, _ranges, top_kernels
from epinfer.bench.single import ceilings, prefill_flops_per_token, shape_folder, submit_random, warm_up
from epinfer.engine.engine import Engine, EngineConfig


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--len", type=int, default=2048)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = shape_folder(args.shape, args.layers, tmp)
        tokens = args.batch * args.len
        engine = Engine(EngineConfig(model=str(folder), dtype="bfloat16", device=args.device, random_weights=True,
                                     max_num_seqs=args.batch, max_model_len=args.len + 16,
                                     max_num_batched_tokens=tokens))
        warm_up(engine, args.len)
        sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
        walls = []
        for seed in range(2):  # the first also compiles whatever this shape needs
            seqs = submit_random(engine, args.batch, args.batch, args.len, 1, seed=seed)
            sync()
            t = time.perf_counter()
            engine.step()
            sync()
            walls.append(time.perf_counter() - t)
            assert all(len(s.output_ids) == 1 for s in seqs), "not one prefill step"
            while engine.has_work():
                engine.step()
        submit_random(engine, args.batch, args.batch, args.len, 1, seed=7)
        with _ranges(engine.runner.model):
            prof = _profile_steps(engine.step, 1, sync)
        while engine.has_work():
            engine.step()
        parts, _ = _by_part(prof)
        ceil = ceilings(engine.device)
        flops = prefill_flops_per_token(engine.model_config, args.len) * tokens
        rec = {"shape": args.shape, "layers": args.layers, "batch": args.batch, "len": args.len,
               "device": torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu",
               "wall_ms": [round(w * 1e3, 2) for w in walls],
               "device_busy_ms": round(_kernel_time(prof) / 1e3, 2),
               "parts_ms": {k: round(v / 1e3, 2) for k, v in sorted(parts.items())},
               "fraction_of_matmul": round(flops / walls[-1] / (ceil["bf16_TFLOPs"] * 1e12), 4),
               "top_kernels": top_kernels(prof, 1, 15)}
        print(json.dumps(rec))
        print(f"prefill {args.batch}x{args.len}, {args.layers} layers: {rec['wall_ms']} ms wall, "
              f"{rec['device_busy_ms']} ms busy, {rec['fraction_of_matmul']:.1%} of matmul", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
