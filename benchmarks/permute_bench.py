"""The decode MoE's pair permutation: `moe_triton.permute` (one program sorting the pairs' keys)
against the compiled torch counting sort (`layers.moe.torch_permute_pairs`), µs a call, 20 calls
replayed in a CUDA graph, random routing of 8 experts a row; whether their outputs are identical.

    python benchmarks/permute_bench.py
"""

from __future__ import annotations

import torch

from epinfer.kernels import moe_triton
from epinfer.layers.moe import torch_permute_pairs

CASES = [(64, 128), (200, 256), (256, 128), (512, 128), (512, 256)]  # (rows, experts)


def timed(fn, ids: torch.Tensor, n: int, reps: int = 200) -> float:
    for _ in range(3):
        fn(ids, 0, n)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn(ids, 0, n)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps // 20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def main() -> int:
    for rows, experts in CASES:
        ids = torch.stack([torch.randperm(experts, device="cuda")[:8] for _ in range(rows)])
        same = all(torch.equal(a, b) for a, b in zip(torch_permute_pairs(ids, 0, experts),
                                                     moe_triton.permute(ids, 0, experts), strict=True))
        print(f"rows {rows}, experts {experts}, pairs {rows * 8}: compiled torch "
              f"{timed(torch_permute_pairs, ids, experts):.2f} µs, one program "
              f"{timed(moe_triton.permute, ids, experts):.2f} µs, identical {same}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
