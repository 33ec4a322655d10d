#!/usr/bin/env bash
# Issue 5 on one GPU: the GPU correctness tests, then `epinfer bench` (graphs vs eager) on the
# Qwen3-30B-A3B shape. Logs under $OUT (or ./gpu-logs). Usage: bash benchmarks/gpu_speed_check.sh [LAYERS] [BATCHES...]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=. PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
LAYERS=${1:-8}; shift || true
BATCHES=${*:-1 64}
BARGS=$(for b in $BATCHES; do printf -- "--batch %s " "$b"; done)
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 420 python -m pytest -q -p no:cacheprovider -s tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
for mode in "" "--enforce-eager"; do
  timeout 300 python -m epinfer bench --shape qwen3-30b-a3b --layers "$LAYERS" $BARGS --input-len 1024 \
    --output-len 32 $mode 2>&1 | tee -a "$OUT/bench.log"
done
