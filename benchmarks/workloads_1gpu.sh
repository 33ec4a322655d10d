#!/usr/bin/env bash
# End-to-end workloads on ONE NVIDIA GPU (the "End-to-end workloads" section of benchmarks/RESULTS.md):
# `epinfer bench --shape qwen3.5-35b-a3b --workload W --json` (random bf16 weights, the defaults: graph
# pieces, chunk-attention kernel, cuDNN for long chunks, the mixed-step kernels, a bf16 GDN state, 16384
# tokens a step, 512 sequences, async scheduling), one run per mode:
#
#   throughput        1000 x 1024 in / 128 out
#   throughput-fp32   the same with --mamba-ssm-cache-dtype float32 (transformers' state arithmetic)
#   seqs-1024         the same with --max-num-seqs 1024 (no prefix cache, whose state snapshots would
#                     take 8 GiB, and 93 % of the GPU: the KV cache then holds the 1000 requests' 1152
#                     tokens each)
#   seqs-1024-cached  --max-num-seqs 1024 with the other defaults (prefix caching on, 0.9 of the GPU): how many
#                     requests the KV cache then admits, and the allocator's peaks against the plan
#   mixed-kernels     throughput with EPINFER_MIXED_STEP_KERNELS=0, then =1 (the SiLU-mul kernel and the
#                     conv kernel's separate q / k / v outputs), same call
#   long-context      100 x 32,000 in / 100 out
#   long-context-kv   long context at 32,768 tokens a step with 128 sequences (state slots for the
#                     sequences the KV cache can hold), then at 65,536 with 128
#   long-context-cudnn  long context at 32,768 tokens a step with 128 sequences, with cuDNN's attention for
#                     the long chunks (the default), then with EPINFER_CUDNN_CHUNKS=0, same call
#   long-context-64k  long context at 65,536 tokens a step (two whole prompts) with 128 sequences
#   long-context-fp8  the same with FP8 weights and cuDNN's long chunks (half the weight bytes: the KV
#                     cache holds about half again as many sequences)
#   startup           where a cold start-up goes (`startup_profile.py --warm`: empty Triton and
#                     TorchInductor caches, then again on the caches it left)
#   startup-preload   a cold start-up recording its kernel variants (EPINFER_RECORD_KERNELS), then a cold
#                     one with them as this GPU's manifest (`kernels.preload`): $OUT/manifest.jsonl
#   generation-heavy  200 x 1000 in / 2000 out (STATE=float32 for a float32 state)
#   serve             throughput through `epinfer serve` over HTTP, 512 concurrent streaming clients
#                     (needs the serve extra; wheels in WHEELS, default .whl, are installed offline)
#   serve-decode-64   the server's steady decode at 64 streams against the engine's: 64 requests of
#                     1000 in / 2000 out through `epinfer serve` (64 / TPOT p50 is its decode rate),
#                     then `epinfer bench --batch 64` (1000 in, 32 decode steps timed) on the same shape
#
# The first run on a fresh machine compiles every kernel (about 80 s more start-up); put a throwaway
# or a tolerant run first when comparing. Each run's step log (one JSON line a step) is NAME.steps.
#
# Usage: [OUT=DIR] bash benchmarks/workloads_1gpu.sh [MODE...]      (default: throughput throughput-fp32)
# Output: $OUT (default benchmarks/logs/workloads_1gpu/, git-ignored): NAME.jsonl (the record), NAME.log.
NAME=workloads_1gpu
source "$(dirname "$0")/common.sh"
install_wheels
S="--shape qwen3.5-35b-a3b"
run() {  # run NAME LIMIT ARGS...: one workload with its step log
  local name=$1 limit=$2; shift 2
  bench "$name" "$limit" $S "$@" --step-log "$OUT/$name.steps"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for mode in ${*:-throughput throughput-fp32}; do case $mode in
throughput)       run throughput 200 --workload throughput ;;
throughput-fp32)  run throughput_fp32 200 --workload throughput --mamba-ssm-cache-dtype float32 ;;
seqs-1024)        run seqs_1024 200 --workload throughput --max-num-seqs 1024 --no-prefix-caching \
                    --gpu-memory-utilization 0.93 ;;
seqs-1024-cached) run seqs_1024_cached 200 --workload throughput --max-num-seqs 1024 ;;
mixed-kernels)
  for k in 0 1; do EPINFER_MIXED_STEP_KERNELS=$k run "mixed_kernels$k" 200 --workload throughput; done ;;
long-context)     run long_context 300 --workload long-context ;;
long-context-kv)
  for b in 32768 65536; do run "long_context_$b" 300 --workload long-context --max-num-batched-tokens $b \
    --max-num-seqs 128; done ;;
long-context-cudnn)
  for c in 1 0; do EPINFER_CUDNN_CHUNKS=$c run "long_context_cudnn$c" 300 --workload long-context \
    --max-num-batched-tokens 32768 --max-num-seqs 128; done ;;
long-context-64k) run long_context_64k 300 --workload long-context --max-num-batched-tokens 65536 \
                    --max-num-seqs 128 ;;
long-context-fp8)
  EPINFER_CUDNN_CHUNKS=1 run long_context_fp8 300 --workload long-context --max-num-batched-tokens 32768 \
    --max-num-seqs 128 --quant fp8 ;;
startup)          step startup 400 python3 benchmarks/startup_profile.py --warm ;;
startup-preload)
  EPINFER_RECORD_KERNELS="$OUT/manifest.jsonl" step startup_record 300 python3 benchmarks/startup_profile.py
  gpu=$(python3 -c "import torch; from epinfer.kernels.preload import manifest_path as m
print(m(torch.cuda.get_device_name()))")
  mkdir -p "$(dirname "$gpu")" && cp "$OUT/manifest.jsonl" "$gpu"
  step startup_preloaded 300 python3 benchmarks/startup_profile.py
  rm -f "$gpu" ;;
generation-heavy) run generation_heavy 200 --workload generation-heavy --mamba-ssm-cache-dtype "${STATE:-auto}" ;;
serve)            bench serve 240 $S --workload throughput --serve --concurrency 512 ;;
serve-decode-64)
  bench serve_decode64 240 $S --workload generation-heavy --num-requests 64 --serve --concurrency 64
  bench bench_decode64 200 $S --batch 64 --input-len 1000 --output-len 32 ;;
*)
  echo "unknown mode $mode (throughput throughput-fp32 seqs-1024 seqs-1024-cached mixed-kernels long-context long-context-kv" \
    "long-context-cudnn long-context-64k long-context-fp8 startup startup-preload generation-heavy serve" \
    "serve-decode-64)"
  exit 2 ;;
esac; done
