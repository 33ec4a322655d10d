"""Mixture-of-experts block: router → dispatcher → local experts → combine, plus an optional
gated shared expert.

Router: softmax over all experts in fp32, top-k, optional renormalisation (every supported family
routes this way; Mixtral's softmax-over-top-k-logits gives the same numbers). Experts are stored
fused, `w13 [E_local, 2I_local, D]` (gate rows then up rows) and `w2 [E_local, D, I_local]`:
with expert parallelism a rank owns a contiguous range of experts (counts may differ by one);
with `--no-expert-parallel` every rank owns all experts with I split over the TP group.

With EP and TP > 1 the block is sequence-parallel when DP > 1: each TP rank routes its 1/TP slice
of the replica's rows and the TP group all-gathers the result; the shared expert then runs on the
slice with full weights, so each row gets it exactly once. With DP = 1 the EP group is the TP group
and every rank has all the rows (`replicated_moe`): each runs its own experts on them and a TP
all-reduce sums the partial outputs, as with TP-sharded experts (the shared expert TP-sharded too).
Rows past the batch's real rows get top-k weight 0 (and are not sent by dispatchers that send
routed rows only).

Shape suffixes: T rows, D hidden, E experts, K top-k, I expert intermediate.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from epinfer.core.config import ModelConfig
from epinfer.core.env import SWITCHES
from epinfer.core.forward import ForwardBatch
from epinfer.distributed.dispatch import make_dispatcher
from epinfer.distributed.parallel import ParallelContext, shard_range, split_evenly
from epinfer.kernels import fp8_gemm, moe_configs, moe_router, moe_triton
from epinfer.kernels.fused import fused
from epinfer.layers.linear import GatedMLP, Linear, silu_mul


@fused
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
        self.fp8: tuple | None = None  # (w13 scales, w2 scales, block) once `to_fp8` ran

    def to_fp8(self, block: tuple[int, int]) -> None:
        """Expert weights as FP8 with block scales per expert (`kernels.fp8_gemm.quantize_blocks`)."""
        (w13, s13), (w2, s2) = (fp8_gemm.quantize_blocks(w.detach(), block) for w in (self.w13, self.w2))
        self.w13, self.w2 = nn.Parameter(w13, requires_grad=False), nn.Parameter(w2, requires_grad=False)
        self.fp8 = (s13, s2, block)

    def forward(self, x_TD: torch.Tensor, topk_weights_TK: torch.Tensor,
                topk_ids_TK: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """Weighted sum over (row, k) pairs routed to this rank's experts; others contribute 0.
        `reduce=False` lets the Triton path return the per-pair outputs [T, K, D] in float32 unsummed
        (the caller's next residual add sums them: `norm.add_rms_norm`); other paths always sum."""
        num_local = self.w13.shape[0]
        if num_local == 0 or x_TD.shape[0] == 0:
            return torch.zeros_like(x_TD)
        pairs = topk_ids_TK.numel()
        if self.fp8 is not None:
            return self._fp8(x_TD, topk_weights_TK, topk_ids_TK, reduce)
        if moe_triton.grouped_usable(x_TD, pairs, num_local):  # decode sizes: gather-GEMM kernels
            cfg = moe_configs.grouped_config(pairs, num_local)  # (once: it also says which mode)
            plan = None if cfg is moe_configs.PER_PAIR else permute_pairs(topk_ids_TK, self.first_expert, num_local)
            return moe_triton.moe_grouped(x_TD, self.w13, self.w2, topk_weights_TK, topk_ids_TK, self.first_expert,
                                          num_local == self.num_experts_total, plan, cfg, reduce=reduce)
        if x_TD.is_cuda and grouped_mm_supported(x_TD.dtype):
            return self._grouped(x_TD, topk_weights_TK, topk_ids_TK)
        if x_TD.is_cuda:
            return self._dense(x_TD, topk_weights_TK, topk_ids_TK)
        out = torch.zeros_like(x_TD)
        K = topk_ids_TK.shape[1]
        local_ids = (topk_ids_TK.flatten() - self.first_expert).clamp(-1, num_local)
        counts = torch.bincount(local_ids + 1, minlength=num_local + 2)
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

    def _fp8(self, x_TD, topk_weights_TK, topk_ids_TK, reduce: bool = True):
        """FP8 experts: the grouped kernels at every size on GPUs; elsewhere the same quantisation
        per expert in torch (float32 products, the activations rounded to x's dtype as the kernel's are).
        `reduce=False` as in `forward`, at the sizes where bf16's experts take it too (decode sizes:
        above, the kernels' bf16 outputs summed at once move fewer bytes than float32 ones summed later)."""
        n = self.w13.shape[0]
        s13, s2, block = self.fp8
        if dequantized_experts(x_TD, topk_ids_TK.numel(), self.num_experts_total):  # prefill sizes: bf16's GEMM
            return self._grouped(x_TD, topk_weights_TK, topk_ids_TK,
                                 fp8_gemm.dequantize_weights(self.w13, s13, block, x_TD.dtype),
                                 fp8_gemm.dequantize_weights(self.w2, s2, block, x_TD.dtype))
        if moe_triton.usable(x_TD):
            per_pair = moe_configs.per_pair(topk_ids_TK.numel())
            plan = None if per_pair else permute_pairs(topk_ids_TK, self.first_expert, n)
            reduce = reduce or not moe_triton.grouped_usable(x_TD, topk_ids_TK.numel(), n)
            return moe_triton.moe_grouped(x_TD, self.w13, self.w2, topk_weights_TK, topk_ids_TK, self.first_expert,
                                          n == self.num_experts_total, plan, reduce=reduce, fp8=self.fp8)
        out = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        local = topk_ids_TK - self.first_expert
        xq = fp8_gemm.fake_quantize(x_TD, block[1])
        inter = self.w13.shape[1] // 2
        for e in range(n):
            rows, k = torch.nonzero(local == e, as_tuple=True)
            if rows.numel() == 0:
                continue
            gate_up = xq[rows] @ fp8_gemm.dequantize_blocks(self.w13[e], s13[e], block).T
            act = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]).to(x_TD.dtype)
            y = fp8_gemm.fake_quantize(act, block[1]) @ fp8_gemm.dequantize_blocks(self.w2[e], s2[e], block).T
            out.index_add_(0, rows, y * topk_weights_TK[rows, k, None].float())
        return out.to(x_TD.dtype)

    def _dense(self, x_TD, topk_weights_TK, topk_ids_TK):
        """Every local expert on every row, weighted by its routing weight (0 when not chosen):
        no host sync, for dtypes grouped_mm lacks (float32 correctness runs; E x the compute)."""
        out = torch.zeros_like(x_TD)
        local = topk_ids_TK - self.first_expert
        for e in range(self.w13.shape[0]):
            weight_T = (topk_weights_TK * (local == e)).sum(-1).to(x_TD.dtype)
            gate, up = F.linear(x_TD, self.w13[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[e])
            out = out + torch.where(weight_T[:, None] != 0, y * weight_T[:, None], 0.0)
        return out

    def _grouped(self, x_TD, topk_weights_TK, topk_ids_TK, w13=None, w2=None):
        """All local experts in two grouped GEMMs, with no host sync (CUDA-graph safe): (row, k)
        pairs sorted by local expert, pairs of other ranks' experts sorted last and weighted 0.
        `w13`, `w2`: these weights instead of the parameters (FP8 ones dequantised)."""
        n = self.w13.shape[0]
        w13, w2 = (self.w13 if w13 is None else w13), (self.w2 if w2 is None else w2)
        order, offs, rows, _ = permute_pairs(topk_ids_TK, self.first_expert, n)
        gate_up = F.grouped_mm(x_TD[rows], w13.transpose(1, 2), offs=offs)  # [P, 2I]
        y = F.grouped_mm(silu_mul(*gate_up.chunk(2, dim=-1)), w2.transpose(1, 2), offs=offs)  # [P, D]
        combine = moe_triton.combine if moe_triton.grouped_usable(x_TD, 0, n) else combine_pairs
        return combine(y, topk_weights_TK, topk_ids_TK, order, self.first_expert, n)


def dequantized_experts(x_TD: torch.Tensor, pairs: int, num_experts: int) -> bool:
    """Whether FP8 experts run dequantised through the grouped GEMM for `pairs` (row, expert) pairs
    handed to this rank's experts: EPINFER_FP8_DEQUANT_PAIRS pairs an expert or more, on average over
    all `num_experts` of the model (a rank's share of its rows' pairs), where `F.grouped_mm` runs."""
    at = SWITCHES.fp8_dequant_pairs
    return (at is not None and pairs >= at * num_experts and x_TD.is_cuda
            and grouped_mm_supported(x_TD.dtype))


def permute_pairs(ids_TK: torch.Tensor, first: int, n: int):
    """(order, offs, rows, active): pair indices sorted by local expert (stable; other ranks'
    experts last), grouped_mm's int32 group ends, each sorted pair's row, and the local experts
    that have pairs, in order, padded with -1 to min(pairs, n) entries (the Triton kernels' grid).
    One Triton kernel where `moe_triton.permute_usable` says so, else `torch_permute_pairs`."""
    if moe_triton.permute_usable(ids_TK, n):
        return moe_triton.permute(ids_TK, first, n)
    return torch_permute_pairs(ids_TK, first, n)


@fused
def torch_permute_pairs(ids_TK: torch.Tensor, first: int, n: int):
    """`permute_pairs` in torch (compiled on the GPU)."""
    local = ids_TK.flatten().long() - first  # (ids may be int32: a dispatcher's packed rows)
    key = torch.where((local >= 0) & (local < n), local, n)
    P = key.shape[0]
    if P <= 4096:  # counting sort by comparisons: fused reductions instead of a radix sort / scan
        idx = torch.arange(P, device=key.device)
        same = key[:, None] == key[None, :]
        rank = (same & (idx[None, :] < idx[:, None])).sum(1)  # earlier pairs with the same key
        counts = (key[None, :] == torch.arange(n + 1, device=key.device)[:, None]).sum(1)
        before = (key[None, :] < key[:, None]).sum(1)  # pairs with a smaller key
        order = torch.empty_like(key).scatter_(0, before + rank, idx)
    else:
        order = torch.argsort(key, stable=True)
        counts = torch.zeros(n + 1, dtype=torch.int32, device=key.device)  # (bincount would sync)
        counts.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))
    offs = counts[:n].cumsum(0, dtype=torch.int32)
    used = counts[:n] > 0
    slots = min(P, n)
    # slot of each used expert = used experts before it; unused ones write the dropped extra entry
    at = torch.where(used, used.cumsum(0) - 1, slots)
    active = torch.full((slots + 1,), -1, dtype=torch.int32, device=key.device)
    active = active.scatter(0, at, torch.arange(n, dtype=torch.int32, device=key.device))[:slots]
    return order, offs, order // ids_TK.shape[1], active


@fused
def combine_pairs(y_PD, weights_TK, ids_TK, order, first: int, n: int):
    """Weighted sum over k of each row's expert outputs; pairs past the last group (other ranks'
    experts: grouped_mm leaves them undefined) count 0. Each row gathers its K outputs through the
    inverse permutation and sums them in one pass (deterministic, unlike an atomic index_add; a
    scatter back to (row, k) order first would cost a slow scattered write of all P rows)."""
    T, K = ids_TK.shape
    inverse = moe_triton.inverse_permutation(order)
    local = ids_TK.flatten() - first
    mine = (local >= 0) & (local < n)
    y = torch.where(mine[:, None], y_PD[inverse] * weights_TK.flatten()[:, None].to(y_PD.dtype), 0.0)
    return y.view(T, K, -1).sum(1)


_GROUPED_MM_OK: dict[torch.dtype, bool] = {}


def grouped_mm_supported(dtype: torch.dtype) -> bool:
    """Whether `F.grouped_mm` runs on this GPU in `dtype` without a host sync: bf16 only (other
    dtypes take a fallback that copies the offsets to the host). `GROUPED_MM = False` turns it off."""
    if not (GROUPED_MM and hasattr(F, "grouped_mm")) or dtype != torch.bfloat16:
        return False
    if dtype not in _GROUPED_MM_OK:
        try:
            a = torch.zeros(4, 16, dtype=dtype, device="cuda")
            b = torch.zeros(2, 16, 16, dtype=dtype, device="cuda")
            F.grouped_mm(a, b, offs=torch.tensor([2, 4], dtype=torch.int32, device="cuda"))
            _GROUPED_MM_OK[dtype] = True
        except (RuntimeError, NotImplementedError) as exc:  # e.g. a GPU older than sm80
            _GROUPED_MM_OK[dtype] = False
            print(f"epinfer: note: F.grouped_mm unavailable here ({type(exc).__name__}); experts run "
                  f"without it (slower)", file=sys.stderr)
    return _GROUPED_MM_OK[dtype]


GROUPED_MM = True  # switch for A/B checks


@fused
def add_gated(out_TD: torch.Tensor, gate_T1: torch.Tensor, y_TD: torch.Tensor) -> torch.Tensor:
    return out_TD + torch.sigmoid(gate_T1) * y_TD


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
        self.dispatcher = make_dispatcher(ctx, self.label) if ctx.ep_size > 1 and not ctx.replicated_moe else None
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, ctx,
                                          f"{self.label}.shared", tp_sharded=self.dispatcher is None)
            self.shared_expert.down_proj.small_rows = True
            self.shared_expert_gate = Linear(cfg.hidden_size, 1)
            self.shared_expert.stack_with = [self.shared_expert_gate]  # gate | up | its gate: one GEMM

    def forward(self, x_TD: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        ctx = self.ctx
        real = batch.num_real_rows
        mask = batch.row_mask_T
        if ctx.sequence_parallel:
            rows = x_TD.shape[0] // ctx.tp_size
            lo = ctx.tp_rank * rows
            x_TD = x_TD[lo:lo + rows]
            real = min(max(real - lo, 0), rows)
            mask = mask[lo:lo + rows] if mask is not None else None
        # the Triton routers write straight into the dispatcher's packed rows, where it has them
        into = self.dispatcher.route_into(x_TD, self.top_k) if self.dispatcher is not None else None
        if moe_router.gate_route_usable(x_TD, self.gate.weight):  # a few rows: GEMV + top-k in one kernel
            weights, ids = moe_router.gate_route(x_TD, self.gate.weight, self.top_k, self.renormalize, mask, real,
                                                 into)
        elif moe_router.router_usable(logits := self.gate(x_TD)):
            weights, ids = moe_router.route(logits, self.top_k, self.renormalize, mask, real, x_TD.dtype, into)
        else:
            weights, ids = route(logits, self.top_k, self.renormalize)
            if mask is not None:
                weights = weights.masked_fill(~mask[:, None], 0.0)
            else:
                weights[real:] = 0.0
            if x_TD.dtype != torch.float32:
                weights = weights.to(x_TD.dtype)
        if self.dispatcher is not None:
            self.dispatcher.begin(x_TD, batch.moe_sizes, batch.step_id)
            out = self.dispatcher(x_TD, weights, ids, real, batch.moe_sizes, self.experts)
        else:
            # alone, the experts' per-pair outputs go back unsummed: the next residual add sums them
            alone = ctx.tp_size == 1 and self.shared_expert is None
            out = self.experts(x_TD, weights, ids, reduce=not alone)
            if ctx.tp_size > 1:  # TP-sharded or (replicated rows) EP experts: partial sums
                out = ctx.comm.all_reduce(out, ctx.groups.tp_group, f"{self.label}.tp_reduce")
        if self.shared_expert is not None:
            out = self._add_shared(out, x_TD)
        if ctx.sequence_parallel:
            out = ctx.comm.all_gather(out, ctx.groups.tp_group, f"{self.label}.sp_gather")
        return out

    def _add_shared(self, out_TD: torch.Tensor, x_TD: torch.Tensor) -> torch.Tensor:
        """out + sigmoid(shared gate(x)) * shared expert(x); in low precision the gate's column is in
        the shared expert's gate / up GEMM (`stack_with`)."""
        y, (gate,) = self.shared_expert(x_TD, with_extra=True)
        return add_gated(out_TD, gate, y)
