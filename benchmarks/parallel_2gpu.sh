#!/usr/bin/env bash
# Data-, tensor- and expert-parallel runs on TWO NVIDIA GPUs of one host (NCCL): tokens identical to
# one GPU, collective latency, and speed at the Qwen3-30B-A3B shape against one GPU of the same host
# (the "Multi-GPU" section of benchmarks/RESULTS.md). Every run is bounded; a stalled parallel run
# dumps every thread's Python stack after 40 s.
#
# Settings (environment):
#   EPINFER_PARALLEL_GRAPHS  1 (default): decode steps with the MoE / TP collectives replay CUDA
#                            graphs; 0: parallel runs decode eagerly
#   ASYNC                    1 (default): --async-scheduling for the benches; 0: synchronous loop
#   SHAPE                    bench shape, default qwen3-30b-a3b
#
#   check        tiny float32 checkpoints (qwen3_5_moe, qwen3_moe): DP=2 EP=2 and TP=2 EP=2 x
#                agrs / alltoall / naive x uniform / none padding, tokens compared with one GPU
#                (benchmarks/gpu_parallel_check.py), with async scheduling on and off (CHECK_ASYNC="1 0")
#   tests        tests/gpu/test_gpu_symmetric.py and tests/gpu/test_gpu_parallel.py
#   comm         per-call latency of the dispatch / combine collectives at decode sizes: NCCL in and
#                out of CUDA graphs, PyTorch symmetric memory (benchmarks/comm_sweep.py)
#   speed        one GPU batch 1 / 64, DP=2 EP=2 global batch 2 / 128, TP=2 EP=2 batch 1; the DP=2
#                and TP=2 runs also write their profiled steps as Chrome traces ($OUT/traces.tgz)
#   imbalance    DP=2 with replicas of 64 and 8 requests, --dp-padding uniform and none
#   dispatchers  DP=2 global batch 2 / 128 with --dispatch alltoall and naive (agrs is in `speed`)
#   tp-no-ep     TP=2 batch 1 with --no-expert-parallel (TP-sharded experts), with a trace
#   hybrid       Qwen3.5-35B-A3B shape, DP=2 EP=2 global batch 2 / 128
#   symm         EPINFER_SYMM_MEM=1 (symmetric memory instead of NCCL for the small collectives):
#                DP=2 global batch 2 / 128, TP=2 batch 1, and the token check
#   probe        c10d all-gather + reduce-scatter captured in a CUDA graph alone, in thread-local and
#                global capture mode and with NCCL_GRAPH_REGISTER=0, then epinfer itself
#                (benchmarks/nccl_graph_probe.py)
#
# Usage: [OUT=DIR] bash benchmarks/parallel_2gpu.sh [MODE...]      (default: check speed)
# Output: $OUT (default benchmarks/logs/parallel_2gpu/, git-ignored): NAME.log per run, NAME.jsonl with
# the `epinfer bench --json` records (per-rank breakdown, collective times, skew, pad waste),
# traces.tgz. The summary lines are printed as each run ends.
NAME=parallel_2gpu
source "$(dirname "$0")/common.sh"
export EPINFER_PARALLEL_GRAPHS=${EPINFER_PARALLEL_GRAPHS:-1}
SHAPE=${SHAPE:-qwen3-30b-a3b}
IO="--input-len 1024 --output-len 32"
[ "${ASYNC:-1}" = 1 ] && IO="$IO --async-scheduling"
CK=$SCRATCH/ckpts
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
check() {  # check NAME CKPT_FAMILY...: the token check with async scheduling on and off
  local name=$1 a; shift
  tiny_checkpoints "$@"
  for a in ${CHECK_ASYNC:-1 0}; do
    ASYNC=$a step "${name}_async$a" 300 python3 benchmarks/gpu_parallel_check.py "${@/#/$CK/}"
  done
}
for mode in ${*:-check speed}; do case $mode in
check)
  check check qwen3_5_moe qwen3_moe ;;
tests)
  step tests 270 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_symmetric.py tests/gpu/test_gpu_parallel.py ;;
comm)
  step comm_sweep 90 python3 benchmarks/comm_sweep.py ;;
speed)
  first=${CUDA_VISIBLE_DEVICES:-0}; first=${first%%,*}
  CUDA_VISIBLE_DEVICES=$first bench one_gpu 150 --shape "$SHAPE" --batch 1 --batch 64 $IO
  bench dp2 150 --shape "$SHAPE" --dp 2 --batch 2 --batch 128 $IO --trace "$OUT/tr_dp2"
  bench tp2 120 --shape "$SHAPE" --tp 2 --batch 1 $IO --trace "$OUT/tr_tp2" ;;
imbalance)
  for pad in uniform none; do
    bench "imbalance_$pad" 150 --shape "$SHAPE" --dp 2 --replica-batch 64,8 --dp-padding $pad $IO
  done ;;
dispatchers)
  for d in alltoall naive; do
    bench "dp2_$d" 150 --shape "$SHAPE" --dp 2 --batch 2 --batch 128 --dispatch $d $IO
  done ;;
tp-no-ep)
  bench tp2_no_ep 120 --shape "$SHAPE" --tp 2 --batch 1 --no-expert-parallel $IO --trace "$OUT/tr_tp2_no_ep" ;;
hybrid)
  bench dp2_hybrid 200 --shape qwen3.5-35b-a3b --dp 2 --batch 2 --batch 128 $IO ;;
symm)
  EPINFER_SYMM_MEM=1 bench dp2_symm 150 --shape "$SHAPE" --dp 2 --batch 2 --batch 128 $IO
  EPINFER_SYMM_MEM=1 bench tp2_symm 120 --shape "$SHAPE" --tp 2 --batch 1 $IO
  EPINFER_SYMM_MEM=1 CHECK_ASYNC=1 check check_symm qwen3_5_moe qwen3_moe ;;
probe)
  tiny_checkpoints qwen3_moe
  step probe_thread_local 100 python3 benchmarks/nccl_graph_probe.py --mode thread_local
  step probe_global 100 python3 benchmarks/nccl_graph_probe.py --mode global
  step probe_no_register 100 python3 benchmarks/nccl_graph_probe.py --graph-register 0
  step probe_epinfer 120 python3 benchmarks/nccl_graph_probe.py --epinfer "$CK/qwen3_moe" ;;
*)
  echo "unknown mode $mode (check tests comm speed imbalance dispatchers tp-no-ep hybrid symm probe)"; exit 2 ;;
esac; done
if ls -d "$OUT"/tr_* > /dev/null 2>&1; then  # every rank's profiled steps, one trace per run and batch
  (cd "$OUT" && tar czf traces.tgz tr_* && rm -rf tr_*)
fi
