"""GPU correctness of the block-scaled FP8 linear kernel (skipped without CUDA; run on a GPU):
against the torch reference with the same dynamic per-token-group activation quantisation
(`fp8_linear_reference`), and against the dequantised weight with unquantised activations (the
error FP8 activations add), for decode and prefill row counts, weights whose sides are not block
multiples (edge blocks), the checkpoints' 128 x 128 blocks and the tiny models' 16 x 16. With
activations that are FP8 values times a power of two the quantisation is exact, so only the
kernel's indexing and scales remain (bf16 output rounding). The grouped expert kernels with FP8
weights (per-pair and permuted modes) against a per-pair reference with the same quantisation of x
and of the activations."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_fp8_weight(N: int, K: int, block: tuple[int, int], gen: torch.Generator, spread: bool = False):
    """(FP8 weight, its block scales) of a weight with std ~0.02, quantised per block as Qwen's are.
    `spread`: each block scaled by 2^-3 .. 2^3 first, so a scale read from the wrong block is far off."""
    from epinfer.kernels.fp8_gemm import quantize_blocks

    w = torch.randn(N, K, generator=gen) * 0.02
    if spread:
        shift = torch.randint(-3, 4, (-(-N // block[0]), -(-K // block[1])), generator=gen).float()
        w = w * (2.0 ** shift).repeat_interleave(block[0], 0)[:N].repeat_interleave(block[1], 1)[:, :K]
    return quantize_blocks(w, block)


def check_fp8_linear(device: str, dtype: torch.dtype, M: int, N: int, K: int, block: tuple[int, int],
                     bias: bool, tol: float = 1e-2, representable: bool = False,
                     w16: bool = False, tile: tuple | None = None, spread: bool = False) -> tuple[float, float]:
    """(error against the same-quantisation reference, against unquantised activations), both
    relative to the output's norm; asserts `tol` and 6e-2. `representable`: every activation group
    is FP8 values times a power of two with its maximum at 448 (quantisation exact whatever the
    rounding: the rest is the kernel's indexing and scaling). `w16`: the kernel in its w16 mode
    (EPINFER_FP8_DECODE_W16 set by the caller), against unquantised activations."""
    from epinfer.kernels.fp8_gemm import dequantize_blocks, fp8_linear, fp8_linear_reference

    gen = torch.Generator().manual_seed(M * 7 + N + K)
    w, scale = random_fp8_weight(N, K, block, gen, spread)
    x = torch.randn(M, K, generator=gen)
    x[0, :5] *= 40  # an outlier: its group's scale, not the row's
    if representable:
        x = (x * 64).clamp(-440, 440).to(torch.float8_e4m3fn).float()
        x[:, ::block[1]] = 448.0
        shift = torch.randint(-12, -4, (M, -(-K // block[1])), generator=gen)  # a scale per group
        x = x * 2.0 ** shift.repeat_interleave(block[1], 1)[:, :K]
    b = torch.randn(N, generator=gen) * 0.1 if bias else None
    bias_dev = b.to(device, dtype) if bias else None
    got = fp8_linear(x.to(device, dtype), w.to(device), scale.to(device), block, bias_dev, tile=tile)
    ref = fp8_linear_reference(x.to(dtype), w, scale, block, b.to(dtype) if bias else None, w16).float()
    exact = x @ dequantize_blocks(w, scale, block).T + (b if bias else 0)
    rel = ((got.float().cpu() - ref).norm() / ref.norm()).item()
    rel_exact = ((got.float().cpu() - exact).norm() / exact.norm()).item()
    assert rel <= tol and rel_exact <= 6e-2, (rel, rel_exact)
    return rel, rel_exact


CASES = [(1, 256, 512, (128, 128)), (7, 384, 2048, (128, 128)), (64, 200, 300, (128, 128)),
         (300, 1024, 2048, (128, 128)), (33, 48, 80, (16, 16)), (5, 90, 64, (12, 32)),
         (64, 2048, 4096, (128, 128)), (199, 2048, 4096, (128, 128)), (150, 1040, 2048, (128, 128))]
# (the last three: the default tiles that split K at 64 and 199 rows, and 64 x 64 tiles at 150)


@pytest.mark.parametrize("M,N,K,block", CASES)
def test_fp8_linear_kernel(M, N, K, block, monkeypatch):
    monkeypatch.setenv("EPINFER_FP8_DECODE_W16", "0")  # quantised activations at every size (w16: below)
    monkeypatch.setenv("EPINFER_FP8_CUBLAS", "0")  # the Triton kernel at every size (cuBLAS: below)
    exact, _ = check_fp8_linear("cuda", torch.bfloat16, M, N, K, block, bias=M % 2 == 1, tol=1e-2, representable=True)
    rel, rel_exact = check_fp8_linear("cuda", torch.bfloat16, M, N, K, block, bias=M % 2 == 1)
    print(f"M {M} N {N} K {K} block {block}: {rel:.2e} vs same quantisation ({exact:.2e} with representable "
          f"inputs), {rel_exact:.2e} vs bf16 activations")


@pytest.mark.parametrize("M,N,K", [(256, 1024, 2048), (1001, 12288, 2048), (4099, 2048, 640), (130, 5120, 2048)])
def test_fp8_linear_cublas(M, N, K, monkeypatch):
    """The default (EPINFER_FP8_CUBLAS unset): prefill-size inputs through cuBLAS's block-scaled GEMM (rows padded to
    a multiple of 4, K / 128 scale columns not a multiple of 4 in the third case; the last a decode size
    of a wide weight), against the same quantisation in torch; asserts the path was taken (every width
    here: the narrow ones too, which by default stay on the Triton kernel)."""
    import torch.nn.functional as F

    from epinfer.kernels import fp8_gemm

    if not hasattr(F, "scaled_mm"):
        pytest.fail(f"torch {torch.__version__} has no F.scaled_mm: the cuBLAS path cannot run here")
    if not fp8_gemm.hopper(torch.device("cuda", torch.cuda.current_device())):
        pytest.skip("cuBLAS's block-scaled FP8 GEMM needs a Hopper GPU and CUDA 12.9 or later")
    monkeypatch.delenv("EPINFER_FP8_CUBLAS", raising=False)
    monkeypatch.setattr(fp8_gemm, "CUBLAS_MIN_NK", 128)
    taken, original = [], fp8_gemm.cublas_linear
    monkeypatch.setattr(fp8_gemm, "cublas_linear", lambda *a, **k: taken.append(1) or original(*a, **k))
    for representable in (True, False):
        rel, rel_exact = check_fp8_linear("cuda", torch.bfloat16, M, N, K, (128, 128), bias=M % 2 == 1,
                                          tol=1e-2, representable=representable)
        print(f"cuBLAS M {M} N {N} K {K} representable {representable}: {rel:.2e} vs same quantisation, "
              f"{rel_exact:.2e} vs bf16 activations")
    assert len(taken) == 2


def fp8_experts_reference(x, w13, s13, w2, s2, block, weights, ids, w16: bool = False):
    """Per pair: x quantised per group, gate / up with the dequantised weights (float32), silu * up
    rounded to x's dtype, quantised again, the down projection, times the routing weight; summed.
    `w16`: neither x nor the activations quantised."""
    from epinfer.kernels.fp8_gemm import dequantize_blocks, fake_quantize

    def quantize(t):
        return t.float() if w16 else fake_quantize(t, block[1])

    T, K = ids.shape
    inter = w13.shape[1] // 2
    out = torch.zeros(T, w2.shape[1])
    xq = quantize(x)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            gu = xq[t:t + 1] @ dequantize_blocks(w13[e], s13[e], block).T
            act = (torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]).to(x.dtype)
            y = quantize(act) @ dequantize_blocks(w2[e], s2[e], block).T
            out[t] += float(weights[t, k]) * y[0]
    return out


def check_fp8_experts(device: str, dtype: torch.dtype, T: int, E: int, D: int, inter: int, K: int,
                      block: tuple[int, int], w16: bool = False, cfg: dict | None = None) -> float:
    """The Triton grouped expert kernels with FP8 weights against the reference; both the per-pair
    and the grouped (permuted) modes, and the unsummed per-pair outputs (`reduce=False`) summed over
    k in order bitwise the summed ones (where the tiles write float32 pairs). Returns the largest
    relative error. `w16`: the kernels in their w16 mode (EPINFER_FP8_DECODE_W16 set by the caller;
    decode tile sizes). `cfg`: these tiles instead of the FP8 table's (a "gemv" one: the per-pair
    mode only)."""
    from epinfer.kernels import moe_triton
    from epinfer.kernels.fp8_gemm import quantize_blocks
    from epinfer.layers.moe import permute_pairs

    gen = torch.Generator().manual_seed(T + E + D)
    w13, s13 = quantize_blocks(torch.randn(E, 2 * inter, D, generator=gen) * 0.05, block)
    w2, s2 = quantize_blocks(torch.randn(E, D, inter, generator=gen) * 0.05, block)
    x = torch.randn(T, D, generator=gen)
    logits = torch.randn(T, E, generator=gen)
    weights, ids = torch.softmax(logits, -1).topk(K, -1)
    ref = fp8_experts_reference(x.to(dtype), w13, s13, w2, s2, block, weights, ids, w16)
    worst = 0.0
    for plan in (None, *([] if cfg and cfg.get("gemv") else [permute_pairs(ids.to(device), 0, E)])):
        dev = [t.to(device) for t in (w13, s13, w2, s2)]
        tiles = cfg or moe_triton.grouped_config(T * K, E, True)  # the FP8 table
        args = (x.to(device, dtype), dev[0], dev[2], weights.to(device, dtype), ids.to(device), 0, True, plan, tiles)
        got = moe_triton.moe_grouped(*args, fp8=(dev[1], dev[3], block))
        rel = ((got.float().cpu() - ref).norm() / ref.norm()).item()
        if not tiles.get("y16"):
            pairs = moe_triton.moe_grouped(*args, reduce=False, fp8=(dev[1], dev[3], block))
            assert pairs.shape == (T, K, D) and torch.equal(sum(pairs.unbind(1)).to(dtype), got)
        worst = max(worst, rel)
    return worst


@pytest.mark.parametrize("T,E,D,inter,block", [(1, 8, 256, 128, (128, 128)), (5, 16, 512, 384, (128, 128)),
                                               (64, 8, 256, 256, (128, 128)), (9, 6, 64, 48, (16, 16)),
                                               (512, 8, 256, 256, (128, 128)), (1024, 4, 256, 128, (128, 128))])
def test_fp8_expert_kernels(T, E, D, inter, block, monkeypatch):
    monkeypatch.setenv("EPINFER_FP8_DECODE_W16", "0")  # quantised activations at every size (w16: below)
    rel = check_fp8_experts("cuda", torch.bfloat16, T, E, D, inter, 2, block)
    print(f"T {T} E {E} D {D} I {inter} block {block}: {rel:.2e}")
    # the intermediate is quantised again: a sum in another order (the tensor cores accumulate FP8
    # products with fewer bits within a group) can round an activation
    # to the neighbouring bf16 value and that to the neighbouring FP8 value (1/16 apart), so the
    # kernel and the reference agree to a few 1e-2, not to float32 rounding (a wrong scale, expert
    # or weight gives ~1)
    assert rel <= 3e-2


@pytest.mark.parametrize("T,E,D,inter,block,cfg", [
    (512, 8, 256, 256, (128, 128), {"BLOCK_M": 64, "up": (64, 128, 4, 4), "down": (128, 128, 4, 4), "y16": True}),
    (1024, 4, 256, 384, (128, 128), {"BLOCK_M": 128, "up": (64, 128, 4, 8), "down": (128, 128, 4, 8)}),
    (96, 4, 384, 192, (64, 64), {"BLOCK_M": 32, "up": (128, 64, 3, 4), "down": (64, 64, 3, 4)})])
def test_fp8_expert_kernels_tile_scale(T, E, D, inter, block, cfg):
    """A tile's one weight scale a K step folded into the rows' scales ("tile_scale"; the last case's
    up tiles span two scale blocks, so only its down kernel folds): the same tolerance as above."""
    rel = check_fp8_experts("cuda", torch.bfloat16, T, E, D, inter, 2, block, cfg={**cfg, "tile_scale": True})
    print(f"tile_scale T {T} E {E} D {D} I {inter} block {block}: {rel:.2e}")
    assert rel <= 3e-2


W16_LINEAR = [c for c in CASES if c[0] <= 64]
W16_EXPERTS = [(1, 8, 256, 128, (128, 128)), (5, 16, 512, 384, (128, 128)), (64, 8, 256, 256, (128, 128)),
               (9, 6, 64, 48, (16, 16))]


@pytest.mark.parametrize("M,N,K,block", W16_LINEAR)
def test_fp8_linear_w16(M, N, K, block, monkeypatch):
    """Decode sizes with the weight widened in registers: only the widened weight's bf16 rounding
    and the output's separate the kernel from x @ the dequantised weight."""
    monkeypatch.setenv("EPINFER_FP8_DECODE_W16", "1")
    rel, _ = check_fp8_linear("cuda", torch.bfloat16, M, N, K, block, bias=M % 2 == 1, tol=1e-2, w16=True)
    print(f"w16 M {M} N {N} K {K} block {block}: {rel:.2e}")


@pytest.mark.parametrize("N,K,block,tile", [(256, 512, (128, 128), ("gemv", 1, 16, 256, 2, 2)),
                                            (5120, 2048, (128, 128), ("gemv", 1, 8, 512, 4, 4)),
                                            (90, 200, (12, 32), ("gemv", 1, 4, 128, 2, 2)),
                                            (256, 640, (128, 128), ("gemv", 1, 8, 64, 2, 2)),
                                            (5120, 2048, (128, 128), ("gemv", 1, 8, 2048, 4, 1)),
                                            (300, 1000, (128, 128), ("gemv", 1, 16, 1024, 8, 1))])
@pytest.mark.parametrize("preload", [0, 32768])
def test_fp8_linear_gemv(N, K, block, tile, preload, monkeypatch):
    """One row on the CUDA cores (`small_gemm.gemv`): the w16 arithmetic, partial blocks and K steps,
    steps inside one scale group and steps of whole rows (summed each step); block scales far apart.
    `preload`: a program's weights loaded whole before its PDL wait (`pdl.PRELOAD_BYTES`)."""
    from epinfer.kernels import pdl

    monkeypatch.setattr(pdl, "PRELOAD_BYTES", preload)
    rel, _ = check_fp8_linear("cuda", torch.bfloat16, 1, N, K, block, bias=True, tol=1e-2, w16=True, tile=tile,
                              spread=True)
    print(f"gemv N {N} K {K} block {block} tile {tile} preload {preload}: {rel:.2e}")


@pytest.mark.parametrize("T,E,D,inter,block", W16_EXPERTS)
def test_fp8_expert_kernels_w16(T, E, D, inter, block, monkeypatch):
    monkeypatch.setenv("EPINFER_FP8_DECODE_W16", "1")
    rel = check_fp8_experts("cuda", torch.bfloat16, T, E, D, inter, 2, block, w16=True)
    print(f"w16 T {T} E {E} D {D} I {inter} block {block}: {rel:.2e}")
    assert rel <= 1e-2  # the intermediate is not quantised again: bf16 rounding only


@pytest.mark.parametrize("M,N,K,block,tile", [(64, 2048, 4096, (128, 128), ("fp8", 64, 64, 128, 4, 3, 4)),
                                              (40, 200, 640, (128, 128), ("fp8", 64, 32, 128, 4, 3, 3)),
                                              (5, 90, 200, (12, 32), ("w16", 16, 32, 64, 2, 3, 2))])
def test_fp8_linear_split_k(M, N, K, block, tile, monkeypatch):
    """K steps shared by several programs, their partial sums added in order by a second kernel (with
    the bias): against the same-quantisation reference, and bitwise the same on a second call."""
    from epinfer.kernels.fp8_gemm import fp8_linear

    monkeypatch.setenv("EPINFER_FP8_CUBLAS", "0")
    w16 = tile[0] == "w16"
    rel, _ = check_fp8_linear("cuda", torch.bfloat16, M, N, K, block, bias=True, tol=1e-2, w16=w16, tile=tile,
                              spread=True)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w, scale = (t.cuda() for t in random_fp8_weight(N, K, block, torch.Generator().manual_seed(1)))
    assert torch.equal(fp8_linear(x, w, scale, block, tile=tile), fp8_linear(x, w, scale, block, tile=tile))
    print(f"split-K M {M} N {N} K {K} tile {tile}: {rel:.2e}")


@pytest.mark.parametrize("T,E,D,inter,block,wide", [(1, 8, 2048, 768, (128, 128), False),
                                                    (1, 8, 2048, 768, (128, 128), True),
                                                    (3, 16, 512, 384, (128, 128), True),
                                                    (2, 6, 80, 48, (16, 16), False), (2, 6, 80, 48, (16, 16), True)])
@pytest.mark.parametrize("preload", [0, 32768])
def test_fp8_expert_kernels_gemv(T, E, D, inter, block, wide, preload, monkeypatch):
    """One row a pair on the CUDA cores (`kernels.moe_gemv`), the weights scaled per block in float32;
    `wide`: K steps of over 8192 weights, each step's products summed at once; `preload`: the down
    kernel's weights loaded whole before its PDL wait (`pdl.PRELOAD_BYTES`)."""
    from epinfer.kernels import pdl

    monkeypatch.setattr(pdl, "PRELOAD_BYTES", preload)
    cfg = {"BLOCK_M": 16, "gemv": True, "up": (8, 512, 2, 4), "down": (16, 256, 3, 2)}
    if wide:
        cfg |= {"up": (4, 2048, 1, 4), "down": (8, 1024, 1, 8)}
    rel = check_fp8_experts("cuda", torch.bfloat16, T, E, D, inter, 2, block, w16=True, cfg=cfg)
    print(f"gemv T {T} E {E} D {D} I {inter} block {block}: {rel:.2e}")
    assert rel <= 1e-2


@pytest.mark.parametrize("T,E,D,inter,block", [(600, 8, 512, 256, (128, 128)), (300, 4, 256, 96, (64, 32)),
                                               (300, 4, 200, 96, (128, 128)), (200, 4, 160, 80, (12, 20))])
def test_fp8_experts_dequantized_at_prefill_sizes(T, E, D, inter, block, monkeypatch):
    """EPINFER_FP8_DEQUANT_PAIRS: a step's FP8 experts dequantised a block a program and run through
    bf16's grouped GEMM (activations unquantised), against the weight-only reference; the kernel's
    weights bitwise the torch form's (partial edge blocks, and blocks that are not powers of two, too)."""
    from epinfer.kernels import fp8_gemm
    from epinfer.layers.moe import FusedExperts

    monkeypatch.setenv("EPINFER_FP8_DEQUANT_PAIRS", "16")
    gen = torch.Generator().manual_seed(T + E)
    experts = FusedExperts(range(E), D, inter, E)
    experts.w13.data = torch.randn(E, 2 * inter, D, generator=gen) * 0.05
    experts.w2.data = torch.randn(E, D, inter, generator=gen) * 0.05
    experts.to_fp8(block)
    w13, w2, (s13, s2, _) = experts.w13.data, experts.w2.data, experts.fp8
    x = torch.randn(T, D, generator=gen).bfloat16()
    weights, ids = torch.softmax(torch.randn(T, E, generator=gen), -1).topk(2, -1)
    ref = fp8_experts_reference(x, w13, s13, w2, s2, block, weights, ids, w16=True)
    experts.cuda()
    experts.fp8 = tuple(t.cuda() if torch.is_tensor(t) else t for t in experts.fp8)
    calls = []
    dequantize = fp8_gemm.dequantize_weights
    monkeypatch.setattr(fp8_gemm, "dequantize_weights", lambda *a: calls.append(1) or dequantize(*a))
    got = experts(x.cuda(), weights.cuda(), ids.cuda()).float().cpu()
    rel = ((got - ref).norm() / ref.norm()).item()
    print(f"dequantised T {T} E {E} D {D} I {inter} block {block}: {rel:.2e}")
    assert len(calls) == 2 and rel <= 1e-2
    assert torch.equal(dequantize(w13.cuda(), s13.cuda(), block, torch.bfloat16).cpu(),
                       fp8_gemm.dequantize_blocks(w13, s13, block).bfloat16())


@pytest.mark.parametrize("shape,layers", [("qwen3-30b-a3b", 2), ("qwen3.5-35b-a3b", 4)])
def test_fp8_model_logits_against_dequantized(tmp_path, shape, layers):
    """A few-layer real shape with --fp8-weights (its weights requantised in 128 x 128 blocks) against
    the same checkpoint in bf16: the logits of each prompt's last row (the same inputs in both runs),
    cosine >= 0.995, top-1 agreement reported (>= 7 of 8 asserted)."""
    import json

    from epinfer import LLM, SamplingParams
    from tests.gpu.test_gpu_decode import real_shape_folder

    folder, model = real_shape_folder(tmp_path, shape, layers)
    del model
    torch.cuda.empty_cache()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(cfg))
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 150000, (n,), generator=gen).tolist() for n in (1, 5, 40, 64, 300, 700, 1500, 2048)]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def logits_of(fp8: bool) -> list[torch.Tensor]:
        llm = LLM(str(folder), dtype="bfloat16", device="cuda", max_model_len=4096, fp8_weights=fp8)
        rows: list[torch.Tensor] = []
        apply = llm.engine.apply
        llm.engine.apply = lambda scheduled, logits: rows.append(logits.float().cpu()) or apply(scheduled, logits)
        llm.generate(prompts, params)
        del llm
        torch.cuda.empty_cache()
        return rows

    fp8, ref = logits_of(True), logits_of(False)
    cos, top1 = [], []
    for a, b in zip(fp8, ref, strict=True):  # (the same steps: one token each, same scheduling)
        cos += torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()
        top1 += (a.argmax(-1) == b.argmax(-1)).tolist()
    print(f"{shape} x{layers}: cosine min {min(cos):.4f} mean {sum(cos) / len(cos):.4f}, top-1 {sum(top1)}/{len(top1)}")
    assert len(cos) == len(prompts) and min(cos) >= 0.995 and sum(top1) >= 7
