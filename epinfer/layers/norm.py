"""RMS norms: the Llama form (`w * x̂`), the zero-centred form (`(1 + w) * x̂`, Qwen3-Next / Qwen3.5)
and the gated form used after the gated delta rule (`w * x̂ * silu(z)`).

Each computes the statistics in float32 and rounds where the reference implementation rounds, so
float32 and bfloat16 runs match transformers bit for bit as far as the arithmetic allows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from epinfer.kernels import norm_triton, pdl
from epinfer.kernels.fused import fused


@fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if zero_centered:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


@fused
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 zero_centered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, its norm) in one pass. A residual [T, K, D] (the MoE experts' per-pair
    outputs, float32) is summed over K first and rounded as the experts' own sum would be."""
    if residual.dim() == 3:
        residual = residual.sum(1).to(x.dtype)
    x = x + residual
    return x, rms_norm.__wrapped__(x, weight, eps, zero_centered)


@fused
def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * normed.to(x.dtype)
    return (out * F.silu(gate.float())).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, zero_centered: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.zero_centered)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the experts' unsummed outputs, or a link of the PDL chain
        if (residual.dim() == 3 or pdl.chain(x.device)) and norm_triton.usable(x, residual, self.weight):
            return norm_triton.add_rms_norm(x, residual, self.weight, self.eps, self.zero_centered)
        return add_rms_norm(x, residual, self.weight, self.eps, self.zero_centered)


class GatedRMSNorm(nn.Module):
    """Norm over the last dim, then multiply by silu(gate)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if norm_triton.gated_usable(x, gate, self.weight):
            return norm_triton.gated_rms_norm(x, gate, self.weight, self.eps)
        return gated_rms_norm(x, gate, self.weight, self.eps)
