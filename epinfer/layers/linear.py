"""Linear layers (replicated, column-parallel, row-parallel) and the dense gated MLP.

Weights keep the Hugging Face layout `[out, in]`. A sharded parameter carries `shard_dim` and
`shard_index` (the global rows / columns this rank keeps); the checkpoint loader selects them, so
no layer ever sees a full-size tensor. A row-parallel layer sums its partial output over the TP
group through the communicator (bias added once, after the sum).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from epinfer.distributed.parallel import ParallelContext, shard_range
from epinfer.kernels import activation, fp8_gemm, pdl, small_gemm
from epinfer.kernels.fused import fused


def set_shard(param: nn.Parameter, dim: int, index: Sequence[int]) -> None:
    param.shard_dim = dim
    param.shard_index = torch.tensor(list(index), dtype=torch.long, device="cpu")


class Linear(nn.Module):
    """Replicated linear layer; `out_index` / `in_index` make it column- / row-sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 out_index: Sequence[int] | None = None, in_index: Sequence[int] | None = None,
                 ctx: ParallelContext | None = None, label: str = "") -> None:
        super().__init__()
        out_local = len(out_index) if out_index is not None else out_features
        in_local = len(in_index) if in_index is not None else in_features
        self.weight = nn.Parameter(torch.empty(out_local, in_local))
        self.bias = nn.Parameter(torch.empty(out_local)) if bias else None
        if out_index is not None:
            set_shard(self.weight, 0, out_index)
            if self.bias is not None:
                set_shard(self.bias, 0, out_index)
        if in_index is not None:
            set_shard(self.weight, 1, in_index)
        self.reduce = in_index is not None and ctx is not None and ctx.tp_size > 1
        self.ctx, self.label = ctx, label

    small_rows = False  # set on projections where `small_gemm` beats cuBLAS at decode sizes (o_proj, LM head)
    fp8_block: tuple[int, int] | None = None  # set by `to_fp8`
    fp8_compute_dtype: torch.dtype | None = None  # an FP8 layer's compute dtype (its weight's before)

    def to_fp8(self, block: tuple[int, int]) -> None:
        """The weight as FP8 with float32 scales per (block rows x block columns) of this rank's
        shard (`kernels.fp8_gemm`); activations are then quantised per row and block of columns."""
        q, scale = fp8_gemm.quantize_blocks(self.weight.detach(), block)
        self.fp8_compute_dtype = self.weight.dtype
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_scale", scale, persistent=False)
        self.fp8_block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_block is not None:
            return self._fp8(x)
        if not self.reduce:
            if self.small_rows and small_gemm.usable(x, self.weight):
                return small_gemm.linear(x, self.weight, self.bias)
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight)
        y = self.ctx.comm.all_reduce(y, self.ctx.groups.tp_group, self.label)
        return y if self.bias is None else y + self.bias

    def _fp8(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.weight_scale, self.fp8_block, None if self.reduce else self.bias)
        if not self.reduce:
            return y
        y = self.ctx.comm.all_reduce(y, self.ctx.groups.tp_group, self.label)
        return y if self.bias is None else y + self.bias


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
               bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ an FP8 weight with block scales: the Triton kernel on GPUs, elsewhere (CPU,
    float32 runs) the same quantisation in torch."""
    rows = x.reshape(-1, x.shape[-1])
    if fp8_gemm.usable(rows, weight, block):
        y = fp8_gemm.fp8_linear(rows, weight, scale, block, bias)
    else:
        y = fp8_gemm.fp8_linear_reference(rows, weight, scale, block, bias)
    return y.view(*x.shape[:-1], y.shape[-1])


class Stacked:
    """Linears that read the same input as one GEMM: after loading, their weights (and biases) are
    moved into one tensor and each Linear's parameters become views of it (no extra memory).
    Applied to low-precision runs only: float32 keeps one GEMM per projection, the reference
    arithmetic transformers uses. The rows are padded with zeros to a multiple of 16: cuBLAS picks a
    slow unaligned kernel otherwise (the shared expert's gate | up | gate column, 1025 rows: a cutlass
    sm75 kernel at batch 64 on an H200). FP8 projections stack their FP8 rows and their scales'
    block rows alike (each but the last a whole number of blocks: `stack_linears`); the input is
    then quantised once for all of them. Only the first `count` linears are stacked; the rest (bf16
    columns after FP8 ones: the GDN's decay / write-strength rows, the shared expert's gate column) are
    stacked among themselves where they can be, and run as a bf16 stack does; a call returns every
    linear's output in order."""

    def __init__(self, linears: Sequence[Linear], count: int) -> None:
        linears, apart = linears[:count], list(linears[count:])
        self.rest = stack_linears(apart) if len(apart) > 1 else None
        self.apart = [] if self.rest is not None else apart
        ws = [lin.weight for lin in linears]
        self.sizes = [w.shape[0] for w in ws]
        pad = -sum(self.sizes) % 16
        self.split = self.sizes + [pad] if pad else self.sizes
        self.weight = torch.cat([w.detach() for w in ws] + [ws[0].new_zeros(pad, ws[0].shape[1])])
        self.bias = None
        if any(lin.bias is not None for lin in linears):
            self.bias = torch.cat([lin.bias.detach() if lin.bias is not None else w.new_zeros(w.shape[0])
                                   for lin, w in zip(linears, ws, strict=True)] + [ws[0].new_zeros(pad)])
        self.block = linears[0].fp8_block
        if self.block is not None:  # the padding rows' own block row, where they start one (zero rows: any scale)
            scales = [lin.weight_scale for lin in linears]
            more = -(-self.weight.shape[0] // self.block[0]) - sum(sc.shape[0] for sc in scales)
            self.scale = torch.cat(scales + [scales[0].new_ones(more, scales[0].shape[1])])
        at = row = 0
        for lin, n in zip(linears, self.sizes, strict=True):
            lin.weight = nn.Parameter(self.weight[at:at + n], requires_grad=False)
            if lin.bias is not None:
                lin.bias = nn.Parameter(self.bias[at:at + n], requires_grad=False)
            if self.block is not None:
                lin.weight_scale = self.scale[row:row + lin.weight_scale.shape[0]]
                row += lin.weight_scale.shape[0]
            at += n

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.block is not None:
            y = fp8_linear(x, self.weight, self.scale, self.block, self.bias)
        else:
            y = chain_linear(x, self.weight, self.bias)
        rest = self.rest(x) if self.rest is not None else (
            lin(x) if lin.fp8_block is not None else chain_linear(x, lin.weight, lin.bias) for lin in self.apart)
        return (*y.split(self.split, dim=-1)[:len(self.sizes)], *rest)


def chain_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A low-precision projection with no TP reduction: at decode sizes in a PDL chain `small_gemm`'s
    kernel (a tie with cuBLAS at q/k/v sizes, but a link of the chain, and one kernel where cuBLAS's
    one-column GEMV takes two), else cuBLAS."""
    if pdl.chain(x.device) and small_gemm.usable(x, weight):
        return small_gemm.linear(x, weight, bias)
    return F.linear(x, weight, bias)


def stack_linears(linears: Sequence[Linear]) -> Stacked | None:
    """A Stacked for `linears` when they qualify (low precision, no TP reduction), else None: the
    longest leading run in the first one's format (FP8 in the same blocks, each but the last a whole
    number of block rows) is stacked, when it holds two or more."""
    dtype = linears[0].fp8_compute_dtype or linears[0].weight.dtype
    if any(lin.reduce for lin in linears) or dtype in (torch.float32, torch.float64):
        return None
    block = linears[0].fp8_block
    count = 1
    while count < len(linears) and linears[count].fp8_block == block and (
            block is None or linears[count - 1].weight.shape[0] % block[0] == 0):
        count += 1
    return Stacked(linears, count) if count > 1 else None


def column_parallel(in_f: int, out_f: int, ctx: ParallelContext, what: str, bias: bool = False) -> Linear:
    if ctx.tp_size == 1:
        return Linear(in_f, out_f, bias)
    return Linear(in_f, out_f, bias, out_index=shard_range(out_f, ctx.tp_size, ctx.tp_rank, what))


def row_parallel(in_f: int, out_f: int, ctx: ParallelContext, what: str, label: str,
                 bias: bool = False) -> Linear:
    if ctx.tp_size == 1:
        return Linear(in_f, out_f, bias)
    return Linear(in_f, out_f, bias, in_index=shard_range(in_f, ctx.tp_size, ctx.tp_rank, what),
                  ctx=ctx, label=label)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) — the dense MLP and the shared expert. `tp_sharded=False`
    keeps full weights (a shared expert run on sequence-parallel rows)."""

    def __init__(self, hidden: int, intermediate: int, ctx: ParallelContext | None = None,
                 label: str = "", tp_sharded: bool = True) -> None:
        super().__init__()
        ctx = ctx if (ctx is not None and tp_sharded) else ParallelContext()
        what = "MLP intermediate size"
        self.gate_proj = column_parallel(hidden, intermediate, ctx, what)
        self.up_proj = column_parallel(hidden, intermediate, ctx, what)
        self.down_proj = row_parallel(intermediate, hidden, ctx, what, label)
        self.gate_up: Stacked | None = None
        self.stack_with: list[Linear] = []  # more projections of the same input in the stacked GEMM

    def stack(self) -> None:
        self.gate_up = stack_linears([self.gate_proj, self.up_proj, *self.stack_with])

    def forward(self, x: torch.Tensor, with_extra: bool = False):
        """The MLP's output; `with_extra`: (it, the `stack_with` projections' outputs)."""
        if self.gate_up is not None:
            gate, up, *extra = self.gate_up(x)
            y = self.down_proj(silu_mul(gate, up))
        else:
            y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
            extra = [lin(x) for lin in self.stack_with] if with_extra else []
        return (y, extra) if with_extra else y


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up: the Triton kernel where it applies (`kernels/activation.py`), else compiled."""
    return activation.silu_mul(gate, up) if activation.usable(gate, up) else _silu_mul(gate, up)


@fused
def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
