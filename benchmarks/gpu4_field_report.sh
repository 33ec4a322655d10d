#!/usr/bin/env bash
# Issue 8 on 4 GPUs: the field report's topology TP=2 DP=2 EP=4 (NCCL).
#  1. tiny float32 checkpoints, every dispatcher x padding: tokens identical to one GPU
#  2. Qwen3.5-35B-A3B shape (40 layers, bf16, random weights) decode at global batch 2, 64, 256
#  3. skip-collective on rank 2 and kill on rank 3 diagnosed by `epinfer doctor`
set -u
out=${1:-/tmp/gpu4}; mkdir -p "$out"
LAYOUTS=2x2 timeout 240 python3 benchmarks/gpu_parallel_check.py .gpu/qwen3_5_moe .gpu/qwen3_next .gpu/qwen3_moe \
  > "$out/parallel.log" 2>&1; echo "parallel check exit $?"; grep -v "^(" "$out/parallel.log" | tail -22
printf '{"prompt_token_ids": [1, 2, 3, 4, 5]}\n{"prompt_token_ids": [9, 8, 7]}\n{"prompt_token_ids": [40, 41]}\n' > "$out/p.jsonl"
for f in "skip-collective 2 3" "kill 3 2"; do
  set -- $f
  timeout 120 python3 -m epinfer generate --model .gpu/qwen3_5_moe --prompts-file "$out/p.jsonl" --max-tokens 12 \
    --ignore-eos --temperature 0 --dtype float32 --device cuda --dp 2 --tp 2 --collective-timeout 8 \
    --dump-dir "$out/$1" --fault $1 --fault-rank $2 --fault-step $3 > "$out/$1.log" 2>&1
  echo "== $1 rank $2 step $3: exit $?"; grep '^epinfer' "$out/$1.log" | cut -c1-200
  python3 -m epinfer doctor "$out/$1" --json | python3 -c "import json,sys; d=json.load(sys.stdin); print({k: d[k] for k in ('verdict','group','seq','label','step','culprit_ranks','missing_ranks')})"
done
for b in 2 64 256; do
  timeout 150 python3 benchmarks/ledger_overhead.py --shape epinfer/shapes/qwen3.5-35b-a3b-text.json --device cuda \
    --dp 2 --tp 2 --batch $b --input-len 64 --output-len 10 2>&1 | tail -1
done
