#!/usr/bin/env bash
# Kernel tile sweeps on ONE NVIDIA GPU, every candidate timed as a whole call replayed in a CUDA graph
# (the "Kernel sweeps" section of benchmarks/RESULTS.md):
#
#   moe        the decode MoE expert kernels against the cuBLAS grouped GEMM, one layer of SHAPE
#              (default qwen3-30b-a3b) at MOE_BATCHES rows (default: the sweep's own list;
#              e.g. MOE_BATCHES=1,4,16); the chosen table is written to $OUT/moe_table.json, then
#              `epinfer bench` batch 1 and 64 (async) runs with it (EPINFER_MOE_CONFIGS); QUANT=fp8: the
#              FP8 expert kernels' table
#   gemv       decode-size projections: the small-rows Triton GEMM against cuBLAS (benchmarks/gemv_sweep.py)
#   attention  decode attention split count and tiles per batch size (benchmarks/attention_sweep.py)
#   prefill-attention  prompt-chunk attention tiles at a long-context step (benchmarks/prefill_attention_sweep.py)
#   gdn-decode the GDN decode kernel's block layouts, float32 and bf16 state (benchmarks/gdn_decode_sweep.py)
#   mixed      a mixed step's SiLU-mul and varlen conv kernels: tiles, the conv's planar output, inductor's
#              SiLU-mul (benchmarks/mixed_kernel_sweep.py)
#   fp8-gemm   prefill-size FP8 projections: bf16 cuBLAS, the Triton FP8 kernel and cuBLAS's block-scaled
#              FP8 GEMM (EPINFER_FP8_CUBLAS); whether F.scaled_grouped_mm takes block scales
#              (benchmarks/fp8_gemm_sweep.py)
#   moe-prefill the expert kernels at prefill sizes (2048 / 8192 / 16384 rows), FP8 then bf16, against cuBLAS's
#              bf16 grouped GEMM; the best tiles timed again with "n_fast" (moe_kernel_sweep.py); SPLIT=N: the
#              tiles searched with a group's row blocks shared by programs of about N blocks each
#   fp8-decode decode-size FP8: the projections at 1 and 64 rows (one-row gemv, w16 and quantised tiles,
#              split K, cuBLAS; benchmarks/fp8_gemm_sweep.py --decode 1,64) and the one-row experts on
#              the CUDA cores (moe_kernel_sweep.py --quant fp8 --gemv wide), then `epinfer bench --quant
#              fp8` batch 1 with that per-pair table
#
# Usage: [OUT=DIR] bash benchmarks/kernel_sweeps_1gpu.sh [MODE...]      (default: moe gemv attention)
# Output: $OUT (default benchmarks/logs/kernel_sweeps_1gpu/, git-ignored): NAME.log per sweep (one JSON
# record per configuration measured), moe_table.json, and the bench records moe_table_bench.jsonl.
NAME=kernel_sweeps_1gpu
source "$(dirname "$0")/common.sh"
SHAPE=${SHAPE:-qwen3-30b-a3b}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
for mode in ${*:-moe gemv attention}; do case $mode in
moe)
  step moe_sweep 300 python3 benchmarks/moe_kernel_sweep.py --shape "$SHAPE" ${MOE_BATCHES:+--batches $MOE_BATCHES} \
    --out "$OUT/moe_table.json" ${QUANT:+--quant $QUANT}
  grep -v "^#" "$OUT/moe_sweep.log" | cut -c1-250
  EPINFER_MOE_CONFIGS=$OUT/moe_table.json bench moe_table_bench 150 --shape "$SHAPE" --batch 1 --batch 64 \
    --input-len 1024 --output-len 32 --async-scheduling ${QUANT:+--quant $QUANT} ;;
gemv)
  step gemv_sweep 150 python3 benchmarks/gemv_sweep.py
  grep -v "^#" "$OUT/gemv_sweep.log" | cut -c1-230 ;;
attention)
  step attention_sweep 150 python3 benchmarks/attention_sweep.py
  cut -c1-300 "$OUT/attention_sweep.log" ;;
prefill-attention)
  step prefill_attention_sweep 150 python3 benchmarks/prefill_attention_sweep.py
  cut -c1-300 "$OUT/prefill_attention_sweep.log" ;;
gdn-decode)
  step gdn_decode_sweep 300 python3 benchmarks/gdn_decode_sweep.py
  cut -c1-200 "$OUT/gdn_decode_sweep.log" ;;
mixed)
  step mixed_kernel_sweep 240 python3 benchmarks/mixed_kernel_sweep.py
  cut -c1-220 "$OUT/mixed_kernel_sweep.log" ;;
fp8-gemm)
  step fp8_gemm_sweep 150 python3 benchmarks/fp8_gemm_sweep.py
  cut -c1-220 "$OUT/fp8_gemm_sweep.log" ;;
moe-prefill)
  for q in fp8 bf16; do
    step "moe_prefill_$q" 300 python3 benchmarks/moe_kernel_sweep.py --shape "$SHAPE" --batches 2048,8192,16384 \
      --block-m 64,128 --out "$OUT/moe_prefill_$q.json" $([ $q = fp8 ] && echo --quant fp8) ${SPLIT:+--split $SPLIT}
    grep -v "^#" "$OUT/moe_prefill_$q.log" | cut -c1-330
  done ;;
fp8-decode)
  step fp8_decode_sweep 300 python3 benchmarks/fp8_gemm_sweep.py --decode 1,64
  grep best_over "$OUT/fp8_decode_sweep.log" | cut -c1-400
  step fp8_pair_sweep 150 python3 benchmarks/moe_kernel_sweep.py --shape "$SHAPE" --quant fp8 --gemv wide --batches 1 \
    --out "$OUT/fp8_pair_table.json"
  grep -v "^#" "$OUT/fp8_pair_sweep.log" | cut -c1-300
  python3 -c "import json, sys; t = json.load(open(sys.argv[1])); t['fp8_per_pair'].pop('max_pairs', None)
json.dump(t, open(sys.argv[1], 'w'))" "$OUT/fp8_pair_table.json"
  EPINFER_MOE_CONFIGS=$OUT/fp8_pair_table.json bench fp8_pair_bench 150 --shape "$SHAPE" --batch 1 --input-len 1024 \
    --output-len 32 --quant fp8 ;;
*)
  echo "unknown mode $mode (moe gemv attention prefill-attention gdn-decode mixed fp8-gemm fp8-decode moe-prefill)"; exit 2 ;;
esac; done
