"""Two GPUs (NCCL), tiny float32 checkpoint: decode steps replay CUDA graphs with the MoE
collectives inside, on every rank at the same steps, and the tokens equal one GPU's. Skipped
with fewer than 2 GPUs; `benchmarks/gpu_parallel_check.py` runs every dispatcher and padding.

Experimental (`--parallel-graphs`, selected here with EPINFER_PARALLEL_GRAPHS=1): graphs are
released before the process group, since NCCL waits for graphs that hold its collectives;
`bash benchmarks/parallel_2gpu.sh tests` runs it."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.gpu.test_gpu_decode import PROMPTS

pytestmark = [pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
              pytest.mark.skipif(os.environ.get("EPINFER_PARALLEL_GRAPHS") != "1",
                                 reason="experimental: run with EPINFER_PARALLEL_GRAPHS=1")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dp,tp,async_scheduling,symm", [(2, 1, False, False), (1, 2, True, False),
                                                          (2, 1, True, True), (1, 2, False, True)])
def test_graphs_with_collectives_match_one_gpu(ckpt_dir, tmp_path, monkeypatch, dp, tp, async_scheduling, symm):
    """symm: the small collectives through symmetric memory (EPINFER_SYMM_MEM=1), in the graphs too."""
    from epinfer import LLM, SamplingParams
    from epinfer.engine.engine import EngineConfig
    from epinfer.runtime.job import Job
    from epinfer.runtime.launch import launch
    from epinfer.runtime.lockstep import GenerateMode

    folder = str(ckpt_dir("qwen3_moe"))
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (20, 5, 20, 9)]
    ecfg = dict(model=folder, dtype="float32", device="cuda", async_scheduling=async_scheduling)
    ref = [o.token_ids for o in LLM(**ecfg).generate(PROMPTS, params)]
    job = Job(EngineConfig(**ecfg, parallel_graphs=True), dp, tp, "agrs", "uniform", dump_dir=str(tmp_path),
              symm_mem=symm, mode=GenerateMode(PROMPTS, params))
    assert [o.token_ids for o in launch(job)] == ref
    for rank in range(dp * tp):
        lines = (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()
        header, entries = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
        replays = [e for e in entries if e["op"] == "graph"]
        assert len(replays) >= 10 and header["graphs"], f"rank {rank} replayed {len(replays)} graphs"
        assert any(e["op"] == "rendezvous" for e in entries) == symm, f"rank {rank}: symmetric buffers"
        assert any(e.get("path") == "symm" for e in entries) == symm, f"rank {rank}: symmetric collectives"
