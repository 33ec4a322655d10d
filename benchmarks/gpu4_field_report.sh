#!/usr/bin/env bash
# Issue 8 on 4 GPUs: the field report's topology TP=2 DP=2 EP=4 (NCCL).
#  1. tiny float32 checkpoints, every dispatcher x padding: tokens identical to one GPU
#  2. Qwen3.5-35B-A3B shape (40 layers, bf16, random weights): `epinfer bench --dp 2 --tp 2` at
#     global batch 2, 64, 256 (per-rank breakdown, pad waste, skew) and one GPU of the same machine
#  3. skip-collective on rank 2 and kill on rank 3 diagnosed by `epinfer doctor`
# Usage: bash benchmarks/gpu4_field_report.sh OUTDIR   (builds the tiny checkpoints itself; SKIP_ONE_GPU=1
# leaves out the one-GPU bench)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=. PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
out=${1:-/tmp/gpu4}; mkdir -p "$out"
ck="$out/ckpts"
python3 -c "
from tests.checkpoints import make_checkpoint
for f in ('qwen3_5_moe', 'qwen3_next', 'qwen3_moe'):
    make_checkpoint(f, '$ck/' + f)" > /dev/null 2>&1
LAYOUTS=2x2 timeout 240 python3 benchmarks/gpu_parallel_check.py "$ck/qwen3_5_moe" "$ck/qwen3_next" "$ck/qwen3_moe" \
  > "$out/parallel.log" 2>&1; echo "parallel check exit $?"; grep -v "^(" "$out/parallel.log" | tail -22
printf '{"prompt_token_ids": [1, 2, 3, 4, 5]}\n{"prompt_token_ids": [9, 8, 7]}\n{"prompt_token_ids": [40, 41]}\n' > "$out/p.jsonl"
for f in "skip-collective 2 3" "kill 3 2"; do
  set -- $f
  timeout 120 python3 -m epinfer generate --model "$ck/qwen3_5_moe" --prompts-file "$out/p.jsonl" --max-tokens 12 \
    --ignore-eos --temperature 0 --dtype float32 --device cuda --dp 2 --tp 2 --collective-timeout 8 \
    --dump-dir "$out/$1" --fault $1 --fault-rank $2 --fault-step $3 > "$out/$1.log" 2>&1
  echo "== $1 rank $2 step $3: exit $?"; grep '^epinfer' "$out/$1.log" | cut -c1-200
  python3 -m epinfer doctor "$out/$1" --json | python3 -c "import json,sys; d=json.load(sys.stdin); print({k: d[k] for k in ('verdict','group','seq','label','step','culprit_ranks','missing_ranks')})"
done
timeout 300 python3 -m epinfer bench --shape qwen3.5-35b-a3b --dp 2 --tp 2 --batch 2 --batch 64 --batch 256 \
  --input-len 1024 --output-len 32 > "$out/bench_dp2tp2.jsonl" 2> "$out/bench_dp2tp2.err"; grep "^epinfer" "$out/bench_dp2tp2.err"
[ -n "${SKIP_ONE_GPU:-}" ] && exit 0  # the one-GPU figures come from another run on the same machine
timeout 200 python3 -m epinfer bench --shape qwen3.5-35b-a3b --batch 2 --batch 64 --batch 256 --input-len 1024 \
  --output-len 32 --json > "$out/bench_1gpu.jsonl" 2> "$out/bench_1gpu.err"; grep "^epinfer" "$out/bench_1gpu.err"
