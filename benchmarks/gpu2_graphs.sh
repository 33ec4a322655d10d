#!/usr/bin/env bash
# Issue 6 on 2 GPUs of one machine, device calls of under 10 minutes: do graphs with the MoE
# collectives inside work now (graphs released before the process group; see RESULTS.md, session 5),
# then what they buy. Every run is bounded; a hang dumps every thread's stack after 40 s.
#   a: collective latency (NCCL in / out of graphs vs symmetric memory: comm_sweep.py);
#      tests/gpu/test_gpu_parallel.py (graphs, NCCL and EPINFER_SYMM_MEM=1); gpu_parallel_check.py with
#      graphs and async scheduling, every dispatcher and padding
#   b: Qwen3-30B-A3B shape, async scheduling: one GPU b1/b64, DP=2 b2/b128, TP=2 b1, imbalance 64/8
#   c: b's DP=2 and TP=2 runs with EPINFER_SYMM_MEM=1, and the parallel check with it
#   d: the c10d probe alone (capture, 3 replays, destroy), if a hangs
#   e: what a and c left in session 8 (symm test, qwen3_moe checks, DP/TP with symm)
#   f: after a dispatcher / MoE kernel change: its GPU tests, one GPU b1/b64, DP=2, TP=2, agrs check
#   g: alltoall / naive vs agrs at the real shape, imbalance with none, TP=2 b1 with and without EP
# f and g write the DP=2 / TP=2 runs' profiled steps as Chrome traces, both ranks in one file ($OUT/traces.tgz)
# Usage: OUT=dir bash benchmarks/gpu2_graphs.sh a|b|c|d|e|f|g   (logs: $OUT/*.log, records: $OUT/records.jsonl)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=. PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore EPINFER_PARALLEL_GRAPHS=1
OUT=${OUT:-/tmp/gpu2}; mkdir -p "$OUT"
B="python3 -m epinfer bench --shape qwen3-30b-a3b --input-len 1024 --output-len 32 --json --async-scheduling"
checkpoints() {
  python3 -c "from tests.checkpoints import make_checkpoint
for f in ('qwen3_5_moe', 'qwen3_moe'): make_checkpoint(f, '/tmp/ck/' + f)"
}
step() {  # step NAME LIMIT COMMAND...: bounded, logged, exit code printed
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date +%T))"
  EPINFER_STACKS_AFTER=40 timeout -k 15 -s INT "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name exit $?"; grep -h "^epinfer bench\|^\[rank\|passed\|failed\|identical\|DIFF\|stuck\|did not" "$OUT/$name.log" | cut -c1-200 | tail -12
}
case ${1:-a} in
a)
  checkpoints
  step comm_sweep 90 python3 benchmarks/comm_sweep.py
  step test_gpu_parallel 270 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_symmetric.py tests/gpu/test_gpu_parallel.py
  ASYNC=1 step parallel_check 200 python3 benchmarks/gpu_parallel_check.py /tmp/ck/qwen3_5_moe /tmp/ck/qwen3_moe ;;
b)
  CUDA_VISIBLE_DEVICES=0 step one_gpu 100 $B --batch 1 --batch 64
  step dp2 120 $B --dp 2 --batch 2 --batch 128
  step tp2 90 $B --tp 2 --batch 1
  step imb_uniform 90 $B --dp 2 --replica-batch 64,8 --dp-padding uniform
  step imb_none 90 $B --dp 2 --replica-batch 64,8 --dp-padding none
  grep -h "^{" "$OUT"/one_gpu.log "$OUT"/dp2.log "$OUT"/tp2.log "$OUT"/imb_*.log > "$OUT/records.jsonl" ;;
c)
  checkpoints
  export EPINFER_SYMM_MEM=1
  step dp2_symm 120 $B --dp 2 --batch 2 --batch 128
  step tp2_symm 90 $B --tp 2 --batch 1
  ASYNC=1 step parallel_check_symm 220 python3 benchmarks/gpu_parallel_check.py /tmp/ck/qwen3_5_moe /tmp/ck/qwen3_moe
  grep -h "^{" "$OUT"/dp2_symm.log "$OUT"/tp2_symm.log > "$OUT/records.jsonl" ;;
e)  # what a and c left: the symmetric-memory test, the qwen3_moe check (NCCL and symm), DP/TP with symm
  checkpoints
  step test_gpu_symmetric 90 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_symmetric.py
  ASYNC=1 step parallel_check 150 python3 benchmarks/gpu_parallel_check.py /tmp/ck/qwen3_moe
  export EPINFER_SYMM_MEM=1
  step dp2_symm 100 $B --dp 2 --batch 2 --batch 128
  step tp2_symm 60 $B --tp 2 --batch 1
  ASYNC=1 step parallel_check_symm 150 python3 benchmarks/gpu_parallel_check.py /tmp/ck/qwen3_moe
  grep -h "^{" "$OUT"/dp2_symm.log "$OUT"/tp2_symm.log > "$OUT/records.jsonl" ;;
f)  # after a dispatcher / MoE kernel change: its GPU tests, the targets, the parallel check for agrs
  checkpoints
  step tests 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_parallel.py \
    tests/gpu/test_gpu_decode.py -k "graphs_with_collectives or grouped_moe or router"
  CUDA_VISIBLE_DEVICES=0 step one_gpu 100 $B --batch 1 --batch 64
  step dp2 100 $B --dp 2 --batch 2 --batch 128 --trace "$OUT/tr_dp2"
  step tp2 60 $B --tp 2 --batch 1 --trace "$OUT/tr_tp2"
  ASYNC=1 DISPATCH=agrs step parallel_check 150 python3 benchmarks/gpu_parallel_check.py /tmp/ck/qwen3_5_moe /tmp/ck/qwen3_moe
  grep -h "^{" "$OUT"/one_gpu.log "$OUT"/dp2.log "$OUT"/tp2.log > "$OUT/records.jsonl" ;;
g)  # still to measure: alltoall / naive vs agrs at the real shape, the imbalance without padding,
    # TP=2 b1 with EP and with TP-sharded experts (2 collectives a layer instead of 4)
  step dp2_alltoall 120 $B --dp 2 --batch 2 --batch 128 --dispatch alltoall
  step dp2_naive 120 $B --dp 2 --batch 2 --batch 128 --dispatch naive
  step imb_none 90 $B --dp 2 --replica-batch 64,8 --dp-padding none
  step tp2 60 $B --tp 2 --batch 1 --trace "$OUT/tr_tp2"
  step tp2_no_ep 60 $B --tp 2 --batch 1 --no-expert-parallel --trace "$OUT/tr_tp2_no_ep"
  grep -h "^{" "$OUT"/dp2_*.log "$OUT"/imb_none.log "$OUT"/tp2*.log > "$OUT/records.jsonl" ;;
d)
  checkpoints
  step probe 90 python3 benchmarks/nccl_graph_probe.py --epinfer /tmp/ck/qwen3_moe ;;
esac
if ls -d "$OUT"/tr_* > /dev/null 2>&1; then  # every rank's profiled steps, one trace per run and batch (--trace)
  (cd "$OUT" && tar czf traces.tgz tr_* && rm -rf tr_*)
fi
grep -h "^epinfer bench" "$OUT"/*.log | cut -c1-200
