"""Mixture-of-experts block: router → experts → weighted sum, plus an optional gated shared expert.

Router: softmax over all experts in fp32, top-k, optional renormalisation (every supported
family routes this way; Mixtral's softmax-over-top-k-logits is the same numbers). Experts are
stored fused: `w13 [E_local, 2I, H]` (gate rows then up rows) and `w2 [E_local, H, I]`, where
`E_local` are the experts this rank owns (`expert_ids`). Rows at or past `num_real_rows` get
weight 0 so padding never contributes.

Shape suffixes: T rows, D hidden, E experts, K top-k, I expert intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from epinfer.config import ModelConfig
from epinfer.layers.linear import GatedMLP, Linear


def route(
    router_logits_TE: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (topk_weights_TK fp32, topk_ids_TK int64)."""
    probs = torch.softmax(router_logits_TE, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedExperts(nn.Module):
    def __init__(self, expert_ids: list[int], hidden: int, intermediate: int) -> None:
        super().__init__()
        self.expert_ids = list(expert_ids)
        self.intermediate = intermediate
        n = len(expert_ids)
        self.w13 = nn.Parameter(torch.empty(n, 2 * intermediate, hidden))
        self.w2 = nn.Parameter(torch.empty(n, hidden, intermediate))

    def forward(
        self, x_TD: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor,
        first_expert: int = 0,
    ) -> torch.Tensor:
        """Sum over (token, k) pairs routed to the local experts `first_expert + [0, E_local)`."""
        out = torch.zeros_like(x_TD)
        K = topk_ids_TK.shape[1]
        local_ids = topk_ids_TK.flatten() - first_expert
        num_local = self.w13.shape[0]
        counts = torch.bincount(local_ids.clamp(-1, num_local) + 1, minlength=num_local + 2)
        counts = counts[1:num_local + 1].tolist()  # host sync: expert sizes drive the loop
        order = torch.argsort(local_ids, stable=True)
        start = int((local_ids < 0).sum())
        flat_weights = topk_weights_TK.flatten()
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


class MoEBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, expert_ids: list[int] | None = None) -> None:
        super().__init__()
        self.top_k = cfg.top_k
        self.renormalize = cfg.norm_topk_prob
        self.gate = Linear(cfg.hidden_size, cfg.num_experts)
        ids = list(range(cfg.num_experts)) if expert_ids is None else expert_ids
        self.experts = FusedExperts(ids, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(cfg.hidden_size, 1)

    def forward(self, x_TD: torch.Tensor, num_real_rows: int) -> torch.Tensor:
        weights, ids = route(self.gate(x_TD), self.top_k, self.renormalize)
        weights[num_real_rows:] = 0.0
        weights = weights.to(x_TD.dtype) if x_TD.dtype != torch.float32 else weights
        out = self.experts(x_TD, weights, ids, first_expert=self.experts.expert_ids[0])
        if self.shared_expert is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x_TD)) * self.shared_expert(x_TD)
            out = out + shared
        return out
