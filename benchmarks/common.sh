# Shared setup of the benchmarks/*.sh device scripts (sourced, not run): the environment, the output
# and scratch folders, and the helpers that run one bounded, logged measurement.
#
# The caller sets NAME (its own name, without .sh) before sourcing. After it:
#   ROOT     the repository root (the current directory from here on)
#   OUT      where the logs and records go: $OUT if set, else benchmarks/logs/$NAME (git-ignored)
#   SCRATCH  tiny checkpoints, shape folders, installed wheels: $SCRATCH if set, else
#            benchmarks/logs/scratch (git-ignored; kept out of $OUT so that only results come back)
# Both are made absolute. NVLink multicast (NVLS) stays off, as on the machines measured.

set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/benchmarks/logs/$NAME}
SCRATCH=${SCRATCH:-$ROOT/benchmarks/logs/scratch}
mkdir -p "$OUT" "$SCRATCH"
OUT=$(cd "$OUT" && pwd)
SCRATCH=$(cd "$SCRATCH" && pwd)
cd "$ROOT" || exit 1
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

# step NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds (SIGINT, then SIGKILL 15 s later),
# stdout and stderr to $OUT/NAME.log; print the exit code and the log's summary lines. A parallel run
# that stalls dumps every thread's Python stack after EPINFER_STACKS_AFTER seconds (default 40).
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date +%T))"
  EPINFER_STACKS_AFTER=${EPINFER_STACKS_AFTER:-40} timeout -k 15 -s INT "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name exit $?"
  grep -h "^epinfer bench\|^\[rank\|passed\|failed\|identical\|DIFF\|stuck\|did not" "$OUT/$name.log" | cut -c1-200 | tail -12
}

# bench NAME LIMIT ARGS...: `epinfer bench ARGS --json` for at most LIMIT seconds; the JSON records
# (one per batch) go to $OUT/NAME.jsonl, the progress and summary lines to $OUT/NAME.log.
bench() {
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date +%T))"
  EPINFER_STACKS_AFTER=${EPINFER_STACKS_AFTER:-40} timeout -k 15 -s INT "$limit" \
    python3 -m epinfer bench "$@" --json > "$OUT/$name.jsonl" 2> "$OUT/$name.log"
  echo "$name exit $?"
  grep -h "^epinfer bench" "$OUT/$name.log" | cut -c1-200
}

# tiny_checkpoints FAMILY...: tiny float32 checkpoints (tests/checkpoints.py) in $SCRATCH/ckpts/FAMILY
tiny_checkpoints() {
  python3 -c "import sys
from tests.checkpoints import make_checkpoint
for f in sys.argv[2:]: make_checkpoint(f, sys.argv[1] + '/' + f)" "$SCRATCH/ckpts" "$@" > /dev/null 2>&1
}

# shape_folder SHAPE: a folder with only the config.json of epinfer/shapes/SHAPE.json (for
# --random-weights); prints its path
shape_folder() {
  mkdir -p "$SCRATCH/shape-$1" && cp "epinfer/shapes/$1.json" "$SCRATCH/shape-$1/config.json" && echo "$SCRATCH/shape-$1"
}

# install_wheels: the wheels in WHEELS (default .whl in the repository root), if any, installed offline
# into $SCRATCH/site and put on PYTHONPATH (packages the machine lacks: the serve extra, fla-core)
install_wheels() {
  local wheels=${WHEELS:-.whl}
  if ls "$wheels"/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SCRATCH/site" "$wheels"/*.whl
    export PYTHONPATH=$PYTHONPATH:$SCRATCH/site
  fi
}
