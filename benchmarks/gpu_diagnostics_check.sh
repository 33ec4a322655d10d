#!/usr/bin/env bash
# Diagnostics on 2 NVIDIA GPUs (NCCL): skip-collective and kill diagnosed by `epinfer doctor`,
# a clean run, and the ledger's overhead on a real-shape (Qwen3-30B-A3B, 8 layers) decode step.
# Usage: bash benchmarks/gpu_diagnostics_check.sh OUTDIR   (tiny checkpoint in .gpu/qwen3_5_moe)
set -u
out=${1:-/tmp/diag}
mkdir -p "$out"
printf '{"prompt_token_ids": [1, 2, 3, 4, 5]}\n{"prompt_token_ids": [9, 8, 7]}\n{"prompt_token_ids": [40, 41]}\n' > "$out/p.jsonl"
run() {  # name, extra args...
  local name=$1; shift
  local start=$(date +%s)
  python3 -m epinfer generate --model .gpu/qwen3_5_moe --prompts-file "$out/p.jsonl" --max-tokens 12 \
    --ignore-eos --temperature 0 --dtype float32 --device cuda --dp 2 --collective-timeout 8 \
    --dump-dir "$out/$name" "$@" > "$out/$name.log" 2>&1
  local code=$?
  echo "== $name: exit $code after $(( $(date +%s) - start )) s"
  grep '^epinfer' "$out/$name.log" | cut -c1-300
  python3 -m epinfer doctor "$out/$name" --json > "$out/$name.doctor.json"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d[k] for k in ('verdict','group','seq','label','step','culprit_ranks','missing_ranks','stragglers')})" "$out/$name.doctor.json"
}
run clean
run skip --fault skip-collective --fault-rank 1 --fault-step 3
run kill --fault kill --fault-rank 1 --fault-step 4
python3 benchmarks/ledger_overhead.py --shape epinfer/shapes/qwen3-30b-a3b.json --layers 8 --device cuda \
  --dp 2 --batch 64 --input-len 128 --output-len 24
