"""GPU correctness of the block-scaled FP8 linear kernel (skipped without CUDA; run on a GPU):
against the torch reference with the same dynamic per-token-group activation quantisation
(`fp8_linear_reference`), and against the dequantised weight with unquantised activations (the
error FP8 activations add), for decode and prefill row counts, weights whose sides are not block
multiples (edge blocks), the checkpoints' 128 x 128 blocks and the tiny models' 16 x 16. With
activations that are FP8 values times a power of two the quantisation is exact, so only the
kernel's indexing and scales remain (bf16 output rounding)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_fp8_weight(N: int, K: int, block: tuple[int, int], gen: torch.Generator):
    """(FP8 weight, its block scales) of a weight with std ~0.02, quantised per block as Qwen's are."""
    w = torch.randn(N, K, generator=gen) * 0.02
    rows, cols = -(-N // block[0]), -(-K // block[1])
    padded = torch.nn.functional.pad(w, (0, cols * block[1] - K, 0, rows * block[0] - N))
    tiles = padded.view(rows, block[0], cols, block[1])
    scale = (tiles.abs().amax((1, 3)) / 448.0).clamp(min=1e-12)
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(rows * block[0], cols * block[1])[:N, :K]
    return q.contiguous(), scale


def check_fp8_linear(device: str, dtype: torch.dtype, M: int, N: int, K: int, block: tuple[int, int],
                     bias: bool, tol: float = 1e-2, representable: bool = False) -> tuple[float, float]:
    """(error against the same-quantisation reference, against unquantised activations), both
    relative to the output's norm; asserts `tol` and 6e-2. `representable`: every activation group
    is FP8 values times a power of two with its maximum at 448 (quantisation exact whatever the
    rounding: the rest is the kernel's indexing and scaling)."""
    from epinfer.kernels.fp8_gemm import dequantize_blocks, fp8_linear, fp8_linear_reference

    gen = torch.Generator().manual_seed(M * 7 + N + K)
    w, scale = random_fp8_weight(N, K, block, gen)
    x = torch.randn(M, K, generator=gen)
    x[0, :5] *= 40  # an outlier: its group's scale, not the row's
    if representable:
        x = (x * 64).clamp(-440, 440).to(torch.float8_e4m3fn).float()
        x[:, ::block[1]] = 448.0
        shift = torch.randint(-12, -4, (M, -(-K // block[1])), generator=gen)  # a scale per group
        x = x * 2.0 ** shift.repeat_interleave(block[1], 1)[:, :K]
    b = torch.randn(N, generator=gen) * 0.1 if bias else None
    bias_dev = b.to(device, dtype) if bias else None
    got = fp8_linear(x.to(device, dtype), w.to(device), scale.to(device), block, bias_dev)
    ref = fp8_linear_reference(x.to(dtype), w, scale, block, b.to(dtype) if bias else None).float()
    exact = x @ dequantize_blocks(w, scale, block).T + (b if bias else 0)
    rel = ((got.float().cpu() - ref).norm() / ref.norm()).item()
    rel_exact = ((got.float().cpu() - exact).norm() / exact.norm()).item()
    assert rel <= tol and rel_exact <= 6e-2, (rel, rel_exact)
    return rel, rel_exact


CASES = [(1, 256, 512, (128, 128)), (7, 384, 2048, (128, 128)), (64, 200, 300, (128, 128)),
         (300, 1024, 2048, (128, 128)), (33, 48, 80, (16, 16))]


@pytest.mark.parametrize("M,N,K,block", CASES)
def test_fp8_linear_kernel(M, N, K, block):
    exact, _ = check_fp8_linear("cuda", torch.bfloat16, M, N, K, block, bias=M % 2 == 1, tol=1e-2, representable=True)
    rel, rel_exact = check_fp8_linear("cuda", torch.bfloat16, M, N, K, block, bias=M % 2 == 1)
    print(f"M {M} N {N} K {K} block {block}: {rel:.2e} vs same quantisation ({exact:.2e} with representable "
          f"inputs), {rel_exact:.2e} vs bf16 activations")
