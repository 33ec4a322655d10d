"""Model runner: builds the (sharded) model, owns the cache tensors and block tables, turns a
`StepPlan` into a `ForwardBatch`, runs the forward and returns logits of the rows to sample."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from epinfer.core.config import ModelConfig
from epinfer.core.errors import UserError
from epinfer.core.forward import DecodeMeta, ForwardBatch, SeqSlice
from epinfer.distributed.parallel import ParallelContext
from epinfer.kernels import paged_attention
from epinfer.layers.rotary import RotaryEmbedding
from epinfer.models.causal_lm import CausalLM
from epinfer.models.fp8 import quantize_fp8
from epinfer.models.loader import load_checkpoint
from epinfer.runner.batch import StepPlan
from epinfer.runner.cache import CacheLayout, CacheTensors
from epinfer.runner.cuda_graphs import DecodeGraphs
from epinfer.runner.logprobs import prompt_logprobs
from epinfer.runner.piecewise import PiecewiseGraphs


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype, ctx: ParallelContext | None = None, fp8: bool = False) -> int:
    """Bytes of this rank's shard of the weights in `dtype` (the model built on the meta device);
    `fp8`: with the projections in FP8 and their scales, plus the largest layer in `dtype` (the
    load holds one at a time)."""
    with _default_dtype(dtype), torch.device("meta"):
        model = CausalLM(cfg, ctx)
    if not fp8:
        return sum(p.numel() * p.element_size() for p in model.parameters())
    layer = max(sum(p.numel() * p.element_size() for p in lay.parameters()) for lay in model.model.layers)
    quantize_fp8(model, cfg.fp8_block)
    return layer + sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def available_bytes(device: torch.device) -> int | None:
    """Memory free for the weights, or None where unknown (then nothing is checked): a GPU's free
    memory plus what this process's allocator holds unused; on the CPU what the system still has
    available, and under a cgroup v2 limit what it leaves (page cache, which the kernel reclaims,
    not counted as used). A multi-rank CPU run checks each rank's shard alone."""
    if device.type in ("cuda", "xpu"):
        backend = getattr(torch, device.type)
        with contextlib.suppress(AttributeError, RuntimeError):  # a backend without these: unknown
            cached = backend.memory_reserved(device) - backend.memory_allocated(device)
            return backend.mem_get_info(device)[0] + cached
        return None
    if device.type != "cpu":
        return None
    avail = None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        lines = Path("/proc/meminfo").read_text().splitlines()
        avail = next(int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:"))
    if avail is None:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError, StopIteration):
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            stat = (cgroup / "memory.stat").read_text().splitlines()
            reclaimable = next(int(line.split()[1]) for line in stat if line.startswith("inactive_file "))
            used = int((cgroup / "memory.current").read_text()) - reclaimable
            left = max(0, int(limit) - used)
            avail = left if avail is None else min(avail, left)
    return avail


def forward_has_collectives(ctx: ParallelContext) -> bool:
    """The forward issues TP or EP collectives (a parallel run with more than one rank a replica or EP)."""
    return ctx.comm is not None and (ctx.tp_size > 1 or ctx.ep_size > 1)


def pieces_allowed(ctx: ParallelContext) -> bool:
    """Graph pieces need a forward without collectives, debug modes (Python per layer) or poisoned pads."""
    return not forward_has_collectives(ctx) and not ctx.eager_only and not ctx.poison_pads


def build_model(cfg: ModelConfig, folder: Path | None, dtype: torch.dtype, device: torch.device,
                ctx: ParallelContext | None = None, fp8: bool = False) -> CausalLM:
    """Construct this rank's shard on `device` in `dtype` and load `folder` into it. Stops with a
    one-line error first if the shard cannot fit (instead of an out-of-memory kill or traceback).
    `fp8`: keep the projections in FP8 in the checkpoint's blocks (`models.fp8`)."""
    if fp8 and cfg.fp8_block is None:
        raise UserError("--fp8-weights needs an FP8 checkpoint (config.json with an fp8 quantization_config)")
    have = available_bytes(device)
    # the sizes alone first: even the meta-device copy of a huge config takes long to build. Some
    # rank holds at least an even share of the parameters, so the floor / ranks bounds the largest shard
    ranks = ctx.groups.world_size if ctx is not None and ctx.groups else 1
    need = cfg.weight_count_floor() * (1 if fp8 else dtype.itemsize) // ranks
    if have is None or need <= have:
        need = weight_bytes(cfg, dtype, ctx, fp8)
    if have is not None and need > have:
        kind = str(dtype).removeprefix("torch.") + (", FP8 projections" if fp8 else "")
        raise UserError(f"the weights need {need / 2**30:.1f} GiB on {device} ({cfg.num_layers} layers, "
                        f"{kind}) but only {have / 2**30:.1f} GiB is free: use fewer "
                        f"layers (bench --layers), a smaller dtype, more ranks or another device")
    if dtype == torch.float32 and device.type == "cuda":
        # float32 means float32: no TF32 in matmuls or in cuDNN's convolution (the GDN conv)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    # FP8: built on the meta device, then made, loaded and quantised one layer at a time, so that
    # only one layer is ever held in the compute dtype
    with _default_dtype(dtype), torch.device("meta" if fp8 else device):
        model = CausalLM(cfg, ctx)
    model.rotary.inv_freq = model.rotary.inv_freq.float()

    def each_layer(module: torch.nn.Module, load) -> None:
        materialize(module, device)
        load()
        if module is not model:
            quantize_fp8(module, cfg.fp8_block)

    if folder is not None:
        load_checkpoint(model, folder, cfg, each_layer if fp8 else None, device)
        if device.type == "cuda":  # the load's temporaries (FP8 dequantisation) are not kept from the cache
            torch.cuda.empty_cache()
    elif fp8:
        for i, layer in enumerate(model.model.layers):
            each_layer(layer, lambda i=i, layer=layer: random_init(layer, cfg.zero_centered_norm, seed=i))
        each_layer(model, lambda: random_init(model, cfg.zero_centered_norm, skip="model.layers."))
    else:
        random_init(model, cfg.zero_centered_norm)
    for module in model.modules():
        if hasattr(module, "stack"):  # q/k/v and gate/up as one GEMM each (low precision only)
            module.stack()
    # inference only: a forward outside inference mode (a capture, say) must record no autograd
    # graph, which would keep every intermediate it saves alive
    return model.requires_grad_(False).eval()


def materialize(module: torch.nn.Module, device: torch.device) -> None:
    """`module`'s parameters and buffers still on the meta device, made (uninitialised) on `device`;
    a parameter keeps its attributes (the shard it selects)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_meta:
                made = torch.nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                made.__dict__.update(p.__dict__)
                sub._parameters[name] = made
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_meta:
                sub._buffers[name] = torch.empty_like(b, device=device)
    if isinstance(module, CausalLM):  # its only computed buffer: the rotary frequencies
        made = RotaryEmbedding(module.rotary.rotary_dim, module.config.rope_theta).to(device)
        module.rotary.inv_freq = made.inv_freq.float()


@torch.no_grad()
def random_init(model: torch.nn.Module, zero_centered: bool, std: float = 0.02, seed: int = 0,
                skip: str | None = None) -> None:
    """Random weights generated on the device (benchmarks: speed doesn't depend on values).
    Norm weights are the identity, GDN decay parameters in their usual range. `skip`: a name
    prefix left as it is (layers made already)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if skip is not None and name.startswith(skip):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name:
            p.fill_(0.0 if zero_centered and "linear_attn.norm" not in name else 1.0)
        elif leaf == "A_log":
            p.uniform_(0.0, 2.7, generator=gen)
        elif leaf in ("dt_bias", "bias"):
            p.zero_()
        else:
            p.normal_(0.0, std, generator=gen)


class ModelRunner:
    """Decode-only steps on CUDA take the fast path: one batched paged-decode attention kernel,
    metadata in one host-to-device copy, and (`cuda_graphs`) a CUDA graph per batch-size bucket.
    Prefill and mixed steps run their attention / GDN parts eagerly and the rest of each layer as
    graph pieces (`piecewise`) where there are no collectives in the forward; everything else (CPU,
    parallel prefill) runs the eager reference path."""

    def __init__(self, model: CausalLM, layout: CacheLayout, dtype: torch.dtype,
                 device: torch.device, max_model_len: int = 0, cuda_graphs: bool = False,
                 parallel_graphs: bool = False, pieces: bool = False, max_step_rows: int = 8192) -> None:
        """`pieces`: prefill and mixed steps of up to `max_step_rows` rows as graph pieces
        (`runner.piecewise`; the engine's `piecewise_default` decides); without CUDA the same pieces
        run as plain calls."""
        self.model = model
        self.cfg = model.config
        self.layout = layout
        self.device = device
        ctx = model.ctx
        self.poison = ctx.poison_pads
        self.cache = CacheTensors(model, layout, dtype, device, poison=self.poison)
        self.prev_tokens: torch.Tensor | None = None  # the last step's sampled tokens (async scheduling)
        self.prompt_records: list[tuple[int, list]] = []  # the last forward's prompt logprobs (`logits`)
        self.host_tables: dict[int, list[int]] = {}  # state slot -> KV blocks (the device copy: block_table)
        self.fast_decode = device.type == "cuda" and paged_attention.triton is not None
        self.scratch_slot = layout.num_state_slots
        self.scratch_row = layout.num_blocks * layout.block_size  # first row of the scratch block
        max_blocks = max(1, -(-(max_model_len or layout.capacity_tokens) // layout.block_size))
        # every sequence's blocks by state slot (rows beyond its blocks are unused): the decode
        # kernel reads it whole, the eager path one row per sequence
        self.block_table = torch.zeros(layout.num_state_slots + 1, max_blocks, dtype=torch.int32, device=device)
        # graphs hold collectives too, except all-to-all (its split sizes are read on the host) —
        # opt-in, `parallel_graphs` (--parallel-graphs; run on 2 H200s, not yet on 4: see RESULTS.md);
        # debug modes run Python per layer and collective: no graphs then
        self.collectives = forward_has_collectives(ctx)
        capturable = (not self.collectives or parallel_graphs) and (
            ctx.ep_size == 1 or ctx.dispatch != "alltoall")
        debug = ctx.eager_only
        self.graphs = DecodeGraphs(self, layout.num_state_slots, ctx.tp_size if ctx.sequence_parallel else 1) if (
            cuda_graphs and self.fast_decode and capturable and not debug) else None
        self.shared_buckets: list[int] | None = None  # forwards with collectives: graph sizes every rank has
        capture = device.type == "cuda" and cuda_graphs
        self.pieces = PiecewiseGraphs(self, max_step_rows, capture) if pieces and pieces_allowed(ctx) else None

    def agree_graphs(self, ctx) -> None:
        """A forward with collectives uses graphs only if every rank has them, with the same buckets
        (one all-reduce at start-up): the DP decision then pads decode steps to the shared buckets
        and every rank replays together. Without collectives (TP 1, no EP) each replica keeps its own choice."""
        if not self.collectives:
            return
        mine = [1, self.graphs.buckets[-1], len(self.graphs.buckets)] if self.graphs is not None else [0, 0, 0]
        have = ctx.comm.all_reduce_cpu(torch.tensor(mine), ctx.groups.world_cpu, "graphs.agree")
        world = ctx.groups.world_size
        if int(have[0]) != world or have.tolist() != [world * v for v in mine]:
            self.graphs = None  # some rank has none, or other buckets (the same steps must replay the same graph)
        self.shared_buckets = self.graphs.buckets if self.graphs is not None else None

    @torch.inference_mode()
    def warm_up(self, max_rows: int) -> None:
        """Eager forwards of padding rows (the scratch block and slot only) at the powers of two past
        the largest graph bucket up to `max_rows`, and `max_rows`: the MoE kernels' tile variants and
        the compiled functions' shapes of larger steps are built now, not in the middle of a run."""
        first = self.graphs.buckets[-1] if self.graphs is not None else 1
        sizes = sorted({max_rows, *(1 << i for i in range(first.bit_length(), max_rows.bit_length()))})
        for rows in (r for r in sizes if r > first):
            meta = self.padding_meta(rows).to(self.device)
            self.model(self.decode_batch(meta, 0), self.cache.per_layer)

    def _register_blocks(self, slot: int, blocks: list[int]) -> None:
        self.host_tables[slot] = blocks
        row = torch.tensor(blocks, dtype=torch.int32)
        self.block_table[slot, :len(blocks)] = row.to(self.device, non_blocking=True)

    def build_batch(self, plan: StepPlan, rows: int | None = None,
                    moe_sizes: list[int] | None = None, step_id: int = -1) -> ForwardBatch:
        ids: list[int] = []
        src: list[int] = []  # per row: the previous step's sampled row feeding it, or -1
        positions: list[int] = []
        kv_slots: list[int] = []
        seqs: list[SeqSlice] = []
        logits_rows: list[int] = []
        bs = self.layout.block_size
        for work in plan.items:
            if work.new_blocks is not None:
                self._register_blocks(work.state_slot, work.new_blocks)
            blocks = self.host_tables[work.state_slot]
            row, n = len(ids), len(work.tokens)
            ids.extend(work.tokens)
            src.extend([work.prev_row] if work.prev_row >= 0 else [-1] * n)
            pos = range(work.start, work.start + n)
            positions.extend(pos)
            kv_slots.extend(blocks[p // bs] * bs + p % bs for p in pos)
            seqs.append(SeqSlice(row, n, work.start, work.state_slot,
                                 self.block_table[work.state_slot], work.captures))
            if work.samples:
                logits_rows.append(row + n - 1)
        real = len(ids)
        pad = max(0, (rows or real) - real)
        ids.extend([0] * pad)
        positions.extend([0] * pad)
        kv_slots.extend([-1] * pad)

        def t(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)  # no stream sync

        input_ids = t(ids)
        if plan.has_pending:
            src.extend([-1] * pad)
            self.feed_pending(input_ids, t(src))
        batch = ForwardBatch(input_ids, t(positions), t(kv_slots), seqs, t(logits_rows), real,
                             moe_sizes=moe_sizes, step_id=step_id, block_table=self.block_table)
        return batch.finalize(self.device)

    def feed_pending(self, ids_T: torch.Tensor, src_T: torch.Tensor) -> None:
        """Rows whose input is a token sampled in the previous step take it from the device."""
        ids_T.copy_(torch.where(src_T >= 0, self.prev_tokens[src_T.clamp(min=0)], ids_T))

    def decode_only(self, plan: StepPlan) -> bool:
        """Every item of `plan` decodes one token after earlier context (true for an empty plan)."""
        return self.fast_decode and all(len(w.tokens) == 1 and w.start > 0 and w.new_blocks is None
                                        and not w.targets for w in plan.items)

    def padding_meta(self, rows: int) -> torch.Tensor:
        return self.decode_meta_host(StepPlan([], [], False), rows, allow_empty=True)

    def decode_meta_host(self, plan: StepPlan, rows: int, allow_empty: bool = False) -> torch.Tensor | None:
        """[7, rows] int64 on the host (ids, positions, kv rows, state slots, lengths, real mask,
        previous-step source row or -1) when every item of `plan` decodes one token after earlier
        context; None otherwise. `allow_empty`: a plan without items (a dummy batch) gives all
        padding rows."""
        if not self.decode_only(plan) or not (plan.items or allow_empty):
            return None
        bs, n = self.layout.block_size, len(plan.items)
        pad = rows - n
        meta = [[max(w.tokens[0], 0) for w in plan.items] + [0] * pad,
                [w.start for w in plan.items] + [0] * pad,
                [self.host_tables[w.state_slot][w.start // bs] * bs + w.start % bs for w in plan.items]
                + [self.scratch_row] * pad,
                [w.state_slot for w in plan.items] + [self.scratch_slot] * pad,
                [w.start + 1 for w in plan.items] + [0] * pad,
                [1] * n + [0] * pad,
                [w.prev_row for w in plan.items] + [-1] * pad]
        return torch.tensor(meta, dtype=torch.long)

    def decode_batch(self, meta_7T: torch.Tensor, real: int, moe_sizes: list[int] | None = None,
                     step_id: int = -1) -> ForwardBatch:
        """A ForwardBatch whose tensors are views of `meta_7T` (device): the graphs' static buffer."""
        ids, positions, kv_rows, slots, lens, mask = meta_7T[:6]
        T = meta_7T.shape[1]
        batch = ForwardBatch(ids, positions, kv_rows, [], torch.arange(real, device=self.device), real,
                             moe_sizes=moe_sizes, step_id=step_id,
                             decode=DecodeMeta(slots, lens, mask.bool(), self.block_table))
        assert real <= T
        return batch.finalize(self.device)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, rows: int | None = None, moe_sizes: list[int] | None = None,
                want_logits: bool = True, step_id: int = -1, graph: bool | None = None) -> torch.Tensor | None:
        """`graph`: the parallel step's decision (every rank replays its graph of `rows` rows, a
        dummy batch too); None in a single process, where the choice is local."""
        self.cache.copy_states(plan.snapshots)
        self.cache.reset_slots(plan.reset_slots)
        for slot in plan.reset_slots:
            self.host_tables.pop(slot, None)
        self.cache.copy_states(plan.restores)
        n = len(plan.items)
        if graph and self.graphs is not None:
            logits = self.graphs.run(self.decode_meta_host(plan, rows, allow_empty=True), n, plan.has_pending,
                                     moe_sizes)
            return logits if want_logits else None
        bucket = self.graphs.bucket(n) if graph is None and self.graphs is not None else None
        meta = self.decode_meta_host(plan, bucket or rows or plan.num_tokens)
        if meta is not None and bucket is not None:
            return self.graphs.run(meta, n, plan.has_pending)
        if meta is not None:
            meta = meta.to(self.device, non_blocking=True)
            if plan.has_pending:
                self.feed_pending(meta[0], meta[6])
            batch = self.decode_batch(meta, n, moe_sizes, step_id)
        else:
            size = self.pieces.bucket(max(rows or 0, plan.num_tokens)) if self.pieces is not None else None
            batch = self.build_batch(plan, size or rows, moe_sizes, step_id)
            if size is not None:
                hidden = self.pieces.run(batch, self.cache.per_layer)
                return self.logits(plan, hidden, batch) if want_logits else None
        hidden = self.model(batch, self.cache.per_layer)
        return self.logits(plan, hidden, batch) if want_logits else None

    def logits(self, plan: StepPlan, hidden_TD: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """The sampled rows' logits; the prompt logprobs its items ask for kept for the engine
        (`take_prompt_logprobs`)."""
        if any(w.targets for w in plan.items):
            self.prompt_records = prompt_logprobs(self.model.compute_logits, plan, hidden_TD)
        return self.model.compute_logits(hidden_TD[batch.logits_rows])

    def take_prompt_logprobs(self) -> list[tuple[int, list]]:
        """[(plan item index, records)] of the last forward (`runner.logprobs`), once."""
        records, self.prompt_records = self.prompt_records, []
        return records
