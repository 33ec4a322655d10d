#!/usr/bin/env bash
# Issue 5 (and 7) on one GPU, two device calls of under 10 minutes:
#   a: the GPU tests, then the 30B targets in one run with async scheduling and transformers
#   b: the hybrid at batch 64 (async), prefill 8 x 2048, the serve load test with async scheduling
#      (needs the .whl wheels: carry [".whl"])
#   c: the GPU tests, the small-batch MoE tile sweep (best table: $OUT/small.json), batch 1 sync and async
#   d: the GPU tests, the MoE sweep at 1-16 rows and the projection sweep (CUDA-graph timed), batch 1
#   e: the GPU tests, then batch 1 and 64 (async) with EPINFER_PDL=0 and 1 (the PDL decode chain)
#   f: the GPU tests, the decode-attention sweep, batch 1 and 64 (async)
#   g: a's bench first, then the GPU tests in the time left of a 10-minute call
# Usage: OUT=dir bash benchmarks/gpu1_issue5.sh a|b   (logs: $OUT/*.log, records: $OUT/*.jsonl)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=. PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/gpu1}; mkdir -p "$OUT"
B="python3 -m epinfer bench --input-len 1024 --output-len 32 --json"
nvidia-smi --query-gpu=name --format=csv,noheader
case ${1:-a} in
a)
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu > "$OUT/tests.log" 2>&1; echo "pytest exit $?"
tail -1 "$OUT/tests.log"
timeout 330 $B --shape qwen3-30b-a3b --batch 1 --batch 64 --batch 256 --async-scheduling --compare-hf \
  > "$OUT/b30_async_hf.jsonl" 2> "$OUT/b30_async_hf.log"; echo "bench exit $?"
  ;;
b)
timeout 120 $B --shape qwen3.5-35b-a3b --batch 64 --async-scheduling > "$OUT/b35_async.jsonl" 2> "$OUT/b35_async.log"
timeout 100 python3 -m epinfer bench --shape qwen3-30b-a3b --batch 8 --input-len 2048 --output-len 16 --json \
  > "$OUT/prefill.jsonl" 2> "$OUT/prefill.log"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  mkdir -p /tmp/shape && cp epinfer/shapes/qwen3-30b-a3b.json /tmp/shape/config.json
  PYTHONPATH=.:/tmp/site timeout 200 python3 benchmarks/serve_load.py --serve '--model /tmp/shape --random-weights \
    --dtype bfloat16 --max-model-len 2048 --cache-memory-gb 30 --async-scheduling' --token-prompts --requests 512 \
    --concurrency 64 --max-tokens 64 --max-seconds 120 > "$OUT/serve_async.log" 2>&1; tail -1 "$OUT/serve_async.log"
fi ;;
c)
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/gpu > "$OUT/tests.log" 2>&1; echo "pytest exit $?"
tail -1 "$OUT/tests.log"
timeout 240 python3 benchmarks/moe_kernel_sweep.py --batches 1,2,4,8,16 --out "$OUT/small.json" > "$OUT/sweep.log" 2>&1
echo "sweep exit $?"; grep -v "^#" "$OUT/sweep.log" | cut -c1-220
timeout 150 $B --shape qwen3-30b-a3b --batch 1 > "$OUT/b1_sync.jsonl" 2> "$OUT/b1_sync.log"
EPINFER_MOE_CONFIGS=$OUT/small.json timeout 120 $B --shape qwen3-30b-a3b --batch 1 --async-scheduling \
  > "$OUT/b1_async.jsonl" 2> "$OUT/b1_async.log" ;;
d)
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu > "$OUT/tests.log" 2>&1; echo "pytest exit $?"
tail -1 "$OUT/tests.log"
timeout 170 python3 benchmarks/moe_kernel_sweep.py --batches 1,4,16 --out "$OUT/small.json" > "$OUT/sweep.log" 2>&1
echo "sweep exit $?"; grep -v "^#" "$OUT/sweep.log" | cut -c1-250
timeout 130 python3 benchmarks/gemv_sweep.py > "$OUT/gemv.log" 2>&1; echo "gemv exit $?"; grep -v "^#" "$OUT/gemv.log" | cut -c1-230
timeout 90 $B --shape qwen3-30b-a3b --batch 1 > "$OUT/b1_sync.jsonl" 2> "$OUT/b1_sync.log"
timeout 90 $B --shape qwen3-30b-a3b --batch 1 --async-scheduling > "$OUT/b1_async.jsonl" 2> "$OUT/b1_async.log"
python3 -c "import json,sys; [print(json.loads(l)['breakdown_ms']) for f in sys.argv[1:] for l in open(f)]" "$OUT"/b1_*.jsonl ;;
e)
timeout 320 python3 -m pytest -q -p no:cacheprovider tests/gpu > "$OUT/tests.log" 2>&1; echo "pytest exit $?"
tail -1 "$OUT/tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head
for p in 0 1; do
  EPINFER_PDL=$p timeout 120 $B --shape qwen3-30b-a3b --batch 1 --batch 64 --async-scheduling > "$OUT/pdl$p.jsonl" 2> "$OUT/pdl$p.log"
  echo "pdl $p exit $?"
done
python3 -c "import json,sys; [print(f[-10:], r['batch'], r['decode_tok_s'], r['fraction_of_floor'], r['breakdown_ms']['top_kernels'][:6]) for f in sys.argv[1:] for l in open(f) for r in [json.loads(l)]]" "$OUT"/pdl*.jsonl ;;
f)
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu > "$OUT/tests.log" 2>&1; echo "pytest exit $?"
tail -1 "$OUT/tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head
timeout 150 python3 benchmarks/attention_sweep.py > "$OUT/attn.log" 2>&1; echo "attn exit $?"
cut -c1-300 "$OUT/attn.log"
timeout 120 $B --shape qwen3-30b-a3b --batch 1 --batch 64 --async-scheduling > "$OUT/b30.jsonl" 2> "$OUT/b30.log"
python3 -c "import json,sys; [print(r['batch'], r['decode_tok_s'], r['breakdown_ms']['top_kernels'][:12]) for l in open(sys.argv[1]) for r in [json.loads(l)]]" "$OUT/b30.jsonl" ;;
g)
timeout 330 $B --shape qwen3-30b-a3b --batch 1 --batch 64 --batch 256 --async-scheduling --compare-hf \
  > "$OUT/b30_async_hf.jsonl" 2> "$OUT/b30_async_hf.log"; echo "bench exit $?"
timeout $((570 - SECONDS)) python3 -m pytest -q -p no:cacheprovider tests/gpu > "$OUT/tests.log" 2>&1; echo "pytest exit $?"
tail -1 "$OUT/tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head ;;
esac
grep -h "^epinfer bench" "$OUT"/*.log | cut -c1-200
