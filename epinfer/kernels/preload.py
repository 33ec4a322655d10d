"""Triton kernels compiled in parallel before start-up launches them.

A first start-up (empty Triton cache) compiles every kernel variant it launches, one after another
on the main thread: 38-57 s of a 76-100 s start of the Qwen3.5 shape on an H200 (RESULTS.md,
start-up). Which variants a run launches is known ahead of it: `EPINFER_RECORD_KERNELS=FILE` appends
each variant a process's launches compile to FILE (one JSON line: Triton's version, the kernel's
module and name, and Triton's own serialised specialization of it), and `manifests/<GPU>.jsonl`
ships those of the shipped shapes' runs on that GPU. An engine on a GPU with a manifest compiles
every variant of it on a pool of threads while its weights load, into the kernels' own caches
(`JITFunction.preload` under Triton's `AsyncCompileMode`; Triton's passes after the front end, about
nine tenths of a compile, run without the GIL: 1.8x on 2 threads on a 2-core CPU for sm_90), then
builds their launchers: the launches find them ready. Variants of another Triton version are
skipped, and so is one that no longer fits its kernel (code changed since the manifest): its launch
compiles it as before. EPINFER_PRELOAD_KERNELS=0 turns it off (an A/B of start-up).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import json
import os
import re
import threading
from pathlib import Path

import torch

from epinfer.core.env import SWITCHES

MANIFESTS = Path(__file__).parent / "manifests"
PACKAGES = ("epinfer.", "fla.")  # kernels recorded: ours and fla-core's (not TorchInductor's generated ones)
_record_lock = threading.Lock()
_recorded: set[str] = set()


def manifest_path(gpu_name: str) -> Path:
    return MANIFESTS / ((re.sub(r"[^0-9A-Za-z]+", "_", gpu_name).strip("_") or "unknown_gpu") + ".jsonl")


def record_to(path: str) -> None:
    """Every kernel variant this process launches from now on is appended to `path` (once each)."""
    import triton
    import triton.runtime.jit as jit
    from triton import knobs

    serialize = jit.serialize_specialization_data

    def serializable(*args):  # (a variant with a kernel as a constant has no JSON form: not recorded, not a
        try:                  # failed launch)
            return serialize(*args)
        except (TypeError, ValueError):
            return None

    jit.serialize_specialization_data = serializable

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002 (Triton's names)
        if is_manual_warmup or compile["specialization_data"] is None or not str(fn.module).startswith(PACKAGES):
            return None  # (a preloaded variant is recorded when a launch compiles it)
        line = json.dumps({"triton": triton.__version__, "module": str(fn.module), "name": fn.name,
                           "data": compile["specialization_data"]})
        with _record_lock:
            if line not in _recorded:
                _recorded.add(line)
                with open(path, "a") as f:
                    f.write(line + "\n")
        return None

    knobs.runtime.jit_post_compile_hook = hook


def variants(path: Path, version: str) -> list[tuple[str, str, str]]:
    """(module, name, specialization data) of `path`'s lines for Triton `version`, each once."""
    seen, out = set(), []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            entry = json.loads(line)
            item = (entry["module"], entry["name"], entry["data"])
            if entry["triton"] == version and item not in seen and str(item[0]).startswith(PACKAGES):
                seen.add(item)
                out.append(item)
    return out


def jit_function(module: str, name: str):
    """The `JITFunction` under module.name (through autotuner / heuristics wrappers), or None."""
    from triton.runtime.jit import JITFunction

    try:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
        obj = obj.fn
    return obj if isinstance(obj, JITFunction) else None


def portable(data: str) -> str:
    """The specialization without its options' file paths (libdevice's, of the recording install):
    this install's own defaults replace them."""
    entry = json.loads(data)
    entry["options"].pop("extern_libs", None)
    return json.dumps(entry)


def compile_all(items: list[tuple[str, str, str]], workers: int, device: int, done: list[int]) -> None:
    """Compiles the variants on `workers` threads into their kernels' caches for CUDA device
    `device` (the current device is the thread's own), then builds their launchers (a C stub per
    signature, built at a variant's first launch otherwise); `done` gets how many compiled."""
    from triton.backends import driver
    from triton.runtime._async_compile import AsyncCompileMode

    with contextlib.suppress(Exception):  # (never a traceback from here: the launches compile what is missing)
        torch.cuda.set_device(device)
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="epinfer-compile") as pool:
            futures = []
            with AsyncCompileMode(pool, ignore_errors=True):
                for module, name, data in items:
                    fn = jit_function(module, name)
                    if fn is None:
                        continue
                    with contextlib.suppress(Exception):  # (a variant the kernel no longer takes)
                        futures.append(fn.preload(portable(data)))
            kernels = [k for k in (getattr(f, "kernel", None) for f in futures) if k is not None]
            done.extend(1 for _ in kernels)
            launcher = driver.active.launcher_cls
            builds = [pool.submit(launcher, k.src, k.metadata) for k in kernels]
            concurrent.futures.wait(builds)


class Preload:
    """This GPU's manifest compiling on a thread (`start`); `join()` before the first launch."""

    def __init__(self, items: list[tuple[str, str, str]], device: int) -> None:
        self.submitted: list[int] = []
        workers = max(1, min(16, (os.cpu_count() or 2) - 1))
        self.thread = threading.Thread(target=compile_all, args=(items, workers, device, self.submitted),
                                       name="epinfer-preload", daemon=True)
        self.thread.start()

    def join(self) -> int:
        """Waits for the compiles; returns how many variants compiled (one that failed is left to
        its launch)."""
        self.thread.join()
        return len(self.submitted)


def start(device: torch.device) -> Preload | None:
    """Starts compiling the manifest of `device`'s GPU, or None where there is nothing to do (not
    a CUDA device, no manifest, switched off). Under EPINFER_RECORD_KERNELS it records instead:
    every variant is then compiled by its launch, and so recorded."""
    if device.type != "cuda":
        return None
    if SWITCHES.record_kernels:
        record_to(SWITCHES.record_kernels)
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    path = manifest_path(torch.cuda.get_device_name(index))
    if not SWITCHES.preload_kernels or not path.is_file():
        return None
    import triton

    items = variants(path, triton.__version__)
    return Preload(items, index) if items else None
