"""Collective-ledger overhead: the hook's cost per collective × collectives per decode step,
over the measured decode step time of a real parallel run (ledger dumps give both).

    python benchmarks/ledger_overhead.py --dp 2 --tp 2                          # demo model, CPU
    python benchmarks/ledger_overhead.py --shape epinfer/shapes/qwen3-30b-a3b.json --layers 8 \\
        --device cuda --dp 2 --batch 64 --input-len 128 --output-len 32

Prints one JSON record."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from epinfer import SamplingParams
from epinfer.diagnostics.ledger import Ledger, read_dump
from epinfer.distributed.communicator import CollectiveCall
from epinfer.distributed.groups import Group
from epinfer.engine.engine import EngineConfig
from epinfer.runtime.job import Job
from epinfer.runtime.launch import launch
from epinfer.runtime.lockstep import GenerateMode


def hook_cost_us(n: int = 200_000) -> float:
    ledger = Ledger({"rank": 0})
    group = Group("ep", (0, 1), 0, None, None)
    call = CollectiveCall("all_gather", "layer.11.moe.dispatch", group, [(64, 4160)], ["uint8"], None, 7)
    start = time.perf_counter()
    for _ in range(n):
        ledger.before(call)
        ledger.after(call)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default=None, help="config.json of a real model (random weights)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--check-collectives", action="store_true", help="measure with the pre-flight check on")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = None
        if args.shape:
            cfg = json.loads(Path(args.shape).read_text())
            if args.layers:
                cfg["num_hidden_layers"] = args.layers
            Path(tmp, "config.json").write_text(json.dumps(cfg))
            model = tmp
        ecfg = EngineConfig(model=model, dtype="bfloat16" if args.shape else "auto", device=args.device,
                            random_weights=bool(args.shape), cache_memory_gb=24.0 if args.shape else 1.0,
                            max_num_seqs=args.batch)
        gen = torch.Generator().manual_seed(0)
        vocab = 500 if not args.shape else 100_000
        prompts = [torch.randint(1, vocab, (args.input_len,), generator=gen).tolist() for _ in range(args.batch)]
        params = [SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)] * args.batch
        dump = Path(tmp, "dumps")
        job = Job(ecfg, args.dp, args.tp, dump_dir=str(dump), check_collectives=args.check_collectives,
                  mode=GenerateMode(prompts, params))
        launch(job)
        header, entries = read_dump(dump / "rank0.jsonl")
    syncs = [e["t0"] for e in entries if e["label"] == "dp.sync"]
    steps = Counter(e["step"] for e in entries if e["step"] >= 1)
    decode_step_s = statistics.median(b - a for a, b in zip(syncs[2:-1], syncs[3:], strict=False))
    per_step = statistics.median(steps.values())
    cost = hook_cost_us()
    record = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "shape": args.shape or "demo", "layers": args.layers, "dp": args.dp, "tp": args.tp,
              "batch": args.batch, "check_collectives": args.check_collectives,
              "decode_step_ms": round(decode_step_s * 1e3, 3),
              "collectives_per_step": per_step, "hook_us_per_collective": round(cost, 3),
              "ledger_overhead_pct": round(100 * cost * 1e-6 * per_step / decode_step_s, 4)}
    print(json.dumps(record))


if __name__ == "__main__":
    main()
