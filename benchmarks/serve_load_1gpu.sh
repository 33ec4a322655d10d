#!/usr/bin/env bash
# Bounded load test of `epinfer serve` on ONE NVIDIA GPU (the "Server" section of
# benchmarks/RESULTS.md): the Qwen3-30B-A3B shape with random weights, bf16, max model length 2048,
# CACHE_GB GB of KV cache (default 30), loopback; benchmarks/serve_load.py sends 512 requests of
# random token ids for 64 tokens each at concurrency 64, for at most 120 s. ASYNC=1 adds
# --async-scheduling to the server.
#
# Needs the serve extra (pip install -e ".[serve]": fastapi, uvicorn, pydantic). On a machine without
# network, put their wheels in WHEELS (default .whl in the repository root): they are installed, offline,
# into $SCRATCH/site.
#
# Usage: [OUT=DIR] [ASYNC=1] bash benchmarks/serve_load_1gpu.sh
# Output: $OUT/serve_load.log (default benchmarks/logs/serve_load_1gpu/, git-ignored): the server's log
# and the load test's summary (requests/s, tokens/s, latency and time-to-first-token percentiles).
NAME=serve_load_1gpu
source "$(dirname "$0")/common.sh"
install_wheels
model=$(shape_folder qwen3-30b-a3b)
flags="--model $model --random-weights --dtype bfloat16 --max-model-len 2048 --cache-memory-gb ${CACHE_GB:-30}"
[ "${ASYNC:-0}" = 1 ] && flags="$flags --async-scheduling"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
step serve_load 300 python3 benchmarks/serve_load.py --serve "$flags" --token-prompts --requests 512 \
  --concurrency 64 --max-tokens 64 --max-seconds 120
tail -5 "$OUT/serve_load.log"
