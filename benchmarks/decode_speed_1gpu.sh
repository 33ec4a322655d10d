#!/usr/bin/env bash
# Single-GPU decode and prefill speed, and the GPU correctness tests, on ONE NVIDIA GPU: `epinfer bench`
# at the Qwen3-30B-A3B and Qwen3.5-35B-A3B shapes (all layers unless LAYERS is set, bf16, random
# weights, prompts of 1024 tokens, 32 decode steps timed). The figures of benchmarks/RESULTS.md
# ("Single-GPU decode", "Prefill") come from these modes.
#
#   targets          Qwen3-30B-A3B batch 1 / 64 / 256, async scheduling, plus transformers `generate`
#                    on the same shape (--compare-hf)
#   tests            pytest tests/gpu (kernels, CUDA graphs, bf16 logits against transformers)
#   hybrid           Qwen3.5-35B-A3B batch 1 / 64, async scheduling
#   fp8-ratios       Qwen3-30B-A3B batch 1 / 64 in bf16, then in FP8 (--output-len 40): the FP8 / bf16
#                    decode ratios at batch 1 and 64 and the prefill ratio at 64 x 1024 (RESULTS.md §1.5)
#   workload-decode  Qwen3.5-35B-A3B decode steps at the end-to-end workloads' sizes, each with its
#                    breakdown: batch 200 at 2000 tokens of context (generation heavy), 512 and 1000 at
#                    1100 (throughput at 512 and 1024 sequences); QUANT=fp8 for FP8 weights
#   prefill          Qwen3-30B-A3B prefill of 8 x 2048 tokens
#   prefill-profile  where one 8 x 2048 prefill step's time goes (benchmarks/prefill_profile.py;
#                    LAYERS layers, default 48)
#   mixed-profile    where a mixed step of the throughput profile goes (Qwen3.5-35B-A3B, 16384 rows with
#                    480 decodes; benchmarks/mixed_step_profile.py; STATE=float32 for a float32 GDN state,
#                    QUANT=fp8 for FP8 weights)
#   fp8-load         a 31 GB Qwen3-30B-A3B FP8 checkpoint (as Qwen publishes them) written to local disk,
#                    the page cache dropped, then loaded: GB/s and first token (benchmarks/fp8_load.py)
#   pdl              Qwen3-30B-A3B batch 1 / 64, async, with EPINFER_PDL=0 and 1 (programmatic
#                    dependent launch off / on)
#   pdl-preload      Qwen3-30B-A3B batch 1 with EPINFER_PDL_PRELOAD=0 and 1 (one-row projections, the
#                    router and the FP8 experts' down kernel loading their weights before their PDL wait);
#                    QUANT=fp8 for FP8 weights
#   graphs-vs-eager  Qwen3-30B-A3B, LAYERS layers (default 8), BATCHES (default "1 64"): CUDA graphs
#                    against --enforce-eager
#
# Usage: [OUT=DIR] bash benchmarks/decode_speed_1gpu.sh [MODE...]      (default: targets tests)
# Output: $OUT (default benchmarks/logs/decode_speed_1gpu/, git-ignored): per run NAME.jsonl (the
# `epinfer bench --json` records, one per batch) and NAME.log (progress, summary lines, test output).
# The summary lines are printed as each run ends.
NAME=decode_speed_1gpu
source "$(dirname "$0")/common.sh"
install_wheels  # fla-core (the GDN prefill kernels of the hybrid shape), where its wheel is in .whl
IO="--input-len 1024 --output-len 32"
LAYER_ARGS=${LAYERS:+--layers $LAYERS}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
for mode in ${*:-targets tests}; do case $mode in
targets)
  bench targets 330 --shape qwen3-30b-a3b $LAYER_ARGS --batch 1 --batch 64 --batch 256 $IO --async-scheduling --compare-hf ;;
tests)
  step tests "${TESTS_LIMIT:-420}" python3 -m pytest -q -p no:cacheprovider tests/gpu
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head ;;
hybrid)
  bench hybrid 200 --shape qwen3.5-35b-a3b $LAYER_ARGS --batch 1 --batch 64 $IO --async-scheduling ;;
fp8-ratios)
  for q in bf16 fp8; do
    bench "ratios_$q" 200 --shape qwen3-30b-a3b $LAYER_ARGS --batch 1 --batch 64 --input-len 1024 --output-len 40 \
      $([ $q = fp8 ] && echo --quant fp8)
  done ;;
workload-decode)
  bench "workload_decode_200${QUANT:+_$QUANT}" 200 --shape qwen3.5-35b-a3b $LAYER_ARGS --batch 200 --input-len 2000 \
    --output-len 40 --async-scheduling ${QUANT:+--quant $QUANT}
  bench "workload_decode_1000${QUANT:+_$QUANT}" 240 --shape qwen3.5-35b-a3b $LAYER_ARGS --batch 512 --batch 1000 \
    --input-len 1100 --output-len 40 --async-scheduling --gpu-memory-utilization 0.93 ${QUANT:+--quant $QUANT} ;;
prefill)
  bench prefill 150 --shape qwen3-30b-a3b $LAYER_ARGS --batch 8 --input-len 2048 --output-len 16 ;;
prefill-profile)
  step prefill_profile 150 python3 benchmarks/prefill_profile.py --layers "${LAYERS:-48}" --batch 8 --len 2048 ;;
mixed-profile)
  step "mixed_profile${QUANT:+_$QUANT}" 300 python3 benchmarks/mixed_step_profile.py --state-dtype "${STATE:-auto}" \
    ${QUANT:+--quant $QUANT} ;;
fp8-load)
  step fp8_load 500 python3 benchmarks/fp8_load.py --dir "$SCRATCH/fp8-ckpt" ;;
pdl)
  for p in 0 1; do
    EPINFER_PDL=$p bench "pdl$p" 150 --shape qwen3-30b-a3b $LAYER_ARGS --batch 1 --batch 64 $IO --async-scheduling
  done ;;
pdl-preload)
  for p in 0 1; do
    EPINFER_PDL_PRELOAD=$p bench "preload$p" 120 --shape qwen3-30b-a3b $LAYER_ARGS --batch 1 $IO ${QUANT:+--quant $QUANT}
  done ;;
graphs-vs-eager)
  BARGS=$(for b in ${BATCHES:-1 64}; do printf -- "--batch %s " "$b"; done)
  bench graphs 300 --shape qwen3-30b-a3b --layers "${LAYERS:-8}" $BARGS $IO
  bench eager 300 --shape qwen3-30b-a3b --layers "${LAYERS:-8}" $BARGS $IO --enforce-eager ;;
*)
  echo "unknown mode $mode (targets tests hybrid fp8-ratios workload-decode prefill prefill-profile mixed-profile fp8-load pdl pdl-preload graphs-vs-eager)"
  exit 2 ;;
esac; done
