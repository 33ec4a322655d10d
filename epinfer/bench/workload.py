"""`epinfer bench --workload NAME`: end-to-end throughput the way users measure it.

A fresh engine on a model shape with random weights is given every request at once (as
`epinfer generate` does) and runs them to completion. Reported: total and output tokens/s,
requests/s, time to first token and time per output token (p50 / p99, over requests), start-up
(engine construction incl. the decode graphs, then a warm-up that compiles the prefill kernels), and wall time
by step kind: `prefill` (only prompt chunks), `mixed` (prompt chunks and decodes), `decode` (only
decodes). Prompts are random token ids; `--ignore-eos` semantics: every request generates its
full `output_len`. Through HTTP, and with several ranks (`--dp/--tp`), the same workloads run
with `--serve` (`serve_workload.py`: a fresh `epinfer serve` and streaming clients).

Profiles (vLLM's published H200 profiles use the same shapes):
  throughput        1000 requests, 1024 in / 128 out
  long-context      100 requests, 32000 in / 100 out
  generation-heavy  200 requests, 1000 in / 2000 out
  mixed             500 requests, lengths from a seeded long-tailed (log-normal) draw
  shared-prefix     1000 requests: one 4096-token system prompt + 256 tokens of their own / 128 out
  multi-turn        100 chats of 5 turns (500 requests): each turn adds 256 tokens to the whole history
                    and the previous reply, and is submitted when that reply is complete; 128 out
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from epinfer.bench.single import bench_model_len, check_bench_tokens, shape_folder
from epinfer.core.config import EngineConfig
from epinfer.core.env import SWITCHES
from epinfer.core.errors import RunFailed, UserError
from epinfer.core.sampling_params import SamplingParams
from epinfer.core.untrusted import write_atomic
from epinfer.engine.engine import Engine, freeze_heap

GREEDY = {"temperature": 0}  # a workload's requests' sampling, where --sampling does not set it


@dataclasses.dataclass(frozen=True)
class Workload:
    requests: int
    input_len: int
    output_len: int
    long_tailed: bool = False  # lengths drawn log-normal around input_len / output_len
    shared_prefix: int = 0  # tokens of one system prompt every request starts with (before its own)
    turns: int = 1  # chats of this many turns: a turn's prompt = the last turn's prompt + its reply + new tokens

    @property
    def chats(self) -> int:
        return -(-self.requests // self.turns)


WORKLOADS = {
    "throughput": Workload(1000, 1024, 128),
    "long-context": Workload(100, 32000, 100),
    "generation-heavy": Workload(200, 1000, 2000),
    "mixed": Workload(500, 1024, 256, long_tailed=True),
    "shared-prefix": Workload(1000, 256, 128, shared_prefix=4096),
    "multi-turn": Workload(500, 256, 128, turns=5),
}


def workload(name: str, requests: int | None = None, input_len: int | None = None,
             output_len: int | None = None) -> Workload:
    """The profile `name`, with the lengths and count given instead of its own."""
    if name not in WORKLOADS:
        raise UserError(f"unknown workload {name!r}; use {', '.join(WORKLOADS)}")
    base = WORKLOADS[name]
    return dataclasses.replace(base, requests=requests or base.requests, input_len=input_len or base.input_len,
                               output_len=output_len or base.output_len)


def warm_up_workload(w: Workload, budget: int, max_len: int) -> Workload:
    """One step of the full token budget and a few decode steps, so the kernels' first compilation
    and autotuning at these sizes is start-up, not part of the measured run."""
    warm_len = min(w.input_len, budget, max_len)
    return Workload(min(max(4, -(-budget // warm_len)), w.requests), warm_len, min(8, w.output_len))


def first_prompts(w: Workload, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt, max tokens) of the requests submitted at the start (random token ids, seeded): every
    request, or each chat's first turn; each after the shared system prompt when there is one."""
    opening = lengths(w, seed) if w.turns == 1 else [(w.input_len, w.output_len)] * w.chats
    gen = torch.Generator().manual_seed(seed + 1)
    system = torch.randint(1, vocab, (w.shared_prefix,), generator=gen).tolist()
    return [(system + torch.randint(1, vocab, (i - w.shared_prefix,), generator=gen).tolist(), o) for i, o in opening]


def next_turn(w: Workload, prompt: list[int], reply: list[int], vocab: int, chat: int, turn: int) -> list[int]:
    """A chat's next prompt: the whole history and the user's new message (seeded by chat and turn)."""
    gen = torch.Generator().manual_seed(1_000_003 * chat + turn)
    return prompt + reply + torch.randint(1, vocab, (w.input_len,), generator=gen).tolist()


def lengths(w: Workload, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) per request; `mixed`: a seeded log-normal draw (sigma 1),
    so a few requests are many times the median, as in real traffic."""
    if w.turns > 1:  # the longest turn of every chat, first: what the cache must hold
        return [(w.turns * w.input_len + (w.turns - 1) * w.output_len, w.output_len)] * w.chats
    if not w.long_tailed:
        return [(w.shared_prefix + w.input_len, w.output_len)] * w.requests
    gen = torch.Generator().manual_seed(seed)
    draw = torch.randn(w.requests, 2, generator=gen).clamp_(-2.0, 2.0).exp_()  # 0.14x to 7.4x the median
    return [(max(1, round(w.input_len * a)), max(1, round(w.output_len * b))) for a, b in draw.tolist()]


def percentile(values: list[float], q: float) -> float:
    """Nearest rank."""
    return sorted(values)[max(0, math.ceil(q * len(values)) - 1)] if values else float("nan")


def summary(completed: int, prompt: int, out: int, wall: float, ttft: list[float], tpot: list[float]) -> dict:
    """Tokens and requests per second, time to first token and per output token (p50 / p99, ms)."""
    ms = lambda xs: round(1e3 * xs, 2)  # noqa: E731
    return {"prompt_tokens": prompt, "output_tokens": out, "wall_s": round(wall, 2),
            "total_tok_s": round((prompt + out) / wall, 1), "output_tok_s": round(out / wall, 1),
            "requests_per_s": round(completed / wall, 2),
            "ttft_ms_p50": ms(statistics.median(ttft)) if ttft else None,
            "ttft_ms_p99": ms(percentile(ttft, 0.99)) if ttft else None,
            "tpot_ms_p50": ms(statistics.median(tpot)) if tpot else None,
            "tpot_ms_p99": ms(percentile(tpot, 0.99)) if tpot else None}


def step_shape(scheduled) -> tuple[str, int, int]:
    """(kind, rows, decode rows) of a planned step (before it runs)."""
    decodes = sum(item.seq.num_computed >= len(item.seq.prompt_ids) for item in scheduled)
    kind = "decode" if decodes == len(scheduled) else "prefill" if decodes == 0 else "mixed"
    return kind, sum(item.num_new for item in scheduled), decodes


def run_workload(engine: Engine, w: Workload, seed: int = 0, step_log: list | None = None,
                 sampling: dict | None = None) -> dict:
    """Every request submitted at once, run to the end; per-request first-token and finish times.
    `step_log`: gets one dict per step (kind, rows, decode rows, ms, end since the start);
    `sampling`: `SamplingParams` fields of every request (default greedy)."""
    params = {**GREEDY, **(sampling or {})}
    pairs = lengths(w, seed)
    room = engine.max_model_len - 1
    if any(i >= room or i + o > engine.max_model_len for i, o in pairs):
        raise UserError(f"the workload needs a max model length of {max(i + o for i, o in pairs)} tokens; "
                        f"the cache holds {engine.max_model_len}")
    vocab = engine.model_config.vocab_size
    firsts = first_prompts(w, vocab, seed)
    before = engine.scheduler.allocator.stats()
    start = time.perf_counter()
    seqs = [engine.add_request(p, SamplingParams(max_tokens=o, ignore_eos=True, **params)) for p, o in firsts]
    chat_of = {s.index: (c, 1) for c, s in enumerate(seqs)}  # request -> (chat, turn)
    submitted = {s.index: start for s in seqs}
    first: dict[int, float] = {}
    done: dict[int, float] = {}
    by_kind: dict[str, list[float]] = {"prefill": [], "mixed": [], "decode": []}
    first_s = None
    most_running = 0  # the most sequences admitted at once (the sequence limit, the KV cache's room or the budget)
    while engine.has_work():
        t = time.perf_counter()
        scheduled, plan = engine.plan_step()
        most_running = max(most_running, len(engine.scheduler.running))
        kind, rows, decodes = step_shape(scheduled)
        if scheduled:
            engine.apply(scheduled, engine.runner.execute(plan))
        else:
            engine.resolve(0)
        now = time.perf_counter()
        by_kind[kind].append(now - t)
        if step_log is not None:
            step_log.append({"kind": kind, "rows": rows, "decode_rows": decodes, "ms": round(1e3 * (now - t), 3),
                             "end_s": round(now - start, 4)})
        first_s = now - t if first_s is None else first_s
        for s in list(seqs):
            if s.index not in first and s.output_ids:
                first[s.index] = now
            if s.index not in done and s.finish_reason is not None:
                done[s.index] = now
                chat, turn = chat_of[s.index]
                if turn < w.turns and len(seqs) < w.requests:  # the user answers: the chat's next turn
                    nxt = engine.add_request(next_turn(w, s.prompt_ids, s.output_ids, vocab, chat, turn),
                                             SamplingParams(max_tokens=w.output_len, ignore_eos=True, **params))
                    seqs.append(nxt)
                    chat_of[nxt.index], submitted[nxt.index] = (chat, turn + 1), time.perf_counter()
    wall = time.perf_counter() - start
    prompt = sum(len(s.prompt_ids) for s in seqs)
    out = sum(len(s.output_ids) for s in seqs)
    ttft = [first[s.index] - submitted[s.index] for s in seqs]
    tpot = [(done[s.index] - first[s.index]) / (len(s.output_ids) - 1) for s in seqs if len(s.output_ids) > 1]
    after = engine.scheduler.allocator.stats()
    queried, hit = (after[k] - before[k] for k in ("prefix_cache_queries", "prefix_cache_hits"))
    return {"requests": len(seqs), **summary(len(seqs), prompt, out, wall, ttft, tpot),
            "prefix_cache_hit_rate": round(hit / max(1, queried), 4), "first_step_s": round(first_s or 0.0, 2),
            "most_running": most_running,
            "steps": {k: {"count": len(v), "total_s": round(sum(v), 2),
                          **{f"{q}_ms": round(1e3 * f(v), 2) if v else None
                             for q, f in (("median", statistics.median), ("p90", lambda x: percentile(x, 0.9)),
                                          ("max", max))}}
                      for k, v in by_kind.items()}}


def allocator_counts(device: torch.device) -> dict[str, int] | None:
    """The CUDA caching allocator's retry and device-allocation counts so far (None off CUDA)."""
    if device.type != "cuda":
        return None
    stats = torch.cuda.memory_stats(device)
    return {"alloc_retries": stats.get("num_alloc_retries", 0), "device_allocs": stats.get("num_device_alloc", 0)}


@contextlib.contextmanager
def collections_timed():
    """Python's garbage collections while the block runs, by generation: count, total and longest
    ms (a full collection, generation 2, stops the engine loop; one of the whole heap took hundreds
    of ms, RESULTS.md §6). Yields the dict, filled when the block ends."""
    out: dict[str, dict] = {}
    started: list[float] = []

    def timed(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            ms = (time.perf_counter() - started.pop()) * 1e3
            g = out.setdefault(f"gen{info['generation']}", {"count": 0, "total_ms": 0.0, "max_ms": 0.0})
            g["count"] += 1
            g["total_ms"] += ms
            g["max_ms"] = max(g["max_ms"], ms)

    gc.callbacks.append(timed)
    try:
        yield out
    finally:
        gc.callbacks.remove(timed)
        for g in out.values():
            g["total_ms"], g["max_ms"] = round(g["total_ms"], 1), round(g["max_ms"], 1)


def cache_plan(engine) -> dict:
    """What the memory plan gave the cache: KV tokens, GDN state slots and snapshots, GiB in all."""
    layout, cache = engine.runner.layout, engine.runner.cache
    held = sum(t.numel() * t.element_size() for pair in cache.per_layer for t in pair)
    return {"kv_tokens": layout.capacity_tokens, "state_slots": layout.num_state_slots,
            "snapshots": layout.num_snapshots, "gib": round(held / 2**30, 2),
            "expandable_segments": engine.expandable_segments}


def bench_workload(shape: str, name: str, engine_cfg: EngineConfig, layers: int | None = None,
                   requests: int | None = None, input_len: int | None = None, output_len: int | None = None,
                   seed: int = 0, step_log: str | None = None, sampling: dict | None = None) -> dict:
    """One record: the workload `name` (or its custom lengths) on a fresh engine of `shape`;
    `step_log`: a file to get one JSON line per measured step (kind, rows, decode rows, ms, end since the start)."""
    w = workload(name, requests, input_len, output_len)
    pairs = lengths(w, seed)
    check_bench_tokens(sum(i + o for i, o in pairs))
    longest = max(i + o for i, o in pairs)
    with tempfile.TemporaryDirectory() as tmp:
        folder = shape_folder(shape, layers, tmp, engine_cfg.fp8_weights)
        ecfg = dataclasses.replace(engine_cfg, model=str(folder), random_weights=True,
                                   max_model_len=max(engine_cfg.max_model_len or 0,
                                                     bench_model_len(folder, longest, 16)))
        t0 = time.perf_counter()
        engine = Engine(ecfg)
        built = time.perf_counter() - t0
        freeze_heap()
        steps: list[dict] | None = [] if step_log else None
        warm = run_workload(engine, warm_up_workload(w, engine.ecfg.max_num_batched_tokens, engine.max_model_len - 9),
                            seed + 7, sampling=sampling)
        before = allocator_counts(engine.device)
        if before is not None:
            torch.cuda.reset_peak_memory_stats(engine.device)
        with collections_timed() as collections:
            measured = run_workload(engine, w, seed, steps, sampling)
        after = allocator_counts(engine.device)
        record = {"workload": name, "shape": shape, "layers": engine.model_config.num_layers,
                  "device": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu",
                  "dtype": engine_cfg.dtype, "weights": "fp8" if engine_cfg.fp8_weights else engine_cfg.dtype,
                  "ssm_state": str(engine.runner.layout.state_dtype).removeprefix("torch."),
                  "async_scheduling": engine.ecfg.async_scheduling,
                  "prefix_caching": engine.scheduler.allocator.prefix_caching,
                  "graph_pieces": engine.runner.pieces is not None, "chunk_attention": SWITCHES.chunk_attention,
                  "max_num_seqs": engine.scheduler.max_num_seqs,
                  "cache": cache_plan(engine),
                  "max_num_batched_tokens": engine.ecfg.max_num_batched_tokens,
                  "sampling": sampling or GREEDY,
                  # start-up by phase: weights, cache, decode graphs, then the warm-up: its first
                  # (full-budget) step is the prefill kernels' compilation and autotuning
                  "startup_s": {"engine": round(built, 2), **engine.startup, "warm_up": warm["wall_s"],
                                "warm_up_first_step": warm["first_step_s"]},
                  **measured, "gc": collections}
        if before is not None:
            # the caching allocator during the measured run: a retry frees cached blocks and
            # synchronises the device (a step that waits), a device allocation costs a cudaMalloc
            # (peak reserved well above peak allocated: the cache's blocks fragmented; above
            # utilization_gib: more than the memory plan allowed for)
            record["cuda_allocator"] = {k: after[k] - before[k] for k in before} | {
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved(engine.device) / 2**30, 2),
                "peak_allocated_gib": round(torch.cuda.max_memory_allocated(engine.device) / 2**30, 2),
                "utilization_gib": round(engine.ecfg.gpu_memory_utilization
                                  * torch.cuda.get_device_properties(engine.device).total_memory / 2**30, 2)}
    print(f"epinfer bench: {name}: {record['requests']} requests, {record['total_tok_s']} tok/s total, "
          f"{record['output_tok_s']} tok/s out, TTFT p50 {record['ttft_ms_p50']} ms, TPOT p50 "
          f"{record['tpot_ms_p50']} ms, at most {record['most_running']} of {record['max_num_seqs']} sequences "
          "running", file=sys.stderr, flush=True)
    if step_log:
        try:
            write_atomic(Path(step_log).resolve(), (json.dumps(step) + "\n" for step in steps))
        except OSError as exc:  # (a full disk): the figures above still stand
            raise RunFailed(1, f"cannot write --step-log {step_log}: {exc.strerror or exc}") from None
    return record
