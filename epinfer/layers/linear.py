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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reduce:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight)
        y = self.ctx.comm.all_reduce(y, self.ctx.groups.tp_group, self.label)
        return y if self.bias is None else y + self.bias


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
