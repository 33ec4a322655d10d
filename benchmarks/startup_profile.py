"""Where a cold start-up goes: the engine of a shape built with empty Triton and TorchInductor caches
(what the first start on a fresh machine pays), then, with `--warm`, once more on the caches the
first build left, the process replaced by a new one (what every later start pays). For each build:
the engine's start-up phases, the main thread's time by activity (sampled every `--every` seconds:
Triton compiling, autotuning, TorchInductor, CUDA graph capture, ...) and, cold only, the kernels
compiled: one entry per compiled variant in the Triton cache, named by kernel, with the time since
the previous compile finished (an estimate of its compile and autotune time; the first's is
unknown), summed by kernel name.

With `--fla-configs DIR` the cold build's fla autotune choices are also written as fla's config
files (see benchmarks/fla_configs.py); a start with FLA_CONFIG_DIR=DIR FLA_CACHE_MODE=full then
compiles the chosen configs alone.

    python benchmarks/startup_profile.py [--shape qwen3.5-35b-a3b] [--layers L] [--warm] [--top 25]
        [--fla-configs DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

# the caches are chosen before torch or Triton is imported: both read these once (the warm build's
# process is handed the cold build's through STARTUP_PROFILE_CACHES)
_CACHES = os.environ.get("STARTUP_PROFILE_CACHES") or tempfile.mkdtemp(prefix="epinfer-startup-")
os.environ["TRITON_CACHE_DIR"] = os.path.join(_CACHES, "triton")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_CACHES, "inductor")

import torch  # noqa: E402

from epinfer.bench.single import shape_folder  # noqa: E402
from epinfer.engine.engine import Engine, EngineConfig  # noqa: E402

# (activity, a frame's file path fragment and function name prefix), first match from the innermost frame out
ACTIVITIES = [
    ("triton autotune", "triton/runtime/autotuner.py", ""),
    ("triton compile", "triton/compiler/", ""),
    ("triton compile", "triton/runtime/jit.py", "_do_compile"),
    ("torchinductor", "torch/_inductor/", ""),
    ("torch.compile tracing", "torch/_dynamo/", ""),
    ("cuda graph capture", "torch/cuda/graphs.py", ""),
    ("model code (forward passes, weights)", "epinfer/models/", ""),
    ("warm-up steps", "epinfer/engine/engine.py", "warm_up"),
]


def activity(frame) -> str:
    """The innermost frame that names an activity (else the innermost epinfer function)."""
    first_epinfer = None
    while frame is not None:
        path, name = frame.f_code.co_filename.replace(os.sep, "/"), frame.f_code.co_name
        for label, fragment, prefix in ACTIVITIES:
            if fragment in path and name.startswith(prefix):
                return label
        if first_epinfer is None and "/epinfer/" in path:
            first_epinfer = f"epinfer {Path(path).stem}.{name}"
        frame = frame.f_back
    return first_epinfer or "other"


class Sampler:
    """Samples the main thread's stack every `every` seconds into activity counts."""

    def __init__(self, every: float) -> None:
        self.every, self.counts, self.stop = every, collections.Counter(), threading.Event()
        self.main = threading.main_thread().ident
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            frame = sys._current_frames().get(self.main)
            if frame is not None:
                self.counts[activity(frame)] += 1

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def seconds(self) -> dict[str, float]:
        return {k: round(v * self.every, 1) for k, v in self.counts.most_common()}


def compiled_kernels(cache: Path) -> list[tuple[str, float, float]]:
    """(kernel name, finished at, seconds since the previous one finished) for each variant in a
    Triton cache: each variant's folder holds `<name>.json` written when its compile ends."""
    done = []
    for meta in cache.glob("*/*.json"):
        if meta.name.startswith("__grp__"):
            continue
        done.append((meta.stem, meta.stat().st_mtime))
    done.sort(key=lambda kv: kv[1])
    out, last = [], None
    for name, at in done:  # (the first compile's own time is unknown: what ran before it is not compiling)
        out.append((name, at, 0.0 if last is None else at - last))
        last = at
    return out


def build(args, folder: str) -> dict:
    with Sampler(args.every) as sampler:
        t0 = time.perf_counter()
        engine = Engine(EngineConfig(model=folder, dtype=args.dtype, device=args.device, random_weights=True,
                                     max_model_len=args.max_model_len))
        built = time.perf_counter() - t0
    return {"engine_s": round(built, 2), "phases_s": engine.startup, "activities_s": sampler.seconds(),
            "kernels_preloaded": engine.kernels_preloaded}


def report(kind: str, rec: dict) -> None:
    print(f"{kind}: engine {rec['engine_s']} s, phases {rec['phases_s']}, kernel variants preloaded "
          f"{rec['kernels_preloaded']}", file=sys.stderr)
    print(f"  main thread by activity (s): {rec['activities_s']}", file=sys.stderr)
    for name, count, secs in rec.get("triton_by_kernel", []):
        print(f"  {secs:7.1f} s  {count:3d} variant(s)  {name}", file=sys.stderr)
    sys.stderr.flush()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3.5-35b-a3b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--every", type=float, default=0.05, help="sampling period, seconds")
    ap.add_argument("--warm", action="store_true",
                    help="then build once more, the process replaced by a new one, on the caches the first build left")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--fla-configs", default=None,
                    help="after the cold build, write fla's autotune choices here (benchmarks/fla_configs.py)")
    args = ap.parse_args()
    kind = "warm" if os.environ.get("STARTUP_PROFILE_CACHES") else "cold"
    if args.fla_configs:  # fla autotunes instead of reading the shipped choices (`kernels.gdn_prefill`)
        os.environ.setdefault("FLA_CACHE_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        rec = build(args, str(shape_folder(args.shape, args.layers, tmp)))
    if kind == "cold":
        kernels = compiled_kernels(Path(os.environ["TRITON_CACHE_DIR"]))
        by_name: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
        for name, _, took in kernels:
            by_name[name][0] += 1
            by_name[name][1] += took
        rec["triton_variants"] = len(kernels)
        rec["triton_by_kernel"] = sorted(([n, c, round(s, 1)] for n, (c, s) in by_name.items()),
                                         key=lambda r: -r[2])[:args.top]
    print(json.dumps({"shape": args.shape, "build": kind, "caches": _CACHES, **rec}), flush=True)
    report(kind, rec)
    if args.fla_configs and kind == "cold":
        from fla_configs import write_configs  # (this script's folder is on the path)

        write_configs(Path(args.fla_configs))
    if args.warm and kind == "cold":  # this process replaced: nothing of the first build stays in memory
        argv = [a for a in sys.argv[1:] if a != "--warm"]
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, __file__, *argv], {**os.environ, "STARTUP_PROFILE_CACHES": _CACHES})
    return 0


if __name__ == "__main__":
    sys.exit(main())
