#!/usr/bin/env bash
# Issue 5 (and 7) on one GPU, two device calls of under 10 minutes:
#   a: the GPU tests, then the 30B targets in one run with async scheduling and transformers
#   b: the hybrid at batch 64 (async), prefill 8 x 2048, the serve load test with async scheduling
#      (needs the .whl wheels: carry [".whl"])
# Usage: OUT=dir bash benchmarks/gpu1_issue5.sh a|b   (logs: $OUT/*.log, records: $OUT/*.jsonl)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=. PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/gpu1}; mkdir -p "$OUT"
B="python3 -m epinfer bench --input-len 1024 --output-len 32 --json"
nvidia-smi --query-gpu=name --format=csv,noheader
case ${1:-a} in
a)
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu > "$OUT/tests.log" 2>&1; echo "pytest exit $?"
tail -1 "$OUT/tests.log"
timeout 330 $B --shape qwen3-30b-a3b --batch 1 --batch 64 --batch 256 --async-scheduling --compare-hf \
  > "$OUT/b30_async_hf.jsonl" 2> "$OUT/b30_async_hf.log"; echo "bench exit $?"
  ;;
b)
timeout 120 $B --shape qwen3.5-35b-a3b --batch 64 --async-scheduling > "$OUT/b35_async.jsonl" 2> "$OUT/b35_async.log"
timeout 100 python3 -m epinfer bench --shape qwen3-30b-a3b --batch 8 --input-len 2048 --output-len 16 --json \
  > "$OUT/prefill.jsonl" 2> "$OUT/prefill.log"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  mkdir -p /tmp/shape && cp epinfer/shapes/qwen3-30b-a3b.json /tmp/shape/config.json
  PYTHONPATH=.:/tmp/site timeout 200 python3 benchmarks/serve_load.py --serve '--model /tmp/shape --random-weights \
    --dtype bfloat16 --max-model-len 2048 --cache-memory-gb 30 --async-scheduling' --token-prompts --requests 512 \
    --concurrency 64 --max-tokens 64 --max-seconds 120 > "$OUT/serve_async.log" 2>&1; tail -1 "$OUT/serve_async.log"
fi ;;
esac
grep -h "^epinfer bench" "$OUT"/*.log | cut -c1-200
