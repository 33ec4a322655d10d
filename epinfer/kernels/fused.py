"""Small-op fusion on the GPU: `fused(fn)` runs `fn` through `torch.compile` (Triton kernels from
inductor) when its first tensor argument is a CUDA tensor of a low-precision float or an integer
type (expert ids), and as plain torch everywhere else — CPU runs and float32 correctness runs keep
the exact reference arithmetic.

A decode step is otherwise dozens of tiny elementwise kernels per layer (norm statistics, rotary
halves, router softmax / top-k renormalisation, the MoE permutation, the gated delta rule's decode
update), each costing a launch slot even inside a CUDA graph. Compiled with dynamic shapes, each
fused function serves every layer and batch size; the first call (a warm-up, never a graph
capture) compiles it. If compilation fails the function falls back to eager, once, with a note.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

from epinfer.core.env import SWITCHES

ENABLED = SWITCHES.compile  # EPINFER_COMPILE=0: eager, for A/B runs


@functools.cache
def _configure_dynamo() -> None:
    """On first use only (importing dynamo costs start-up time CPU runs never need)."""
    persistent_cache()
    for name in ("cache_size_limit", "recompile_limit"):  # variants per 0/1-size specialisation and dtype
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)


def persistent_cache() -> str | None:
    """TorchInductor's compiled kernels and graphs kept where a reboot leaves them: its own default is
    /tmp/torchinductor_<user>, which many systems empty at boot, and then the next start compiles
    everything again (on an H200 a cold start took 76-100 s against 18-28 s warm, RESULTS.md). Points
    TORCHINDUCTOR_CACHE_DIR at $XDG_CACHE_HOME/epinfer/inductor (~/.cache unless set) when the user
    has not set it and that folder can be made; returns the folder in use (None: inductor's default)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return os.environ["TORCHINDUCTOR_CACHE_DIR"]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(root, "epinfer", "inductor")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return None
    if not os.access(folder, os.W_OK):
        return None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder


EXACT = (torch.float32, torch.float64)  # reference arithmetic: never compiled (integer work is exact anyway)


def fused(fn):
    state: dict = {}

    @functools.wraps(fn)
    def wrapper(*args):
        x = args[0]
        if not (ENABLED and x.is_cuda and x.dtype not in EXACT) or state.get("broken"):
            return fn(*args)
        if "compiled" not in state:
            _configure_dynamo()
            state["compiled"] = torch.compile(fn, dynamic=True, fullgraph=True)
        try:
            return state["compiled"](*args)
        except Exception as exc:  # a compiler problem must not stop inference: run eager from now on
            state["broken"] = True
            print(f"epinfer: note: torch.compile of {fn.__name__} failed ({type(exc).__name__}); running it eager",
                  file=sys.stderr)
            return fn(*args)

    return wrapper
