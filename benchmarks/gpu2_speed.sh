#!/usr/bin/env bash
# Issues 6 and 7 on 2 GPUs (NCCL). Sections (default all): correctness | scaling | imbalance | serve
#   correctness: tiny float32 checkpoints, dp=2 / tp=2 x dispatchers x paddings, async off and on,
#                tokens identical to one GPU (benchmarks/gpu_parallel_check.py)
#   scaling:     Qwen3-30B-A3B 48 layers bf16: 1 GPU batch 1 / 64 vs DP=2 EP=2 global 2 / 128 and
#                TP=2 EP=2 batch 1 (epinfer bench, same machine, per-rank breakdown)
#   imbalance:   replicas with 64 and 8 requests, --dp-padding uniform vs none
#   serve:       epinfer serve on one GPU, Qwen3-30B-A3B shape with random weights, bounded load test
# Usage: bash benchmarks/gpu2_speed.sh OUTDIR [SECTION...]
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=. PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
out=${1:-/tmp/gpu2}; shift || true; mkdir -p "$out"
sections=${*:-correctness scaling imbalance serve}
B="python3 -m epinfer bench --shape qwen3-30b-a3b --input-len 1024 --output-len 32"
for s in $sections; do case $s in
correctness)
  python3 -c "
from tests.checkpoints import make_checkpoint
for f in ('qwen3_5_moe', 'qwen3_next', 'qwen3_moe'):
    make_checkpoint(f, '$out/ckpts/' + f)" > /dev/null 2>&1
  for a in 0 1; do
    ASYNC=$a timeout 300 python3 benchmarks/gpu_parallel_check.py "$out/ckpts/qwen3_5_moe" "$out/ckpts/qwen3_moe" \
      > "$out/parallel_async$a.log" 2>&1; echo "parallel check async=$a exit $?"; tail -3 "$out/parallel_async$a.log"
  done ;;
scaling)
  CUDA_VISIBLE_DEVICES=0 timeout 200 $B --batch 1 --batch 64 --json > "$out/one_gpu.jsonl" 2> "$out/one_gpu.err"
  timeout 200 $B --dp 2 --batch 2 --batch 128 > "$out/dp2.jsonl" 2> "$out/dp2.err"
  timeout 150 $B --tp 2 --batch 1 > "$out/tp2.jsonl" 2> "$out/tp2.err"
  grep -h "^epinfer bench" "$out"/one_gpu.err "$out"/dp2.err "$out"/tp2.err ;;
imbalance)
  for pad in uniform none; do
    timeout 150 $B --dp 2 --replica-batch 64,8 --dp-padding $pad > "$out/imb_$pad.jsonl" 2> "$out/imb_$pad.err"
    grep -h "^epinfer bench" "$out/imb_$pad.err"
  done ;;
serve)
  mkdir -p "$out/shape" && cp epinfer/shapes/qwen3-30b-a3b.json "$out/shape/config.json"
  timeout 300 python3 benchmarks/serve_load.py --serve "--model $out/shape --random-weights --dtype bfloat16 \
    --max-model-len 2048" --token-prompts --requests 512 --concurrency 64 --max-tokens 64 --max-seconds 120 \
    > "$out/serve.log" 2>&1; tail -5 "$out/serve.log" ;;
esac; done
