#!/usr/bin/env bash
# The field report's topology on FOUR NVIDIA GPUs of one host: TP=2, DP=2, EP=4 over NCCL (the
# "Multi-GPU" and "Diagnostics" sections of benchmarks/RESULTS.md).
#  1. tiny float32 checkpoints (qwen3_5_moe, qwen3_next, qwen3_moe), every dispatcher x padding at
#     --dp 2 --tp 2: tokens identical to one GPU (benchmarks/gpu_parallel_check.py, LAYOUTS=2x2)
#  2. --fault skip-collective on rank 2 (step 3) and --fault kill on rank 3 (step 2), each diagnosed
#     by `epinfer doctor --json`
#  3. Qwen3.5-35B-A3B shape (40 layers, bf16, random weights): `epinfer bench --dp 2 --tp 2` at global
#     batch 2 / 64 / 256 (per-rank breakdown, pad waste, skew), then one GPU of the same host at the
#     same batches (SKIP_ONE_GPU=1 leaves that out)
# EPINFER_PARALLEL_GRAPHS=1 in the environment makes the parallel runs replay CUDA graphs.
#
# Usage: [OUT=DIR] bash benchmarks/field_report_topology_4gpu.sh
# Output: $OUT (default benchmarks/logs/field_report_topology_4gpu/, git-ignored): parallel_check.log,
# per fault FAULT.log and the dump folder FAULT/, bench_dp2tp2.jsonl / .log, bench_1gpu.jsonl / .log.
NAME=field_report_topology_4gpu
source "$(dirname "$0")/common.sh"
CK=$SCRATCH/ckpts
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
tiny_checkpoints qwen3_5_moe qwen3_next qwen3_moe
LAYOUTS=2x2 step parallel_check 300 python3 benchmarks/gpu_parallel_check.py "$CK/qwen3_5_moe" "$CK/qwen3_next" "$CK/qwen3_moe"
grep -v "^(" "$OUT/parallel_check.log" | tail -22
printf '{"prompt_token_ids": [1, 2, 3, 4, 5]}\n{"prompt_token_ids": [9, 8, 7]}\n{"prompt_token_ids": [40, 41]}\n' > "$OUT/p.jsonl"
for f in "skip-collective 2 3" "kill 3 2"; do
  set -- $f
  rm -rf "${OUT:?}/$1"
  timeout 120 python3 -m epinfer generate --model "$CK/qwen3_5_moe" --prompts-file "$OUT/p.jsonl" --max-tokens 12 \
    --ignore-eos --temperature 0 --dtype float32 --device cuda --dp 2 --tp 2 --collective-timeout 8 \
    --dump-dir "$OUT/$1" --fault $1 --fault-rank $2 --fault-step $3 > "$OUT/$1.log" 2>&1
  echo "== $1 rank $2 step $3: exit $?"; grep '^epinfer' "$OUT/$1.log" | cut -c1-200
  python3 -m epinfer doctor "$OUT/$1" --json | python3 -c "import json,sys; d=json.load(sys.stdin); print({k: d[k] for k in ('verdict','group','seq','label','step','culprit_ranks','missing_ranks')})"
done
bench bench_dp2tp2 300 --shape qwen3.5-35b-a3b --dp 2 --tp 2 --batch 2 --batch 64 --batch 256 --input-len 1024 --output-len 32
[ -n "${SKIP_ONE_GPU:-}" ] && exit 0
first=${CUDA_VISIBLE_DEVICES:-0}
CUDA_VISIBLE_DEVICES=${first%%,*} bench bench_1gpu 200 --shape qwen3.5-35b-a3b --batch 2 --batch 64 --batch 256 --input-len 1024 --output-len 32
