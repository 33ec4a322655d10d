"""CUDA graphs for decode-only steps (single process).

A decode step of B sequences runs as the graph of the smallest bucket >= B: the step's metadata
(`ModelRunner.decode_meta_host`, padded to the bucket) is copied into one static device buffer and
the graph replays forward + LM head for every row of the bucket. Padding rows are inert exactly as
in eager mode (scratch cache block and state slot, zero routing weight, masked outputs), so the
real rows' results do not depend on the bucket.

Graphs are captured lazily, the first time a bucket is needed, after one warm-up forward whose rows
are all padding (so it compiles the kernels without touching any sequence's cache or state). All
graphs share one memory pool.
"""

from __future__ import annotations

import torch


def buckets_up_to(limit: int) -> list[int]:
    small = [b for b in (1, 2, 4, 8) if b < limit]
    return small + list(range(16, limit, 16)) + [limit]


class DecodeGraphs:
    def __init__(self, runner, max_rows: int) -> None:
        self.runner = runner
        self.buckets = buckets_up_to(max_rows)
        self.meta = torch.zeros(7, self.buckets[-1], dtype=torch.long, device=runner.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def bucket(self, rows: int) -> int | None:
        return next((b for b in self.buckets if b >= rows), None)

    def run(self, meta_host: torch.Tensor, real: int, pending: bool = False) -> torch.Tensor:
        """Logits [real, V] of a decode step whose host metadata is padded to a bucket size;
        `pending`: some inputs are the previous step's sampled tokens (fed on the device)."""
        size = meta_host.shape[1]
        if size not in self.graphs:
            self.graphs[size] = self._capture(size)
        graph, logits = self.graphs[size]
        self.meta[:, :size].copy_(meta_host, non_blocking=True)
        if pending:
            self.runner.feed_pending(self.meta[0, :size], self.meta[6, :size])
        graph.replay()
        return logits[:real]

    def _padding_meta(self, size: int) -> torch.Tensor:
        r = self.runner
        meta = torch.zeros(7, size, dtype=torch.long)
        meta[2] = r.scratch_row
        meta[3] = r.scratch_slot
        meta[6] = -1
        return meta

    def _forward(self, size: int) -> torch.Tensor:
        r = self.runner
        batch = r.decode_batch(self.meta[:, :size], size)
        hidden = r.model(batch, r.cache.per_layer)
        return r.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self.meta[:, :size].copy_(self._padding_meta(size))
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: compiles kernels, writes scratch only
            self._forward(size)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(size)
        self.pool = graph.pool()
        return graph, logits
