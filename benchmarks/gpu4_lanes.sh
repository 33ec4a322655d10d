#!/usr/bin/env bash
# Issues 5-8 on one 4-GPU machine in three calls of under 10 minutes, running independent work on
# separate GPUs at once ("lanes"). Logs: one file per lane under $OUT plus $OUT/logs.tgz.
#   a: GPU0 Qwen3-30B-A3B b1/64/256 + transformers, Qwen3.5 b2/64/256 | GPU1 tests/gpu, prefill 8x2048,
#      async A/B | GPU2,3 tiny float32 parallel check, async on and off
#   b: GPU0,1 one GPU b1/b64, DP=2 EP=2 b2/b128, TP=2 b1 | GPU2,3 imbalance 64/8, then serve load test
#   c: all four: the field report's topology (gpu4_field_report.sh without its one-GPU bench)
#   d: GPU0,1 one GPU b1/b64, DP=2 b2/b128, TP=2 b1, imbalance (graphs with collectives) | GPU2,3
#      parallel check with graphs | GPU3 serve load test | GPU2(+3) GPU tests, prefill profile
#   e: GPU0,1 why graphs with collectives hang (benchmarks/nccl_graph_probe.py, three variants, then
#      epinfer with EPINFER_PARALLEL_GRAPHS=1) | GPU2 serve load test | GPU3 GPU tests, prefill 8x2048
#      profile at 48 layers
# The serve load test needs fastapi/uvicorn/pydantic wheels in .whl (git-ignored): the device call
# must name it in `carry` (see /work/.library/device/README.md for the download command).
# Usage: OUT=dir bash benchmarks/gpu4_lanes.sh a|b|c
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=. PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/lanes}; L=/tmp/lanes-logs; mkdir -p "$OUT" "$L"
B="python3 -m epinfer bench --input-len 1024 --output-len 32"
S30="--shape qwen3-30b-a3b"
lane() {  # lane NAME GPUS COMMANDS: run COMMANDS with only GPUS visible, log to $OUT/NAME.log
  local name=$1 gpus=$2; shift 2
  (export CUDA_VISIBLE_DEVICES=$gpus; cd "$PWD" && eval "$*") > "$OUT/$name.log" 2>&1 &
}
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
nvidia-smi topo -m > "$L/topo.txt" 2>&1
case ${1:-a} in
a)
  lane a0 0 "timeout 330 $B $S30 --batch 1 --batch 64 --batch 256 --compare-hf --json > $L/a_30b.jsonl;
    timeout 200 $B --shape qwen3.5-35b-a3b --batch 2 --batch 64 --batch 256 --json > $L/a_35b.jsonl"
  lane a1 1 "timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu; echo pytest exit \$?;
    timeout 150 python3 -m epinfer bench $S30 --batch 8 --input-len 2048 --output-len 16 --json > $L/a_prefill.jsonl;
    timeout 150 $B $S30 --batch 64 --async-scheduling --json > $L/a_async.jsonl"
  lane a23 2,3 "python3 -c \"from tests.checkpoints import make_checkpoint
for f in ('qwen3_5_moe', 'qwen3_moe'): make_checkpoint(f, '/tmp/ck/' + f)\";
    for a in 1 0; do ASYNC=\$a timeout 270 python3 benchmarks/gpu_parallel_check.py /tmp/ck/qwen3_5_moe /tmp/ck/qwen3_moe \
      > $L/a_parallel_async\$a.log 2>&1; echo parallel check async=\$a exit \$?; grep -v '^(' $L/a_parallel_async\$a.log; done" ;;
b)
  lane b01 0,1 "CUDA_VISIBLE_DEVICES=0 timeout 190 $B $S30 --batch 1 --batch 64 --json > $L/b_one_gpu.jsonl;
    timeout 200 $B $S30 --dp 2 --batch 2 --batch 128 > $L/b_dp2.jsonl; timeout 150 $B $S30 --tp 2 --batch 1 > $L/b_tp2.jsonl"
  lane b23 2,3 "for pad in uniform none; do timeout 140 $B $S30 --dp 2 --replica-batch 64,8 --dp-padding \$pad \
      > $L/b_imb_\$pad.jsonl; done; mkdir -p /tmp/shape && cp epinfer/shapes/qwen3-30b-a3b.json /tmp/shape/config.json;
    CUDA_VISIBLE_DEVICES=2 timeout 260 python3 benchmarks/serve_load.py --serve '--model /tmp/shape --random-weights \
      --dtype bfloat16 --max-model-len 2048' --token-prompts --requests 512 --concurrency 64 --max-tokens 64 \
      --max-seconds 120" ;;
c)
  lane c 0,1,2,3 "SKIP_ONE_GPU=1 bash benchmarks/gpu4_field_report.sh /tmp/gpu4; cp /tmp/gpu4/*.log /tmp/gpu4/*.jsonl \
    /tmp/gpu4/*.err $L/ 2>/dev/null" ;;
d)
  lane d01 0,1 "CUDA_VISIBLE_DEVICES=0 timeout 130 $B $S30 --batch 1 --batch 64 --json > $L/d_one_gpu.jsonl;
    timeout 130 $B $S30 --dp 2 --batch 2 --batch 128 > $L/d_dp2.jsonl; timeout 110 $B $S30 --tp 2 --batch 1 > $L/d_tp2.jsonl;
    timeout 110 $B $S30 --dp 2 --replica-batch 64,8 > $L/d_imb_uniform.jsonl"
  lane d23 2,3 "python3 -c \"from tests.checkpoints import make_checkpoint
for f in ('qwen3_5_moe', 'qwen3_moe'): make_checkpoint(f, '/tmp/ck/' + f)\";
    ASYNC=1 timeout 250 python3 benchmarks/gpu_parallel_check.py /tmp/ck/qwen3_5_moe /tmp/ck/qwen3_moe \
      > $L/d_parallel_async1.log 2>&1; echo parallel check async=1 exit \$?; grep -v '^(' $L/d_parallel_async1.log;
    ASYNC=0 timeout 140 python3 benchmarks/gpu_parallel_check.py /tmp/ck/qwen3_moe > $L/d_parallel_async0.log 2>&1;
    echo parallel check async=0 exit \$?; grep -v '^(' $L/d_parallel_async0.log"
  lane d3 3 "python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl;
    mkdir -p /tmp/shape && cp epinfer/shapes/qwen3-30b-a3b.json /tmp/shape/config.json;
    PYTHONPATH=.:/tmp/site timeout 300 python3 benchmarks/serve_load.py --serve '--model /tmp/shape --random-weights \
      --dtype bfloat16 --max-model-len 2048 --cache-memory-gb 30' --token-prompts --requests 512 \
      --concurrency 64 --max-tokens 64 --max-seconds 120"
  lane d2 2,3 "timeout 300 python3 -m pytest -q -p no:cacheprovider -s tests/gpu;
    CUDA_VISIBLE_DEVICES=2 timeout 120 python3 benchmarks/prefill_profile.py --layers 8 > $L/d_prefill_profile.jsonl" ;;
e)
  lane e01 0,1 "python3 -c \"from tests.checkpoints import make_checkpoint; make_checkpoint('qwen3_moe', '/tmp/ck/qwen3_moe')\";
    for v in '--mode thread_local' '--mode global' '--graph-register 0'; do echo \"== probe \$v\";
      timeout 100 python3 benchmarks/nccl_graph_probe.py \$v; echo \"exit \$?\"; done;
    echo '== epinfer'; timeout 120 python3 benchmarks/nccl_graph_probe.py --epinfer /tmp/ck/qwen3_moe; echo \"exit \$?\""
  lane e2 2 "python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl;
    mkdir -p /tmp/shape && cp epinfer/shapes/qwen3-30b-a3b.json /tmp/shape/config.json;
    PYTHONPATH=.:/tmp/site timeout 300 python3 benchmarks/serve_load.py --serve '--model /tmp/shape --random-weights \
      --dtype bfloat16 --max-model-len 2048 --cache-memory-gb 30' --token-prompts --requests 512 \
      --concurrency 64 --max-tokens 64 --max-seconds 120"
  lane e3 3 "timeout 280 python3 -m pytest -q -p no:cacheprovider tests/gpu; echo pytest exit \$?;
    timeout 150 python3 benchmarks/prefill_profile.py --layers 48 > $L/e_prefill_profile.jsonl" ;;
esac
wait
grep -h "^epinfer bench\|exit\|passed\|failed" "$OUT"/*.log | cut -c1-220
tar czf "$OUT/logs.tgz" -C "$L" .
