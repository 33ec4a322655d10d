"""Programmatic dependent launch (Hopper and newer) for the decode path's Triton kernels.

A kernel launched with PDL may start while the kernel before it in the stream is still finishing:
its programs get scheduled and wait at `gdc_wait()` (until the previous grid has completed and its
memory is visible) instead of paying the launch and ramp-up after it. Each PDL kernel therefore
calls `gdc_wait()` before it reads or writes anything another kernel touches, which keeps stream
order exact (transitively: a kernel that passed its wait knows its predecessor passed its own), and
`gdc_launch_dependents()` once its main loop is done so the next one can be scheduled. At batch 1 a
layer is ~12 kernels of a few µs each, where launch gaps are a large share (RESULTS.md §1.4).

On by default on Hopper-or-newer GPUs when Triton has the gdc ops (EPINFER_PDL=0 turns it off):
batch-1 decode of the 30B shape 324.5 vs 306.0 tok/s without (H200, 2026-11-29, RESULTS.md); CPU
and interpreter runs never use it.
"""

from __future__ import annotations

import functools

import torch

from epinfer.core.env import SWITCHES

try:  # Triton is optional: CPU installs don't have it
    import triton.language as tl

    SUPPORTED = hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents")
except Exception:  # pragma: no cover - any Triton that cannot say: no PDL
    SUPPORTED = False

ENABLED = SWITCHES.pdl


@functools.cache
def _hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


LAUNCH = True  # False: the chain's kernels, launched plainly (tests compare the two)

# the most weight bytes a one-row program (`small_gemm.gemv`, the FP8 experts' down kernel in
# `moe_gemv`) loads whole before it waits for the kernel before it: its weights do not depend on that
# kernel, so their reads overlap its tail; 0 (EPINFER_PDL_PRELOAD=0): none, and the router's GEMV
# (`moe_router.gate_route`) loads its weights after the wait too. FP8 decode of one row, H100
# (2026-12-06, RESULTS.md §1.5): the 30B shape's step 2.86 -> 2.57 ms, Qwen3.5's 3.91 -> 3.53
PRELOAD_BYTES = 32768 if SWITCHES.pdl_preload else 0


def whole(device: torch.device, rows: int, depth: int, element_size: int, group: int = 1) -> int:
    """The width (a power of two >= `depth`) in which a program's `rows` weight rows of `depth` columns
    are loaded whole before its PDL wait, 0 when they are not (PDL off, over PRELOAD_BYTES, or, for FP8
    weights scaled in groups of `group` columns, narrower than one group)."""
    width = 1 << max(depth - 1, 0).bit_length()
    return width if on(device) and rows * width * element_size <= PRELOAD_BYTES and width >= group else 0


def chain(device: torch.device) -> bool:
    """Whether the decode layer runs as a chain of Triton kernels that can be launched with PDL
    (the add + norm and the q/k/v GEMM too, which otherwise are inductor / cuBLAS kernels)."""
    return (ENABLED and SUPPORTED and device.type == "cuda" and torch.version.hip is None  # (NVIDIA only)
            and _hopper_or_newer(device.index if device.index is not None else torch.cuda.current_device()))


def on(device: torch.device) -> bool:
    """Whether kernels launched for `device` use PDL."""
    return LAUNCH and chain(device)


def kwargs(device: torch.device) -> dict:
    """A chain kernel's launch keywords: its PDL constexpr, and the launch option when it is on."""
    return {"PDL": True, "launch_pdl": True} if on(device) else {"PDL": False}
