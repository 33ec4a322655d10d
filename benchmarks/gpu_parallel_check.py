"""Parallel runtime on NVIDIA GPUs (NCCL): tiny float32 checkpoints, TF32 off, every dispatcher
and padding mode at DP=2 EP=2 and TP=2 EP=2 on two GPUs, tokens compared with one GPU; the last
column counts the decode steps rank 0 replayed as CUDA graphs (0: all eager, e.g. alltoall).

    python benchmarks/gpu_parallel_check.py CKPT_DIR [CKPT_DIR ...]          # 2 GPUs: 2x1 and 1x2
    LAYOUTS=2x2 python benchmarks/gpu_parallel_check.py CKPT_DIR [...]        # 4 GPUs: dp=2 tp=2
    ASYNC=1 ...                                                                # async scheduling on
    DISPATCH=agrs ...                                                          # these dispatchers only

Prints one line per configuration and a summary table; exits 1 on any mismatch."""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from epinfer import LLM, SamplingParams
from epinfer.core.env import SWITCHES
from epinfer.engine.engine import EngineConfig
from epinfer.runtime.job import Job
from epinfer.runtime.launch import launch
from epinfer.runtime.lockstep import GenerateMode

PROMPTS = [[7], [3, 1, 4, 1, 5, 9], list(range(40, 73)), [(i * 37) % 256 for i in range(140)],
           [2, 7, 1, 8, 2, 8, 1, 8, 2]]
MAX_TOKENS = [24, 6, 24, 8, 24]


def main(paths: list[str]) -> int:
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in MAX_TOKENS]
    rows, failures = [], 0
    for path in paths:
        ecfg = dict(dtype="float32", device="cuda", async_scheduling=os.environ.get("ASYNC") == "1")
        ref = [o.token_ids for o in LLM(path, **ecfg).generate(PROMPTS, params)]
        cpu = [o.token_ids for o in LLM(path, dtype="float32", device="cpu").generate(PROMPTS, params)]
        rows.append((path, "1 GPU vs CPU", "-", "-", ref == cpu, 0.0, -1))
        layouts = [tuple(map(int, x.split("x"))) for x in os.environ.get("LAYOUTS", "2x1,1x2").split(",")]
        dispatchers = os.environ.get("DISPATCH", "agrs,alltoall,naive").split(",")
        for (dp, tp), dispatch, pad in itertools.product(layouts, dispatchers, ("uniform", "none")):
            dumps = tempfile.mkdtemp()
            job = Job(EngineConfig(model=path, **ecfg, parallel_graphs=SWITCHES.parallel_graphs), dp, tp, dispatch,
                      pad, dump_dir=dumps, symm_mem=SWITCHES.symm_mem, mode=GenerateMode(PROMPTS, params))
            t0 = time.time()
            out = [o.token_ids for o in launch(job)]
            ok = out == ref
            failures += not ok
            rows.append((path, f"dp={dp} tp={tp} ep={dp * tp}", dispatch, pad, ok, time.time() - t0,
                         graph_replays(Path(dumps))))
            print(rows[-1], flush=True)
    name = torch.cuda.get_device_name(0)
    print(f"\n{name} x{torch.cuda.device_count()}, torch {torch.__version__}")
    print(f"{'checkpoint':28} {'layout':14} {'dispatch':9} {'padding':8} {'same':5} {'s':>5} graph replays (rank 0)")
    for path, layout, dispatch, pad, ok, secs, replays in rows:
        print(f"{path.rsplit('/', 1)[-1]:28} {layout:14} {dispatch:9} {pad:8} {str(ok):5} {secs:5.1f} {replays}")
    return 1 if failures else 0


def graph_replays(folder: Path) -> int:
    """Decode steps rank 0 ran as CUDA graph replays (the raw ledger dump: one entry each)."""
    lines = (folder / "rank0.jsonl").read_text().splitlines()[1:]
    return sum(json.loads(line)["op"] == "graph" for line in lines if line.strip())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
