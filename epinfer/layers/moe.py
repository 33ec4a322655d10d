"""Mixture-of-experts block: router → dispatcher → local experts → combine, plus an optional
gated shared expert.

Router: softmax over all experts in fp32, top-k, optional renormalisation (every supported family
routes this way; Mixtral's softmax-over-top-k-logits gives the same numbers). Experts are stored
fused, `w13 [E_local, 2I_local, D]` (gate rows then up rows) and `w2 [E_local, D, I_local]`:
with expert parallelism a rank owns a contiguous range of experts (counts may differ by one);
with `--no-expert-parallel` every rank owns all experts with I split over the TP group.

With EP and TP > 1 the block is sequence-parallel: each TP rank routes its 1/TP slice of the
replica's rows and the TP group all-gathers the result; the shared expert then runs on the slice
with full weights, so each row gets it exactly once. Rows past the batch's real rows get top-k
weight 0 (and are not sent by dispatchers that send routed rows only).

Shape suffixes: T rows, D hidden, E experts, K top-k, I expert intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from epinfer.config import ModelConfig
from epinfer.distributed.dispatch import make_dispatcher
from epinfer.distributed.parallel import ParallelContext, shard_range, split_evenly
from epinfer.layers.linear import GatedMLP, Linear
from epinfer.runner.batch import ForwardBatch


def route(router_logits_TE: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (topk_weights_TK fp32, topk_ids_TK int64)."""
    probs = torch.softmax(router_logits_TE, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedExperts(nn.Module):
    def __init__(self, expert_ids: range, hidden: int, intermediate: int, num_experts_total: int,
                 inter_index: range | None = None) -> None:
        super().__init__()
        self.expert_ids = expert_ids
        self.num_experts_total = num_experts_total
        self.first_expert = expert_ids.start
        self.inter_index = inter_index  # intermediate rows kept (TP-sharded experts), None = all
        inter = len(inter_index) if inter_index is not None else intermediate
        n = len(expert_ids)
        self.w13 = nn.Parameter(torch.empty(n, 2 * inter, hidden))
        self.w2 = nn.Parameter(torch.empty(n, hidden, inter))

    def forward(self, x_TD: torch.Tensor, topk_weights_TK: torch.Tensor,
                topk_ids_TK: torch.Tensor) -> torch.Tensor:
        """Weighted sum over (row, k) pairs routed to this rank's experts; others contribute 0."""
        out = torch.zeros_like(x_TD)
        num_local = self.w13.shape[0]
        if num_local == 0 or x_TD.shape[0] == 0:
            return out
        K = topk_ids_TK.shape[1]
        local_ids = (topk_ids_TK.flatten() - self.first_expert).clamp(-1, num_local)
        counts = torch.bincount(local_ids + 1, minlength=num_local + 2)
        counts = counts[1:num_local + 1].tolist()  # host sync: expert sizes drive the loop
        order = torch.argsort(local_ids, stable=True)
        start = int((local_ids < 0).sum())
        flat_weights = topk_weights_TK.flatten()
        if _use_grouped_mm(x_TD):
            return self._grouped(x_TD, out, order[start:start + sum(counts)], counts, flat_weights, K)
        for e, count in enumerate(counts):
            if count == 0:
                continue
            pairs = order[start:start + count]
            start += count
            rows = pairs // K
            gate, up = F.linear(x_TD[rows], self.w13[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[e])
            y = y * flat_weights[pairs, None].to(y.dtype)
            out.index_add_(0, rows, y)
        return out


    def _grouped(self, x_TD, out, pairs, counts, flat_weights, K):
        """All local experts in two grouped GEMMs (GPU, bf16): pairs are sorted by expert."""
        rows = pairs // K
        offs = torch.tensor(counts, device=x_TD.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        gate_up = F.grouped_mm(x_TD[rows], self.w13.transpose(1, 2), offs=offs)  # [P, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        y = F.grouped_mm(F.silu(gate) * up, self.w2.transpose(1, 2), offs=offs)  # [P, D]
        y = y * flat_weights[pairs, None].to(y.dtype)
        return out.index_add_(0, rows, y)


def _use_grouped_mm(x: torch.Tensor) -> bool:
    # the per-expert loop stays the reference (CPU, float32: exact comparisons with transformers)
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(F, "grouped_mm") and GROUPED_MM[0]


GROUPED_MM = [True]  # switch for A/B checks


class MoEBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, layer_idx: int) -> None:
        super().__init__()
        self.ctx = ctx
        self.label = f"layer.{layer_idx}.moe"
        self.first_moe = layer_idx == cfg.mlp_types.index("moe")
        self.top_k = cfg.top_k
        self.renormalize = cfg.norm_topk_prob
        self.gate = Linear(cfg.hidden_size, cfg.num_experts)
        if ctx.ep_size > 1:
            ids = range(*split_evenly(cfg.num_experts, ctx.ep_size, ctx.ep_rank))
            self.experts = FusedExperts(ids, cfg.hidden_size, cfg.moe_intermediate_size,
                                        cfg.num_experts)
        else:
            inter = None if ctx.tp_size == 1 else shard_range(
                cfg.moe_intermediate_size, ctx.tp_size, ctx.tp_rank, "expert intermediate size")
            self.experts = FusedExperts(range(cfg.num_experts), cfg.hidden_size,
                                        cfg.moe_intermediate_size, cfg.num_experts, inter)
        self.dispatcher = make_dispatcher(ctx, self.label) if ctx.ep_size > 1 else None
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, ctx,
                                          f"{self.label}.shared", tp_sharded=ctx.ep_size == 1)
            self.shared_expert_gate = Linear(cfg.hidden_size, 1)

    def forward(self, x_TD: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        ctx = self.ctx
        real = batch.num_real_rows
        if self.first_moe and ctx.fault is not None and ctx.fault.leak_active(batch.step_id):
            # the `leak-pad` fault (tests only): padding rows bleed into real rows
            leak = x_TD[real:].sum(0) if real < x_TD.shape[0] else torch.full_like(x_TD[0], float("nan"))
            x_TD = torch.cat([x_TD[:real] + leak, x_TD[real:]])
        if ctx.sequence_parallel:
            rows = x_TD.shape[0] // ctx.tp_size
            lo = ctx.tp_rank * rows
            x_TD = x_TD[lo:lo + rows]
            real = min(max(real - lo, 0), rows)
        weights, ids = route(self.gate(x_TD), self.top_k, self.renormalize)
        weights[real:] = 0.0
        if x_TD.dtype != torch.float32:
            weights = weights.to(x_TD.dtype)
        if self.dispatcher is not None:
            self.dispatcher.begin(x_TD, batch.moe_sizes, batch.step_id)
            out = self.dispatcher(x_TD, weights, ids, real, batch.moe_sizes, self.experts)
        else:
            out = self.experts(x_TD, weights, ids)
            if ctx.tp_size > 1:  # TP-sharded experts: partial sums
                out = ctx.comm.all_reduce(out, ctx.groups.tp_group, f"{self.label}.tp_reduce")
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x_TD)) * self.shared_expert(x_TD)
        if ctx.sequence_parallel:
            out = ctx.comm.all_gather(out, ctx.groups.tp_group, f"{self.label}.sp_gather")
        return out
