"""The MoE router in Triton (bf16 / fp16 on CUDA), for decode-sized batches.

`route`: softmax, top-k, renormalisation and the padding mask in one kernel; `gate_route`: the
router's GEMV too, for a few rows (at batch 1 cuBLAS's GEMV + the route kernel took 8.4 µs a layer
for half a megabyte of weights).
"""

from __future__ import annotations

import torch

from epinfer.kernels import pdl
from epinfer.kernels.moe_triton import enabled

try:  # Triton is optional: CPU installs don't have it
    import triton
    import triton.language as tl

    from epinfer.kernels.small_gemm import rows_times_columns
except ImportError:  # pragma: no cover
    triton = None


def router_usable(logits: torch.Tensor) -> bool:
    return enabled(logits) and logits.shape[1] <= 1024


def gate_route_usable(x_TD: torch.Tensor, gate_ED: torch.Tensor) -> bool:
    """Whether `gate_route` (router GEMV + top-k in one kernel) takes this batch: a few rows (the
    last program selects for all rows at once, in registers)."""
    return (enabled(x_TD) and 0 < x_TD.shape[0] * triton.next_power_of_2(gate_ED.shape[0]) <= GATE_ROUTE_ELEMENTS
            and x_TD.stride(1) == 1 and gate_ED.stride(1) == 1 and gate_ED.dtype == x_TD.dtype)


# rows x experts (power of 2) the fused router's last program selects over: at 64 x 128 its serial
# selection took 347 µs a layer on H200 (2026-11-29); up to 8 rows of 128 experts it beats cuBLAS + `route`
GATE_ROUTE_ELEMENTS = 1024


def route(logits_TE: torch.Tensor, top_k: int, renormalize: bool, row_mask_T: torch.Tensor | None, real: int,
          dtype: torch.dtype, out: tuple[torch.Tensor, torch.Tensor] | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The router in one kernel: softmax (fp32), top-k (descending; the lowest index among ties),
    optional renormalisation, weight 0 for padding rows (`row_mask_T` False, or index >= `real`
    when there is no mask); a row with a NaN logit gets NaN weights (and valid ids). Returns
    (weights_TK in `dtype`, ids_TK int64), or writes them into `out` (see `_outputs`)."""
    T, E = logits_TE.shape
    weights, ids = _outputs(out, T, top_k, dtype, logits_TE.device)
    if T:
        mask = row_mask_T if row_mask_T is not None else ids  # (unused without HAS_MASK)
        _route_kernel[(triton.cdiv(T, 2),)](logits_TE, weights, ids, mask, T, real, logits_TE.stride(0),
                                            weights.stride(0), ids.stride(0), E=E,
                                            BLOCK_E=triton.next_power_of_2(E), K=top_k,
                                            KP=triton.next_power_of_2(top_k), RENORM=renormalize,
                                            HAS_MASK=row_mask_T is not None, num_warps=4 if E > 256 else 2)
    return weights, ids


def gate_route(x_TD: torch.Tensor, gate_ED: torch.Tensor, top_k: int, renormalize: bool,
               row_mask_T: torch.Tensor | None, real: int,
               out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`route(x @ gate.T, ...)` in one kernel, for a few rows: program (c, s) computes the partial
    logits of 16 experts over one slice of D; the last program to finish (an atomic counter, reset
    by that program) sums the slices in order (deterministic), rounds to x's dtype as the linear
    layer's output is, and selects the top-k of every row. Calls on one device must not run
    concurrently (the model runs on one stream)."""
    T, D = x_TD.shape
    E = gate_ED.shape[0]
    splits = max(1, min(8, D // 256))
    partial = torch.empty(splits, T, E, dtype=torch.float32, device=x_TD.device)
    weights, ids = _outputs(out, T, top_k, x_TD.dtype, x_TD.device)
    if x_TD.device not in _COUNTERS:
        _COUNTERS[x_TD.device] = torch.zeros(1, dtype=torch.int32, device=x_TD.device)
    mask = row_mask_T if row_mask_T is not None else ids
    chunks = triton.cdiv(E, 16)
    _gate_route_kernel[(chunks, splits)](
        x_TD, gate_ED, partial, weights, ids, mask, _COUNTERS[x_TD.device], T, real, x_TD.stride(0), gate_ED.stride(0),
        weights.stride(0), ids.stride(0), D=D, E=E, BLOCK_T=max(16, triton.next_power_of_2(T)),
        BLOCK_R=triton.next_power_of_2(T), BLOCK_E=triton.next_power_of_2(E), BE=16, SPLITS=splits,
        BK=min(512, triton.next_power_of_2(triton.cdiv(D, splits))), K=top_k, KP=triton.next_power_of_2(top_k),
        RENORM=renormalize, HAS_MASK=row_mask_T is not None, NPROG=chunks * splits,
        PRELOAD=pdl.PRELOAD_BYTES > 0, num_warps=2, **pdl.kwargs(x_TD.device))
    return weights, ids


def _outputs(out, T: int, top_k: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's (weights [T, K], ids [T, K]): fresh (dtype, int64), or `out` — row-strided views
    (weights in `dtype`, ids int32 or int64) a dispatcher packs its rows in, so routing is packing."""
    if out is None:
        return (torch.empty(T, top_k, dtype=dtype, device=device),
                torch.empty(T, top_k, dtype=torch.int64, device=device))
    weights, ids = out
    if (weights.shape != (T, top_k) or ids.shape != (T, top_k) or weights.dtype != dtype or weights.stride(1) != 1
            or ids.stride(1) != 1 or ids.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"router outputs: want [{T}, {top_k}] {dtype} / int ids with unit inner stride, "
                         f"got {weights.dtype} {tuple(weights.shape)} / {ids.dtype} {tuple(ids.shape)}")
    return weights, ids


_COUNTERS: dict = {}  # per device: programs of the running gate_route that have finished (0 between calls)


if triton is not None:

    @triton.jit
    def _select(logit, offs_e, E: tl.constexpr, BLOCK_E: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                RENORM: tl.constexpr):
        """Rows of logits [R, BLOCK_E] (-inf past E) -> (weights [R, KP], ids [R, KP]): softmax,
        top-k (lowest index among ties), renormalisation; a row with a NaN gets NaN weights.
        Each step is one max over keys packing (probability bits, reversed index): probabilities
        are >= 0, so their bits order as the values do (slots past E hold -1: below them all)."""
        ex = tl.exp(logit - tl.max(logit, 1)[:, None])
        total = tl.sum(ex, 1)
        prob = tl.where(offs_e[None, :] < E, ex / total[:, None], -1.0)
        key = (prob.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (BLOCK_E - 1 - offs_e)[None, :]
        slot = tl.arange(0, KP)[None, :]
        sel_w = tl.zeros([logit.shape[0], KP], dtype=tl.float32)
        sel_i = tl.zeros([logit.shape[0], KP], dtype=tl.int32)
        for k in tl.static_range(K):
            best = tl.max(key, 1)[:, None]
            value = (best >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            idx = tl.minimum(BLOCK_E - 1 - (best & 0xFFFFFFFF).to(tl.int32), E - 1)
            sel_w = tl.where(slot == k, value, sel_w)
            sel_i = tl.where(slot == k, idx, sel_i)
            key = tl.where(key == best, -9223372036854775807, key)
        if RENORM:
            sel_w = sel_w / tl.sum(sel_w, 1)[:, None]
        return tl.where((total != total)[:, None], float("nan"), sel_w), sel_i

    @triton.jit
    def _store_selected(W, IDS, MASK, real, offs_t, t_ok, sel_w, sel_i, sw_t, si_t, K: tl.constexpr,
                        KP: tl.constexpr, HAS_MASK: tl.constexpr):
        """Weight 0 for padding rows (mask False, or index >= real without a mask); W and IDS have
        row strides sw_t, si_t (views into a dispatcher's packed buffer, or plain [T, K])."""
        if HAS_MASK:
            keep = tl.load(MASK + offs_t, mask=t_ok, other=0) != 0
        else:
            keep = offs_t < real
        sel_w = tl.where(keep[:, None], sel_w, 0.0)
        slot = tl.arange(0, KP)[None, :]
        ok = t_ok[:, None] & (slot < K)
        tl.store(W + offs_t[:, None] * sw_t + slot, sel_w.to(W.dtype.element_ty), mask=ok)
        tl.store(IDS + offs_t[:, None] * si_t + slot, sel_i.to(IDS.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=["T", "real"])  # one compiled kernel for any row count
    def _route_kernel(L, W, IDS, MASK, T, real, sl_t, sw_t, si_t, E: tl.constexpr, BLOCK_E: tl.constexpr,
                      K: tl.constexpr, KP: tl.constexpr, RENORM: tl.constexpr, HAS_MASK: tl.constexpr):
        """Two rows per program."""
        offs_t = tl.program_id(0) * 2 + tl.arange(0, 2)
        t_ok = offs_t < T
        offs = tl.arange(0, BLOCK_E)
        logit = tl.load(L + offs_t[:, None].to(tl.int64) * sl_t + offs[None, :],
                        mask=t_ok[:, None] & (offs[None, :] < E), other=-float("inf")).to(tl.float32)
        sel_w, sel_i = _select(logit, offs, E, BLOCK_E, K, KP, RENORM)
        _store_selected(W, IDS, MASK, real, offs_t, t_ok, sel_w, sel_i, sw_t, si_t, K, KP, HAS_MASK)

    @triton.jit
    def _gate_route_kernel(X, G, PARTIAL, W, IDS, MASK, COUNT, T, real, sx_t, sg_e, sw_t, si_t, D: tl.constexpr,
                           E: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
                           BE: tl.constexpr, SPLITS: tl.constexpr, BK: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                           RENORM: tl.constexpr, HAS_MASK: tl.constexpr, NPROG: tl.constexpr, PRELOAD: tl.constexpr,
                           PDL: tl.constexpr):
        offs_t = tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        offs_e = tl.program_id(0) * BE + tl.arange(0, BE)
        e_ok = offs_e < E
        split = tl.program_id(1)
        lo = split * (D // SPLITS)
        hi = tl.where(split == SPLITS - 1, D, lo + D // SPLITS)
        ONE_STEP: tl.constexpr = PRELOAD and D % SPLITS == 0 and BK == D // SPLITS  # (the slice in one tile)
        if ONE_STEP:  # the gate's weights do not depend on the kernel before: loaded before the wait
            offs_k = lo + tl.arange(0, BK)
            w = tl.load(G + offs_e[None, :].to(tl.int64) * sg_e + offs_k[:, None], mask=e_ok[None, :], other=0.0)
        if PDL:
            tl.extra.cuda.gdc_wait()
        if ONE_STEP:
            x = tl.load(X + offs_t[:, None] * sx_t + offs_k[None, :], mask=t_ok[:, None], other=0.0)
            acc = tl.dot(x, w)
        else:
            acc = rows_times_columns(X, G, sx_t, sg_e, offs_t, t_ok, offs_e, e_ok, lo, hi, BLOCK_T, BE, BK)
        tl.store(PARTIAL + (split * T + offs_t[:, None]) * E + offs_e[None, :], acc, mask=t_ok[:, None] & e_ok[None, :])
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        # all of this program's stores before its (one-thread) release; acq_rel then makes every
        # program's partial logits visible to the last one
        tl.debug_barrier()
        if tl.atomic_add(COUNT, 1) == NPROG - 1:
            rows = tl.arange(0, BLOCK_R)
            r_ok = rows < T
            offs = tl.arange(0, BLOCK_E)
            ok = r_ok[:, None] & (offs[None, :] < E)
            logit = tl.zeros([BLOCK_R, BLOCK_E], dtype=tl.float32)
            for s in tl.static_range(SPLITS):
                logit += tl.load(PARTIAL + (s * T + rows[:, None]) * E + offs[None, :], mask=ok, other=0.0,
                                 cache_modifier=".cg")
            logit = tl.where(ok, logit.to(X.dtype.element_ty).to(tl.float32), -float("inf"))
            sel_w, sel_i = _select(logit, offs, E, BLOCK_E, K, KP, RENORM)
            _store_selected(W, IDS, MASK, real, rows, r_ok, sel_w, sel_i, sw_t, si_t, K, KP, HAS_MASK)
            tl.atomic_xchg(COUNT, 0)
