"""How a GPU's memory is split: the weights first, then an activation headroom and the graph
pieces' pool, then the cache (KV blocks, a GDN state slot per running sequence, the prefix cache's
state snapshots); and the defaults that depend on it (sequences and tokens a step).
"""

from __future__ import annotations

import os

import torch

from epinfer.core.config import EngineConfig, ModelConfig
from epinfer.core.env import SWITCHES
from epinfer.core.errors import UserError
from epinfer.runner import piecewise
from epinfer.runner.cache import CacheLayout, kv_bytes_per_token, state_bytes_per_slot
from epinfer.runner.model_runner import available_bytes


def auto_max_num_seqs(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, tp: int = 1,
                      state_dtype: torch.dtype = torch.float32) -> int:
    """The default sequence limit: 512 on a GPU, unless the recurrent state of 512 sequences would
    take over a quarter of its memory; 256 otherwise. More running sequences let prompt chunks ride
    along with more decodes: the throughput profile on an H200 ran 190 decode-only steps at 512
    against 414 at 256, and the whole run faster (RESULTS.md, end-to-end workloads). More did not
    pay with prefix caching on: 800 sequences ran it at 44,190 tok/s against 44,192 at 512 in the
    same call (the riding decodes slow the mixed steps as much as the shorter decode-only tail saves).
    A function of the model, dtype and GPU model only, so every rank of a parallel run agrees."""
    if device.type != "cuda":
        return 256
    total = torch.cuda.get_device_properties(device).total_memory
    return 512 if state_bytes_per_slot(cfg, dtype, tp, state_dtype) * 512 <= total // 4 else 256


LARGE_GPU_BYTES = 70 * 2**30  # an 80 GB-class GPU or larger


def auto_max_num_batched_tokens(device: torch.device, gpu_bytes: int | None = None) -> int:
    """The default token budget of a step: 16384 on CUDA GPUs of 70 GiB or more (`gpu_bytes`: the
    GPU's memory, read from the device when None), 8192 elsewhere, where the larger step's
    activations would take too much of the cache. On an H200 the throughput profile (Qwen3.5-35B-A3B
    shape, 1000 x 1024 in / 128 out) ran 3.6 % faster at 16384 than at 8192 in the same call, its
    mixed steps 18.4 s against 21.4 s (RESULTS.md, end-to-end workloads): a larger budget reads the
    weights once for more rows."""
    if device.type != "cuda":
        return 8192
    if gpu_bytes is None:
        gpu_bytes = torch.cuda.get_device_properties(device).total_memory
    return 16384 if gpu_bytes >= LARGE_GPU_BYTES else 8192


def plan_cache(cfg: ModelConfig, ecfg: EngineConfig, dtype: torch.dtype, device: torch.device, tp: int = 1,
               state_dtype: torch.dtype = torch.float32, dp: int = 1) -> tuple[CacheLayout, int]:
    """Returns the cache layout and the max model length."""
    if ecfg.cache_memory_gb is not None:
        budget = int(ecfg.cache_memory_gb * 2**30)
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        # activation headroom, and the graph pieces' memory pool (its largest step's MoE activations)
        budget = (int(total * ecfg.gpu_memory_utilization) - used - activation_headroom(ecfg, cfg, dtype, dp)
                  - pieces_pool_bytes(cfg, ecfg, dtype, dp))
    else:
        budget = 2 * 2**30
    snapshots = state_snapshots(cfg, ecfg)
    state_bytes = state_bytes_per_slot(cfg, dtype, tp, state_dtype) * (ecfg.max_num_seqs + snapshots)
    kv_budget = budget - state_bytes
    per_token = kv_bytes_per_token(cfg, dtype, tp)
    if kv_budget <= 0:
        kept = f" and {snapshots} prefix-cache snapshots" if snapshots else ""
        raise UserError(f"recurrent state for {ecfg.max_num_seqs} sequences{kept} needs "
                        f"{gib(state_bytes)}, more than the cache budget {gib(budget)}; lower --max-num-seqs"
                        + (" or add --no-prefix-caching" if snapshots else ""))
    # whole blocks: a sequence of the max model length must fit in the blocks there are
    capacity = kv_budget // max(per_token, 1) // ecfg.block_size * ecfg.block_size
    max_len = ecfg.max_model_len
    if max_len is None:
        max_len = min(cfg.max_position_embeddings, capacity)
    elif max_len > capacity:
        raise UserError(f"--max-model-len {max_len} needs more KV cache than the budget holds "
                        f"({capacity} tokens)")
    # never more blocks than every sequence slot at full length can use
    useful = -(-max_len // ecfg.block_size) * ecfg.max_num_seqs
    num_blocks = max(1, min(capacity // ecfg.block_size, useful))
    if max_len < 2:
        raise UserError(f"max model length {max_len} is too small")
    # what is allocated next, against what is free: a budget (--cache-memory-gb) or sequence count
    # (the block table's rows) beyond the memory would be an allocator traceback, or on the CPU the
    # kernel's out-of-memory kill
    table_bytes = (ecfg.max_num_seqs + 1) * -(-max_len // ecfg.block_size) * 4  # (int32)
    need = num_blocks * ecfg.block_size * per_token + state_bytes + table_bytes
    have = available_bytes(device)
    if have is not None and need > have:
        raise UserError(f"the KV cache, recurrent state and block table need {gib(need)} on {device} but only "
                        f"{gib(have)} is free: lower --cache-memory-gb or --max-num-seqs")
    return CacheLayout(ecfg.block_size, num_blocks, ecfg.max_num_seqs, snapshots, state_dtype), max_len


def activation_headroom(ecfg: EngineConfig, cfg: ModelConfig, dtype: torch.dtype, dp: int = 1) -> int:
    """GPU memory kept out of the cache for a step's activations: 2 GiB up to 8192 rows a step (the
    Qwen3.5-35B-A3B shape's throughput profile ran at 8192 rows in it on an H200), in proportion
    beyond (a step's activations grow with its rows); and the logits of the largest decode graph
    (`max_num_seqs` rows, in the compute dtype and in float32), twice: its warm-up's outside the
    graphs' pool, and the graphs' one float32 buffer with the compute-dtype product inside the pool
    (1.5 GB each at 1024 sequences of the Qwen3.5 shape)."""
    logits = ecfg.max_num_seqs * cfg.vocab_size * (dtype.itemsize + 4) if ecfg.cuda_graphs else 0
    return int(2 * 2**30 * max(1.0, ecfg.max_num_batched_tokens / 8192)) + 2 * logits + dequantized_experts(
        cfg, ecfg, dtype, dp)


def dequantized_experts(cfg: ModelConfig, ecfg: EngineConfig, dtype: torch.dtype, dp: int = 1) -> int:
    """One layer's FP8 experts dequantised to `dtype` (EPINFER_FP8_DEQUANT_PAIRS, `layers.moe`) when the
    experts run in FP8 and a step can reach that mode: every expert counted (an upper bound under
    expert or tensor parallelism). A rank is handed at most every replica's rows (`dp`), so a step
    reaches the mode only where those rows' pairs reach the threshold over all the model's experts
    (the Qwen3.5 shape at 16,384 tokens a step: 512 pairs an expert, below the default 2048)."""
    at = SWITCHES.fp8_dequant_pairs
    if at is None or not (ecfg.fp8_weights and cfg.fp8_block):
        return 0
    if ecfg.max_num_batched_tokens * dp * max(cfg.top_k, 1) < at * cfg.num_experts:
        return 0
    return cfg.num_experts * 3 * cfg.moe_intermediate_size * cfg.hidden_size * dtype.itemsize


def pieces_pool_bytes(cfg: ModelConfig, ecfg: EngineConfig, dtype: torch.dtype, dp: int = 1) -> int:
    """What the graph pieces keep (`runner.piecewise`; `ecfg` resolved): at the largest step with
    pieces (the token budget, at most `piecewise.LARGEST`), the routed rows' inputs, gate / up,
    activation and outputs (K per row), in the compute dtype, with half again and 256 MiB for the
    router, shared expert and the allocator's rounding (the Qwen3.5 shape at 8192 rows: 0.69 GiB by
    the rows alone, 1.28 GiB reserved)."""
    if not (ecfg.cuda_graphs and ecfg.piecewise_graphs):
        return 0
    width = 2 * cfg.hidden_size + 3 * max(cfg.moe_intermediate_size, 1)
    rows = min(ecfg.max_num_batched_tokens, piecewise.LARGEST) * max(cfg.top_k, 1) * width * dtype.itemsize
    return rows * 3 // 2 + 2**28 + dequantized_experts(cfg, ecfg, dtype, dp)  # (captured: the pool keeps them)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**28 else f"{n / 2**20:.2f} MiB"


def state_snapshots(cfg: ModelConfig, ecfg: EngineConfig) -> int:
    """GDN state snapshots for prefix caching (hybrid models with caching on; none otherwise)."""
    if not (ecfg.enable_prefix_caching and cfg.is_hybrid):
        return 0
    return ecfg.prefix_state_snapshots or max(8, ecfg.max_num_seqs // 4)


def expandable_segments(device: torch.device, ctx) -> bool:
    """Turns on the CUDA caching allocator's expandable segments (each pool one segment that grows
    by mapping pages) for a single-process run, unless PYTORCH_CUDA_ALLOC_CONF is set or
    EPINFER_EXPANDABLE_SEGMENTS=0; True when on. With fixed-size segments the prefill and mixed
    steps' activations of ever-changing sizes fragment them: on an H200 the throughput profile with
    831 sequences running held 138.1 GiB reserved for a peak of 118.5 GiB allocated, 1.7 GiB short
    of the whole GPU; with these segments, 928 running, 120.6 GiB for 117.8 (RESULTS.md, end-to-end
    workloads). Parallel runs keep the default allocator: NCCL and symmetric memory with these
    segments are not yet measured."""
    if (device.type != "cuda" or ctx.groups is not None
            or os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
        return False
    on = SWITCHES.expandable_segments  # set either way: the setting is the process's, an earlier engine's stays
    allocator_settings(f"expandable_segments:{on}")
    return on


def allocator_settings(text: str) -> None:
    """The caching allocator's settings from now on (PYTORCH_CUDA_ALLOC_CONF's syntax)."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch 2.13 deprecates the other
    (setter or torch.cuda.memory._set_allocator_settings)(text)
