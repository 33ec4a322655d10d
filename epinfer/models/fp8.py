"""FP8 weights in the model: which projections keep FP8 and how they get there.

`quantize_fp8(model, block)` turns this rank's shard of every projection into FP8 with float32
scales per (block rows x block columns) (`kernels.fp8_gemm.quantize_blocks`), after the checkpoint
is loaded (or random weights drawn). An FP8 checkpoint is dequantised on the way in and requantised
here: where a shard's blocks coincide with the checkpoint's (shards of whole blocks), the absolute
maximum of each block is its largest FP8 value times its scale, so the same FP8 values and scales
come back; a shard boundary inside a checkpoint block gets blocks of its own, a valid FP8 form of
the same weights. The embeddings, norms, the router, the shared expert's gate column and the LM head
stay in the compute dtype, as in Qwen's FP8 checkpoints, and so do the GDN decay / write-strength
projections (one row per value head: nothing to save, and a tensor-parallel shard of them would
cut through every block).
"""

from __future__ import annotations

from torch import nn

from epinfer.layers.linear import Linear
from epinfer.layers.moe import FusedExperts

KEPT = (".lm_head", ".mlp.gate", ".shared_expert_gate", ".in_proj_a", ".in_proj_b")  # names ending so stay as they are


def quantize_fp8(model: nn.Module, block: tuple[int, int]) -> None:
    """Quantises the projections in place."""
    for name, module in model.named_modules():
        if isinstance(module, FusedExperts) or (isinstance(module, Linear) and not f".{name}".endswith(KEPT)):
            module.to_fp8(block)
