"""SiLU(gate) * up as one Triton kernel (bf16 / fp16 on CUDA) over the two halves of a stacked
projection's output: the MoE experts' [pairs, 2I] between the two grouped GEMMs, and the dense /
shared-expert MLP's stacked gate / up. Inductor's dynamic-shape kernel for it read the strided halves
at 1.5 TB/s: 10.6 ms of a 16384-row mixed step of the Qwen3.5-35B-A3B shape (40 layers, 131,072
routed pairs) on an H200 (RESULTS.md, end-to-end workloads). Products in float32, rounded once (as
inductor's fused kernel rounds).
"""

from __future__ import annotations

import torch

from epinfer.core.env import SWITCHES

try:  # Triton is optional: CPU installs don't have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

CONFIG = (16, 256, 4)  # rows, columns, warps a program


def usable(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Two [N, I] low-precision CUDA views with unit inner stride and one row stride (the halves
    of one [N, 2I] output, or two tensors laid out alike), unless EPINFER_MIXED_STEP_KERNELS=0."""
    return (triton is not None and SWITCHES.mixed_step_kernels and gate.is_cuda
            and gate.dtype in (torch.bfloat16, torch.float16) and up.dtype == gate.dtype and gate.dim() == 2
            and gate.shape == up.shape and gate.shape[0] > 0 and gate.stride(1) == 1 and up.stride(1) == 1
            and gate.stride(0) == up.stride(0))


def silu_mul(gate: torch.Tensor, up: torch.Tensor, cfg: tuple[int, int, int] | None = None) -> torch.Tensor:
    """`cfg`: (rows, columns, warps) a program (default `CONFIG`; the sweep's)."""
    N, inter = gate.shape
    rows, cols, warps = cfg or CONFIG
    out = torch.empty((N, inter), dtype=gate.dtype, device=gate.device)
    grid = (triton.cdiv(N, rows), triton.cdiv(inter, cols))
    _silu_mul_kernel[grid](gate, up, out, N, gate.stride(0), inter, BLOCK_R=rows, BLOCK_C=cols, num_warps=warps)
    return out


if triton is not None:

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, N, stride, inter, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        mask = (r < N) & (c < inter)
        at = r.to(tl.int64) * stride + c
        g = tl.load(g_ptr + at, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + at, mask=mask, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(out_ptr + r.to(tl.int64) * inter + c, y.to(out_ptr.dtype.element_ty), mask=mask)
