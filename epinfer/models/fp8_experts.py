"""An FP8 checkpoint's per-expert tensors, a load unit's at a time: one projection of all of a
layer's experts read to the device, dequantised by one pass and copied into the stacked parameter
by one copy, their finite check one sum an expert.

Qwen's FP8 checkpoints hold each expert's gate, up and down projections as tensors of their own:
18,432 in the 30B shape. Dequantised one at a time (its scales read and checked, the product,
the copy into `w13` / `w2`, the sum of the finite check: about 0.7 ms each on an H100 host) they
took 13 of the 13.4 s a 31 GB checkpoint loaded in from the page cache (RESULTS.md, FP8 load).
A group whose tensors differ in shape from one another or from the model is loaded one tensor at a
time after all, so that its error names the tensor (`loader.WeightLoader._per_expert`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from epinfer.kernels.fp8_gemm import dequantize_weights, scale_shape


class FP8Reader:
    """A reader of one FP8 checkpoint tensor: called, it gives the weight dequantised to float32 on
    `device` (`dequantize`); `raw()` and `scale()` read the FP8 bytes and the block scales as stored."""

    def __init__(self, raw: Callable[[], torch.Tensor], scale: Callable[[], torch.Tensor], key: str,
                 dequantize: Callable[[FP8Reader], torch.Tensor]) -> None:
        self.raw, self.scale, self.key, self.dequantize = raw, scale, key, dequantize

    def __call__(self) -> torch.Tensor:
        return self.dequantize(self)


def load_group(param: torch.Tensor, locals_: list[int], readers: list[FP8Reader], dim: int | None,
               keep: range | None, block: tuple[int, int], device: torch.device | None,
               checked_scale: Callable[[torch.Tensor, str], torch.Tensor]) -> torch.Tensor | None:
    """Experts `locals_` of the stacked `param` (its gate or up half, or `w2`) from `readers`, their
    `keep` slice of dim `dim` (a tensor-parallel shard of the intermediate size) taken after
    dequantising; returns the sums of what was written, an expert each (for the finite check), or
    None, writing nothing, where the tensors' shapes are not all alike and the parameter's."""
    raws = [r.raw() for r in readers]
    shape = tuple(raws[0].shape)
    if len(shape) != 2 or any(tuple(w.shape) != shape or w.dtype != torch.float8_e4m3fn for w in raws):
        return None
    if keep is not None and keep.stop > shape[dim]:
        return None
    want = list(shape)
    if keep is not None:
        want[dim] = len(keep)
    if tuple(param.shape[1:]) != tuple(want):
        return None
    scales = [checked_scale(r.scale(), r.key) for r in readers]
    if any(tuple(s.shape) != scale_shape(shape, block) or not s.is_floating_point() for s in scales):
        return None
    w = torch.empty((len(raws), *shape), dtype=torch.float8_e4m3fn, device=device)
    for i, raw in enumerate(raws):  # (each from its memory map, straight to the device)
        w[i].copy_(raw, non_blocking=True)
    s = torch.stack([t.float() for t in scales]).to(device, non_blocking=True)
    values = dequantize_weights(w, s, block, param.dtype)
    if keep is not None:
        values = values.narrow(dim + 1, keep.start, len(keep))
    index = torch.tensor(locals_, dtype=torch.long, device=param.device)
    with torch.no_grad():
        param.index_copy_(0, index, values)
    return torch.sum(values, dim=(1, 2), dtype=torch.float32)
