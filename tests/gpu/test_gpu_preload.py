"""The kernel manifest (`kernels.preload`) on a GPU: a run recorded with EPINFER_RECORD_KERNELS, then a
new process with that manifest: its engine compiles the recorded variants on its threads before the
first launch, no launch compiles one of them again, and the tokens are the recording run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RUN = r"""
import json, sys
from pathlib import Path
from triton import knobs
from epinfer import LLM, SamplingParams
from epinfer.kernels import preload

folder, manifests = sys.argv[1:3]
if manifests != "-":
    preload.MANIFESTS = Path(manifests)
launched = []  # the specializations compiled by a launch, not by the preload
if manifests != "-":
    knobs.runtime.jit_post_compile_hook = lambda **k: None if k["is_manual_warmup"] else launched.append(
        k["compile"]["specialization_data"])
llm = LLM(folder, dtype="bfloat16", device="cuda", random_weights=True, max_model_len=2048,
          max_num_batched_tokens=1024)
prompts = [[(7 * i + j) % 1000 + 1 for j in range(n)] for i, n in enumerate((5, 300, 1500))]
out = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
print(json.dumps({"tokens": [o.token_ids for o in out], "preloaded": llm.engine.kernels_preloaded,
                  "launched": launched}))
"""


def run(folder, manifests: str, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUN, str(folder), manifests], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_recorded_variants_compile_before_the_first_launch(tmp_path):
    from epinfer.bench.single import shape_folder
    from epinfer.kernels.preload import manifest_path, variants

    (tmp_path / "shape").mkdir()
    folder = shape_folder("qwen3.5-35b-a3b", 2, str(tmp_path / "shape"))
    recorded = tmp_path / "recorded.jsonl"
    first = run(folder, "-", {"EPINFER_RECORD_KERNELS": str(recorded)})
    import triton

    items = variants(recorded, triton.__version__)
    names = {name for _, name, _ in items}
    assert len(items) >= 10 and any(m.startswith("epinfer.") for m, _, _ in items), names
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    gpu = manifest_path(torch.cuda.get_device_name()).name
    (manifests / gpu).write_text(recorded.read_text())
    second = run(folder, str(manifests), {})
    assert second["preloaded"] == len(items), (second["preloaded"], len(items))
    again = [d for d in second["launched"] if any(d == data for _, _, data in items)]
    assert not again, [json.loads(d)["name"] for d in again]
    assert second["tokens"] == first["tokens"]
