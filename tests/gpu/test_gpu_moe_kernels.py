"""GPU correctness of the MoE kernels (skipped without CUDA; run them on a GPU): the gather-GEMM
decode and grouped prefill expert kernels against cuBLAS's grouped path, their column-tile grid
orders, the pair permutation, padding pairs, the router, the small-row GEMM, the gated RMS norm and
the combine, each against its torch reference.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


GEMV = {"BLOCK_M": 16, "gemv": True, "up": (8, 512, 2, 4), "down": (16, 256, 3, 2)}  # (`kernels.moe_gemv`)


@pytest.mark.parametrize("T,first,n,E", [(1, 0, 128, 128), (4, 32, 64, 128), (16, 0, 128, 128), (64, 0, 128, 128),
                                          (256, 0, 128, 128), (96, 64, 64, 128), (200, 0, 256, 256)])
@pytest.mark.parametrize("preload", [0, 32768])
def test_triton_grouped_moe(T, first, n, E, preload, monkeypatch):
    """Gather-GEMM decode kernels vs the cuBLAS grouped path (real expert shape, bf16; EP: half the
    experts local, the other half's pairs must count 0), for every tile table row; `preload`: the
    one-row-a-pair down kernel's weights (`moe_gemv`) loaded before its PDL wait (`pdl.PRELOAD_BYTES`)."""
    from epinfer.distributed.communicator import row_layout, row_views
    from epinfer.kernels import moe_configs, moe_triton, pdl
    from epinfer.layers.moe import FusedExperts, permute_pairs

    monkeypatch.setattr(pdl, "PRELOAD_BYTES", preload)

    torch.manual_seed(T)
    inter = 768 if E == 128 else 512
    with torch.device("cuda"):
        experts = FusedExperts(range(first, first + n), 2048, inter, E).to(torch.bfloat16)
        experts.w13.data.normal_(std=0.02)
        experts.w2.data.normal_(std=0.02)
        x = torch.randn(T, 2048, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(E)[:8] for _ in range(T)])
        weights = torch.rand(T, 8).to(torch.bfloat16)
    ref = experts._grouped(x, weights, ids).float()
    plan = permute_pairs(ids, first, n)
    tiles = [moe_configs.PER_PAIR, GEMV] + [c for _, c in moe_configs.CONFIGS]
    for p, cfg in [(p, cfg) for p in (None, plan) for cfg in tiles
                   if (p is not None or T <= 16) and (p is None or not cfg.get("gemv"))]:
        out = moe_triton.moe_grouped(x, experts.w13, experts.w2, weights, ids, first, n == E, p, cfg).float()
        assert ((out - ref).norm() / ref.norm()).item() < 1e-2, (p is None, cfg)
        y = moe_triton.moe_grouped(x, experts.w13, experts.w2, weights, ids, first, n == E, p, cfg, reduce=False)
        assert y.shape == (T, 8, 2048) and torch.equal(sum(y.unbind(1)).to(x.dtype).float(), out)  # k in order
        # from a dispatcher's packed rows (row-strided x, int32 ids, weights: read in place), bitwise the same
        fields = [(x.dtype, 2048), (torch.int32, 8), (x.dtype, 8)]
        packed = torch.empty(T, row_layout(fields)[0], dtype=torch.uint8, device="cuda")
        for view, value in zip(row_views(packed, fields), (x, ids, weights), strict=True):
            view.copy_(value)
        px, pids, pw = row_views(packed, fields)
        pplan = None if p is None else permute_pairs(pids, first, n)
        assert torch.equal(moe_triton.moe_grouped(px, experts.w13, experts.w2, pw, pids, first, n == E, pplan,
                                                  cfg).float(), out)
    assert moe_triton.grouped_usable(x, ids.numel(), n)
    forward = None if moe_configs.per_pair(ids.numel()) else plan
    assert torch.equal(experts(x, weights, ids).float(), moe_triton.moe_grouped(
        x, experts.w13, experts.w2, weights, ids, first, n == E, forward).float())  # the path forward takes


@pytest.mark.parametrize("T,first,n,fp8", [(2048, 0, 128, False), (2048, 0, 128, True), (600, 64, 64, False),
                                            (5, 0, 128, True)])
def test_grouped_moe_column_tiles_side_by_side(T, first, n, fp8):
    """"n_fast" (a group's column tiles side by side in the grid), "split" (a group's row blocks
    shared by several programs: two a group with 64-row tiles here) and "tma" (weight and sorted-row
    tiles loaded by descriptor; with "sorted_rows" the up kernel's rows too, copied in sorted order)
    against the default grid and loads: the same tiles, so bitwise the same outputs, per expert and per
    pair; and within 1e-2 (bf16) of the cuBLAS path."""
    from epinfer.kernels import moe_triton
    from epinfer.kernels.fp8_gemm import quantize_blocks
    from epinfer.layers.moe import FusedExperts, permute_pairs

    torch.manual_seed(T + n)
    with torch.device("cuda"):
        experts = FusedExperts(range(first, first + n), 2048, 768, 128).to(torch.bfloat16)
        experts.w13.data.normal_(std=0.02)
        experts.w2.data.normal_(std=0.02)
        x = torch.randn(T, 2048, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(128)[:8] for _ in range(T)])
        weights = torch.rand(T, 8).to(torch.bfloat16)
    w13, w2, scales = experts.w13, experts.w2, None
    if fp8:
        (w13, s13), (w2, s2) = quantize_blocks(w13.float(), (128, 128)), quantize_blocks(w2.float(), (128, 128))
        scales = (s13, s2, (128, 128))
    bk = 128 if fp8 else 64  # (bf16 K steps of 128 at 128 rows need 256 KiB of shared memory; an H100 has 227)
    cfg = {"BLOCK_M": 128 if T > 16 else 16, "up": (64, bk, 4, 8), "down": (128, bk, 4, 8), "tile_scale": fp8}
    rows64 = [{"BLOCK_M": 64, "split": 1}, {"BLOCK_M": 64, "split": 1, "tma": True}] if T > 16 else []
    for plan in (permute_pairs(ids, first, n), *([None] if T <= 16 else [])):
        for extra in ({"n_fast": True}, {"split": 1}, {"split": 2, "n_fast": True}, {"tma": True},
                      {"tma": True, "split": 1, "n_fast": True}, {"tma": True, "sorted_rows": True}, *rows64):
            base = {**cfg, "BLOCK_M": extra.get("BLOCK_M", cfg["BLOCK_M"])}  # (the same tiles, the default grid)
            want = moe_triton.moe_grouped(x, w13, w2, weights, ids, first, n == 128, plan, base, fp8=scales)
            got = moe_triton.moe_grouped(x, w13, w2, weights, ids, first, n == 128, plan, {**cfg, **extra}, fp8=scales)
            assert torch.equal(got, want), (plan is None, extra)
    if not fp8:
        ref = experts._grouped(x, weights, ids).float()
        assert ((got.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("T,K,first,n,E", [(1, 8, 0, 128, 128), (64, 8, 0, 128, 128), (33, 8, 64, 64, 128),
                                            (256, 8, 0, 256, 256), (512, 8, 0, 128, 128), (7, 4, 0, 60, 60)])
def test_permute_kernel_matches_torch(T, K, first, n, E):
    """The pair permutation in one Triton kernel: every output identical to the compiled torch form,
    int64 and int32 (packed, row-strided) ids, repeated rows (ties) and other ranks' experts."""
    from epinfer.kernels import moe_triton
    from epinfer.layers.moe import torch_permute_pairs

    torch.manual_seed(T)
    ids = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)])
    ids[::3] = ids[0].clone()
    wide = torch.zeros(T, K + 5, dtype=torch.int32, device="cuda")
    wide[:, 3:3 + K] = ids
    for case in (ids, wide[:, 3:3 + K]):
        want, got = torch_permute_pairs(case, first, n), moe_triton.permute(case, first, n)
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(want, got, strict=True))


@pytest.mark.parametrize("first,n,gemv", [(0, 128, False), (64, 64, False), (0, 128, True), (64, 64, True)])
def test_triton_moe_skips_padding_pairs(first, n, gemv):
    """One group per pair: a padding row (top-k weight 0) reads no expert weights and no x (its row is
    NaN here) and comes out exactly 0, summed or per pair; the real rows are bitwise unchanged. `gemv`:
    the CUDA-core kernels (`kernels.moe_gemv`)."""
    from epinfer.kernels import moe_configs, moe_triton
    from epinfer.layers.moe import FusedExperts

    torch.manual_seed(first)
    with torch.device("cuda"):
        experts = FusedExperts(range(first, first + n), 2048, 768, 128).to(torch.bfloat16)
        experts.w13.data.normal_(std=0.02)
        experts.w2.data.normal_(std=0.02)
        x = torch.randn(3, 2048, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(128)[:8] for _ in range(3)])
        weights = torch.rand(3, 8).to(torch.bfloat16)
    assert moe_configs.per_pair(ids.numel())
    args = (experts.w13, experts.w2)
    cfg = GEMV if gemv else None
    want = moe_triton.moe_grouped(x[[0, 2]], *args, weights[[0, 2]], ids[[0, 2]], first, n == 128, None, cfg)
    x[1], weights[1] = float("nan"), 0.0
    out = moe_triton.moe_grouped(x, *args, weights, ids, first, n == 128, None, cfg)
    assert torch.equal(out[[0, 2]], want) and torch.equal(out[1], torch.zeros_like(out[1]))
    y = moe_triton.moe_grouped(x, *args, weights, ids, first, n == 128, None, cfg, reduce=False)
    assert torch.equal(y[1], torch.zeros_like(y[1])) and not y.isnan().any()


@pytest.mark.parametrize("T,E,K,masked", [(1, 128, 8, False), (64, 128, 8, True), (33, 256, 8, False),
                                          (7, 60, 4, True), (16, 512, 10, True)])
@pytest.mark.parametrize("preload", [0, 32768])
def test_triton_router(T, E, K, masked, preload, monkeypatch):
    """One-kernel routers (with and without the GEMV) vs softmax / top-k / renormalise / mask in
    torch (same ids, weights to bf16). `preload`: the GEMV's weights loaded before its PDL wait."""
    from epinfer.distributed.communicator import row_layout, row_views
    from epinfer.kernels import moe_router, pdl
    from epinfer.layers.moe import route

    monkeypatch.setattr(pdl, "PRELOAD_BYTES", preload)

    torch.manual_seed(E + T)
    # distinct values per row, exact in bf16 (ties may order differently): steps of 1/64 within +-E/128
    logits = torch.stack([torch.randperm(E, device="cuda") for _ in range(T)]).sub(E // 2).div(64).to(torch.bfloat16)
    mask = torch.rand(T, device="cuda") > 0.3 if masked else None
    weights, ids = route.__wrapped__(logits, K, True)
    ref = weights.masked_fill(~mask[:, None], 0.0) if masked else torch.cat([weights[:T - 1], 0 * weights[T - 1:]])
    w2, i2 = moe_router.route(logits, K, True, mask, T - 1, torch.bfloat16)
    assert torch.equal(ids, i2)
    # written into a dispatcher's packed rows instead (int32 ids, row-strided): the same values
    fields = [(torch.bfloat16, 2048), (torch.int32, K), (torch.bfloat16, K)]
    packed = torch.zeros(T, row_layout(fields)[0], dtype=torch.uint8, device="cuda")
    _, pids, pw = row_views(packed, fields)
    moe_router.route(logits, K, True, mask, T - 1, torch.bfloat16, (pw, pids))
    assert torch.equal(pw, w2) and torch.equal(pids.long(), i2)
    torch.testing.assert_close(w2.float(), ref.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-3)
    # the router GEMV fused in: x row t = one-hot at t, so x @ gate.T is exactly these logits
    x = torch.eye(T, 2048, device="cuda", dtype=torch.bfloat16)
    gate = torch.zeros(E, 2048, device="cuda", dtype=torch.bfloat16)
    gate[:, :T] = logits.T
    if moe_router.gate_route_usable(x, gate):
        w4, i4 = moe_router.gate_route(x, gate, K, True, mask, T - 1)
        assert torch.equal(ids, i4) and torch.equal(w4, w2)
        packed.zero_()
        moe_router.gate_route(x, gate, K, True, mask, T - 1, (pw, pids))
        assert torch.equal(pw, w2) and torch.equal(pids.long(), i2)
    logits[0, 1] = float("nan")  # a NaN row: ids stay valid experts, its weights are NaN (propagates)
    w3, i3 = moe_router.route(logits, K, True, None, T, torch.bfloat16)
    assert ((i3 >= 0) & (i3 < E)).all() and w3[0].isnan().all() and torch.equal(i3[1:], i2[1:])
    x[0, 5] = float("nan")
    if moe_router.gate_route_usable(x, gate):
        w5, i5 = moe_router.gate_route(x, gate, K, True, None, T)
        assert ((i5 >= 0) & (i5 < E)).all() and w5[0].isnan().all() and torch.equal(i5[1:], i2[1:])


@pytest.mark.parametrize("T", [1, 5, 8])
def test_small_gemm(T):
    """The decode-size projection kernel against F.linear (bf16), with and without bias, for the
    o_proj and LM head shapes, an odd one, and the bf16 projections beside FP8 ones (`chain_linear`:
    the shared expert's one gate column, a GDN layer's stacked a / b rows)."""
    import itertools

    import torch.nn.functional as F

    from epinfer.kernels import small_gemm

    torch.manual_seed(T)
    for N, D in [(2048, 4096), (151936, 2048), (1000, 520), (1, 2048), (64, 2048)]:
        with torch.device("cuda"):
            x, w, b = torch.randn(T, D), torch.randn(N, D) * 0.02, torch.randn(N)
        x, w, b = x.bfloat16(), w.bfloat16(), b.bfloat16()
        assert small_gemm.usable(x, w)
        gemv = [{"BLOCK_N": 8, "BLOCK_K": 512, "num_stages": 2, "num_warps": 2, "gemv": True},
                {"BLOCK_N": 4, "BLOCK_K": 2048, "num_stages": 1, "num_warps": 4, "gemv": True}] if T == 1 else []
        for bias, cfg in itertools.product((None, b), [None, *gemv]):  # (one row: the CUDA-core form too)
            ref = F.linear(x.float(), w.float(), None if bias is None else bias.float())
            out = small_gemm.linear(x, w, bias, cfg).float()
            assert ((out - ref).norm() / ref.norm()).item() < 1e-2, (N, D, bias is None, cfg)


@pytest.mark.parametrize("T", [1, 64, 700])
def test_triton_gated_rms_norm(T):
    """The GDN gated norm kernel against the torch reference (bf16): x [T, 32, 128], the gate a
    row-strided view of a wider projection (as the stacked GEMM gives it); over 1024 rows, 4 a program."""
    from epinfer.kernels import norm_triton
    from epinfer.layers.norm import gated_rms_norm

    torch.manual_seed(T)
    with torch.device("cuda"):
        x, wide, w = torch.randn(T, 32, 128), torch.randn(T, 8192 + 4096 + 64), torch.rand(128) + 0.5
    x, wide, w = x.bfloat16(), wide.bfloat16(), w.bfloat16()
    gate = wide[:, 8192:8192 + 4096].view(T, 32, 128)
    assert norm_triton.gated_usable(x, gate, w)
    out = norm_triton.gated_rms_norm(x, gate, w, 1e-6).float()
    ref = gated_rms_norm.__wrapped__(x, gate, w, 1e-6).float()  # (eager torch, not the compiled one)
    assert ((out - ref).abs() <= 1e-2 * ref.abs() + 1e-2).all()


@pytest.mark.parametrize("T,first,n,K,packed", [(5, 0, 128, 8, False), (300, 32, 64, 8, False),
                                               (300, 32, 64, 1, True), (300, 0, 128, 8, True)])
def test_triton_combine(T, first, n, K, packed):
    """The grouped-GEMM combine kernel vs the torch one (other ranks' rows of y hold NaN: skipped).
    `packed`: ids and weights as row views of one wider buffer, as a dispatcher hands them over
    (K == 1: each all-to-all pair is its own row)."""
    from epinfer.kernels import moe_triton
    from epinfer.layers.moe import combine_pairs, permute_pairs

    torch.manual_seed(T)
    ids = torch.stack([torch.randperm(128, device="cuda")[:K] for _ in range(T)])
    weights = torch.rand(T, K, device="cuda").to(torch.bfloat16)
    if packed:  # [T, K] views with a row stride of 2K + 3
        buf = torch.zeros(T, 2 * K + 3, device="cuda", dtype=torch.bfloat16)
        buf[:, 1:1 + K] = weights
        weights = buf[:, 1:1 + K]
        ibuf = torch.zeros(T, 2 * K + 3, device="cuda", dtype=torch.long)
        ibuf[:, 2:2 + K] = ids
        ids = ibuf[:, 2:2 + K]
    order = permute_pairs(ids, first, n)[0]
    y = torch.randn(T * K, 2048, device="cuda").to(torch.bfloat16)
    local = ids.flatten()[order] - first
    y[(local < 0) | (local >= n)] = float("nan")
    ref = combine_pairs.__wrapped__(y.float(), weights.float(), ids, order, first, n)
    out = moe_triton.combine(y, weights, ids, order, first, n).float()
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
