"""Piecewise CUDA graphs for prefill and mixed (prompt chunks + decodes) steps.

A mixed step cannot be one graph: its attention and gated-delta-rule kernels take their grids and
index tensors from the step's sequences (prompt chunk lengths, cached context), which change every
step. The rest of a layer only works row by row — the mixer's output projection, the residual adds
and norms, the router, the experts and the shared expert — and is dozens of launches per layer
that the host would otherwise issue one by one (a step of 8192 rows on the Qwen3.5 shape needed
more host time to issue than the GPU needed to run it). So a step runs as

    embed, layer 0's input norm                 eager
    for each layer i:
        mix_i  (projections, attention / GDN)   eager, reads `h`, writes `mixed[i's width]`
        piece_i                                 a graph: leave layer i (output projection, add +
                                                norm, mlp) and enter layer i + 1 (add + norm),
                                                reading and writing the static `x`, `h`
    logits of the sampled rows                  eager

Each piece is captured per row bucket (`piece_buckets`; a step of more rows than the largest runs
eagerly); a step's rows are padded to its bucket
with inert rows (no cache slot, attention and GDN output zero, routing weight 0 through the row
mask). Buffers are static and shared by every layer and bucket; the graphs share one memory pool
(captured and replayed in layer order). Forwards with collectives (TP, EP) do not use pieces.

Without CUDA (`capture=False`, the CPU tests) the same pieces run as plain calls on the same
buffers, so the split and the padding are tested everywhere. On GPUs pieces are on by default
(EPINFER_PIECEWISE=0, or `EngineConfig.piecewise_graphs=False`, runs those parts eagerly).
"""

from __future__ import annotations

import sys

import torch

from epinfer.core.forward import ForwardBatch

SMALLEST = 16
STEP = 1024  # above STEP rows, buckets are multiples of it
# steps of more rows run eagerly: a layer's launches are then a small part of its time (a 16,384-row
# step of the Qwen3.5 shape takes ~260 ms on an H200), while each bucket costs start-up (the 70
# buckets up to a 65,536-token budget took 63.5 s to capture there, the 22 up to 16,384 took 9.2 s)
LARGEST = 16384


def piece_buckets(limit: int) -> list[int]:
    """Row counts with pieces, up to `limit` (at most LARGEST): powers of two from SMALLEST to STEP,
    then multiples of STEP, and the limit itself."""
    limit = min(limit, LARGEST)
    sizes = {limit}
    size = SMALLEST
    while size < min(limit, STEP):
        sizes.add(size)
        size *= 2
    sizes.update(range(STEP, limit, STEP))
    return sorted(sizes)


class PiecewiseGraphs:
    def __init__(self, runner, max_rows: int, capture: bool) -> None:
        self.runner = runner
        self.model = runner.model
        self.capture = capture
        self.buckets = piece_buckets(max_rows)
        layers = self.model.model.layers
        top, dev = self.buckets[-1], runner.device
        dtype = self.model.model.embed_tokens.weight.dtype
        D = self.model.config.hidden_size
        self.x = torch.zeros(top, D, dtype=dtype, device=dev)
        self.h = torch.zeros(top, D, dtype=dtype, device=dev)
        self.mask = torch.zeros(top, dtype=torch.bool, device=dev)
        widths = {lay.mixer_out_proj.weight.shape[1] for lay in layers}  # each mixer output's columns
        self.mixed = {w: torch.zeros(top, w, dtype=dtype, device=dev) for w in widths}
        self.graphs: dict[int, list] = {}  # bucket -> each layer's piece (a replay, or a call on the CPU)
        self.captured: list[torch.cuda.CUDAGraph] = []
        self.pool = None
        # one side stream for every warm-up: blocks the allocator caches for a stream serve only that
        # stream, so a stream per bucket would keep each bucket's warm-up memory apart
        self.stream = torch.cuda.Stream(dev) if capture else None

    def bucket(self, rows: int) -> int | None:
        return next((b for b in self.buckets if b >= rows), None)

    def release(self) -> None:
        if self.captured:
            torch.cuda.synchronize(self.runner.device)
            for graph in self.captured:
                graph.reset()
            self.captured.clear()
        self.graphs.clear()
        self.pool = None

    @torch.inference_mode()
    def capture_all(self) -> bool:
        """Every bucket's pieces now, largest first. False (and no pieces from then on) when a piece
        cannot be captured: steps then run eagerly, as without pieces."""
        try:
            for size in reversed(self.buckets):
                self._pieces(size)
        except Exception as exc:  # e.g. a kernel that syncs with the host: eager is always correct
            print(f"epinfer: note: prefill / mixed steps run without graph pieces ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0] if str(exc) else ''})", file=sys.stderr)
            self.release()
            return False
        finally:
            if self.capture:  # the warm-ups' cached blocks go back to the device
                torch.cuda.empty_cache()
        return True

    def _piece_batch(self, size: int, step_id: int = -1) -> ForwardBatch:
        """What the mlp of a piece reads: every row's mask on the device, no sequences."""
        rows = self.mask[:size]
        return ForwardBatch(rows, rows, rows, [], rows[:0], size, step_id=step_id, row_mask_T=rows)

    def _piece(self, i: int, size: int, batch: ForwardBatch) -> None:
        """Leave layer i, enter layer i + 1 (or the final norm), on the static buffers."""
        layers = self.model.model.layers
        layer = layers[i]
        x, h = layer.leave(self.x[:size], self.mixed[layer.mixer_out_proj.weight.shape[1]][:size], batch)
        if i + 1 < len(layers):
            x, h = layers[i + 1].enter(x, h)
            self.x[:size].copy_(x)
        else:
            h = self.model.model.norm.add_forward(x, h)[1]
        self.h[:size].copy_(h)

    def _pieces(self, size: int) -> list:
        if size in self.graphs:
            return self.graphs[size]
        batch = self._piece_batch(size)
        n = len(self.model.model.layers)
        if not self.capture:
            pieces = [(lambda i=i: self._piece(i, size, batch)) for i in range(n)]
        else:
            pieces, stream = [], self.stream
            # a data-parallel run has watchdog threads: the capture must not catch them
            mode = "global" if self.model.ctx.comm is None else "thread_local"
            for i in range(n):
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # warm-up: compiles and autotunes outside the capture
                    self._piece(i, size, batch)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode=mode):
                    self._piece(i, size, batch)
                self.pool = graph.pool()
                self.captured.append(graph)
                pieces.append(graph.replay)
        self.graphs[size] = pieces
        return pieces

    def run(self, batch: ForwardBatch, caches: list) -> torch.Tensor:
        """Hidden states after the final norm for a batch padded to a bucket ([bucket, D], a view of
        the static buffer: valid until the next step)."""
        size, real = batch.num_rows, batch.num_real_rows
        pieces = self._pieces(size)
        self.mask[:real] = True
        self.mask[real:size] = False
        x, cos_sin = self.model.embed(batch)
        layers = self.model.model.layers
        x, h = layers[0].enter(x, None)
        self.x[:size].copy_(x)
        self.h[:size].copy_(h)
        for i, (layer, cache) in enumerate(zip(layers, caches, strict=True)):
            mixed = layer.mix(self.h[:size], batch, cache, cos_sin)
            self.mixed[mixed.shape[1]][:size].copy_(mixed)
            pieces[i]()
        return self.h[:size]
