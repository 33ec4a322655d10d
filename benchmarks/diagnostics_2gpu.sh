#!/usr/bin/env bash
# Hang and crash diagnostics on TWO NVIDIA GPUs (NCCL), and the collective ledger's overhead (the
# "Diagnostics overhead" section of benchmarks/RESULTS.md):
#  1. a tiny float32 qwen3_5_moe checkpoint at --dp 2 --device cuda --collective-timeout 8: a clean
#     run, --fault skip-collective on rank 1 (step 3) and --fault kill on rank 1 (step 4); exit code,
#     wall time and `epinfer doctor --json` of each
#  2. the ledger's overhead on a real-shape decode step: Qwen3-30B-A3B shape, 8 layers, bf16, random
#     weights, DP=2 EP=2, batch 64 (benchmarks/ledger_overhead.py)
#
# Usage: [OUT=DIR] bash benchmarks/diagnostics_2gpu.sh
# Output: $OUT (default benchmarks/logs/diagnostics_2gpu/, git-ignored): RUN.log, the dump folder RUN/
# and RUN.doctor.json per run, ledger_overhead.log (one JSON record).
NAME=diagnostics_2gpu
source "$(dirname "$0")/common.sh"
tiny_checkpoints qwen3_5_moe
printf '{"prompt_token_ids": [1, 2, 3, 4, 5]}\n{"prompt_token_ids": [9, 8, 7]}\n{"prompt_token_ids": [40, 41]}\n' > "$OUT/p.jsonl"
run() {  # run NAME [EXTRA ARGS...]
  local name=$1; shift
  local start=$(date +%s)
  rm -rf "${OUT:?}/$name"
  timeout 300 python3 -m epinfer generate --model "$SCRATCH/ckpts/qwen3_5_moe" --prompts-file "$OUT/p.jsonl" --max-tokens 12 \
    --ignore-eos --temperature 0 --dtype float32 --device cuda --dp 2 --collective-timeout 8 \
    --dump-dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  echo "== $name: exit $code after $(( $(date +%s) - start )) s"
  grep '^epinfer' "$OUT/$name.log" | cut -c1-300
  python3 -m epinfer doctor "$OUT/$name" --json > "$OUT/$name.doctor.json"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d[k] for k in ('verdict','group','seq','label','step','culprit_ranks','missing_ranks','stragglers')})" "$OUT/$name.doctor.json"
}
run clean
run skip --fault skip-collective --fault-rank 1 --fault-step 3
run kill --fault kill --fault-rank 1 --fault-step 4
step ledger_overhead 300 python3 benchmarks/ledger_overhead.py --shape epinfer/shapes/qwen3-30b-a3b.json --layers 8 \
  --device cuda --dp 2 --batch 64 --input-len 128 --output-len 24
tail -1 "$OUT/ledger_overhead.log"
