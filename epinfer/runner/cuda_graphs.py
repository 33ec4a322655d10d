"""CUDA graphs for decode-only steps, collectives included.

A decode step of B sequences runs as the graph of the smallest bucket >= B: the step's metadata
(`ModelRunner.decode_meta_host`, padded to the bucket) is copied into one static device buffer and
the graph replays forward + LM head for every row of the bucket. Padding rows are inert exactly as
in eager mode (scratch cache block and state slot, zero routing weight, masked outputs), so the
real rows' results do not depend on the bucket.

Each graph is captured after one warm-up forward whose rows are all padding (so it compiles the
kernels without touching any sequence's cache or state). Without collectives in the forward the
engine captures every bucket at start-up, largest first (`capture_all`), so no step of a run pays
for a capture; with collectives a bucket is captured the first time a step needs it, by every rank
at that same step. All graphs share one memory pool.

In a parallel run every rank captures and replays at the same steps (the DP decision says when, and
with which bucket), so the collectives inside the graphs pair up exactly as eager ones do. The
communicator records each graph's collectives at capture; a replay is one ledger entry naming them.
"""

from __future__ import annotations

import contextlib

import torch

from epinfer.core.forward import graph_bucket


def buckets_up_to(limit: int, multiple: int = 1) -> list[int]:
    """Batch sizes with a graph, up to `limit` rows (`core.forward.graph_bucket`, the last one
    `limit`), each a multiple of `multiple` (TP with sequence-parallel MoE splits the rows evenly)."""
    return sorted({-(-min(graph_bucket(r), limit) // multiple) * multiple for r in range(1, limit + 1)})


class DecodeGraphs:
    def __init__(self, runner, max_rows: int, multiple: int = 1) -> None:
        self.runner = runner
        self.comm = runner.model.ctx.comm  # None in a single process
        self.buckets = buckets_up_to(max_rows, multiple)
        self.meta = torch.zeros(7, self.buckets[-1], dtype=torch.long, device=runner.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, list]] = {}
        self.pool = None
        # [largest bucket, V] float32, every graph's logits (a view of its first rows). A graph's own
        # output would stay allocated in the pool: 7.8 GiB over the buckets up to 512 rows at a 248k
        # vocabulary, 31 GiB up to 1024 (which ran out of memory capturing them on an H200). The steps
        # run in stream order, so a step's logits are read before the next replay writes them, as
        # when consecutive steps replay the same graph.
        self.logits: torch.Tensor | None = None

    def release(self) -> None:
        """Free every graph and the pool. Must run before the process group is destroyed: NCCL keeps a
        reference per captured collective and waits for the graphs holding them to go before it
        shuts a communicator down (destroying the group first hangs forever)."""
        if self.graphs:
            torch.cuda.synchronize(self.runner.device)
            for graph, _, _ in self.graphs.values():
                graph.reset()
        self.graphs.clear()
        self.pool = None
        self.logits = None

    def capture_all(self) -> None:
        """Every bucket's graph now, largest first (the smaller ones then fit in its pool)."""
        for size in reversed(self.buckets):
            if size not in self.graphs:
                self.graphs[size] = self._capture(size, None)

    def bucket(self, rows: int) -> int | None:
        return next((b for b in self.buckets if b >= rows), None)

    def run(self, meta_host: torch.Tensor, real: int, pending: bool = False,
            moe_sizes: list[int] | None = None) -> torch.Tensor:
        """Logits [real, V] of a decode step whose host metadata is padded to a bucket size;
        `pending`: some inputs are the previous step's sampled tokens (fed on the device);
        `moe_sizes`: rows per EP rank (parallel runs: every rank's bucket)."""
        size = meta_host.shape[1]
        if size not in self.graphs:
            self.graphs[size] = self._capture(size, moe_sizes)
        graph, logits, schedule = self.graphs[size]
        self.meta[:, :size].copy_(meta_host, non_blocking=True)
        if pending:
            self.runner.feed_pending(self.meta[0, :size], self.meta[6, :size])
        graph.replay()
        if schedule:
            done = torch.cuda.Event()
            done.record()
            self.comm.replayed(f"decode.b{size}", schedule, done)
        return logits[:real]

    def _forward(self, size: int, moe_sizes: list[int] | None, out: torch.Tensor | None = None) -> torch.Tensor:
        r = self.runner
        batch = r.decode_batch(self.meta[:, :size], size, moe_sizes)
        hidden = r.model(batch, r.cache.per_layer)
        return r.model.compute_logits(hidden, out)

    @torch.inference_mode()
    def _capture(self, size: int, moe_sizes: list[int] | None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, list]:
        self.meta[:, :size].copy_(self.runner.padding_meta(size))
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: compiles kernels, writes scratch only
            warm = self._forward(size, moe_sizes)
        torch.cuda.current_stream().wait_stream(stream)
        if self.logits is None:
            self.logits = torch.empty(self.buckets[-1], warm.shape[1], dtype=warm.dtype, device=warm.device)
        del warm
        graph = torch.cuda.CUDAGraph()
        schedule: list = []
        # with collectives, other threads (the watchdogs) must not be caught by the capture
        recording = contextlib.nullcontext() if self.comm is None else self.comm.recording(schedule)
        mode = "global" if self.comm is None else "thread_local"
        with recording, torch.cuda.graph(graph, pool=self.pool, capture_error_mode=mode):
            logits = self._forward(size, moe_sizes, self.logits[:size])
        self.pool = graph.pool()
        return graph, logits, schedule
