"""The engine: resolves the checkpoint, device and sizes, then runs the step loop
(schedule → forward → sample → stop checks) over continuously batched requests."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import numbers
import time
from collections.abc import Callable
from pathlib import Path

import torch

from epinfer.core.checkpoint_files import model_folder
from epinfer.core.config import DEMO_MODEL, EngineConfig, ModelConfig, field_flag
from epinfer.core.env import SWITCHES
from epinfer.core.errors import UserError
from epinfer.core.layout import check_model_layout
from epinfer.core.sampling_params import SamplingParams, check_text, truncate_prompt
from epinfer.distributed.parallel import ParallelContext
from epinfer.engine import restrict
from epinfer.engine.bad_words import bad_word_ids, needs_history
from epinfer.engine.cache import CacheAllocator
from epinfer.engine.device import (
    async_default,
    piecewise_default,
    resolve_device,
    resolve_dtype,
    resolve_state_dtype,
)
from epinfer.engine.generation_files import load_generation_defaults, load_tokenizer
from epinfer.engine.memory import (
    auto_max_num_batched_tokens,
    auto_max_num_seqs,
    expandable_segments,
    plan_cache,
)
from epinfer.engine.penalties import allow, bias, hold, penalize
from epinfer.engine.scheduler import ScheduledSeq, Scheduler, Sequence
from epinfer.engine.stops import StopSearch, first_match, text_before_last
from epinfer.kernels import cudnn_attention, preload
from epinfer.kernels.gdn_ops import CHUNK
from epinfer.kernels.gdn_prefill import capture_exact
from epinfer.runner.batch import PENDING, SeqWork, StepPlan
from epinfer.runner.model_runner import ModelRunner, build_model, pieces_allowed
from epinfer.runner.sampler import nonfinite_rows, sample_tokens


@dataclasses.dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    nan_logits: bool = False  # the model produced non-finite logits for this request
    error: str | None = None  # why it failed (finish_reason "error")
    prompt_logprobs: list | None = None  # asked for (SamplingParams.prompt_logprobs): as Sequence's


def freeze_heap() -> None:
    """Every object alive now (the model, its compiled code and graphs, the libraries' own) moved out
    of the cyclic collector's sight, the garbage collected first: a full collection while serving then
    scans only what serving made. Unfrozen, a full collection during the demo model's throughput run
    on CPU took 171-232 ms (RESULTS.md §6); on an H200 two decode steps of that profile took 308 and
    378 ms instead of 40. Called by the programs that keep their engine to the end (a rank, `generate`,
    `bench --workload`), not by `LLM`: an engine with CUDA graphs sits in reference cycles, so a frozen
    engine that is dropped keeps its memory until another engine is built (`release_frozen`)."""
    gc.collect()
    gc.freeze()


def release_frozen() -> None:
    """Frozen objects back in the collector's sight and the garbage among them freed (an earlier,
    dropped engine's), before a new engine takes memory."""
    if gc.get_freeze_count():
        gc.unfreeze()
        gc.collect()


class Engine:
    """One DP replica's engine. In a parallel run every rank builds one (its model shard, caches
    and runner); only the replica's TP rank 0 schedules and samples, its peers execute the
    plans it broadcasts."""

    def __init__(self, ecfg: EngineConfig, ctx: ParallelContext | None = None,
                 device: torch.device | None = None) -> None:
        release_frozen()
        ecfg = ecfg.checked()
        folder = model_folder(Path(ecfg.model) if ecfg.model else DEMO_MODEL)
        self.ecfg = ecfg
        self.ctx = ctx = ctx or ParallelContext()
        self.model_config = cfg = ModelConfig.from_dir(folder)
        check_model_layout(cfg, ctx.dp_size, ctx.tp_size, ctx.expert_parallel)
        if ecfg.max_model_len is not None and ecfg.max_model_len > cfg.max_position_embeddings:
            raise UserError(f"{field_flag('max_model_len')} {ecfg.max_model_len:,} is beyond the model's "
                            f"{cfg.max_position_embeddings:,} positions (max_position_embeddings in config.json, "
                            "4,096 if absent)")
        self.device = device or resolve_device(ecfg.device)
        self.dtype = resolve_dtype(ecfg.dtype, cfg)
        if ecfg.max_num_batched_tokens == 0:
            budget = auto_max_num_batched_tokens(self.device)
            self.ecfg = ecfg = dataclasses.replace(ecfg, max_num_batched_tokens=budget)
        state_dtype = resolve_state_dtype(ecfg.mamba_ssm_cache_dtype, self.dtype)
        if ecfg.max_num_seqs == 0:
            seqs = auto_max_num_seqs(cfg, self.dtype, self.device, ctx.tp_size, state_dtype)
            self.ecfg = ecfg = dataclasses.replace(ecfg, max_num_seqs=seqs)
        if ecfg.async_scheduling is None:
            self.ecfg = ecfg = dataclasses.replace(ecfg, async_scheduling=async_default(ecfg, self.device))
        # (never a pool for pieces the runner will not build: a forward with collectives, debug modes)
        pieces = piecewise_default(ecfg, self.device) and pieces_allowed(ctx)
        if pieces != ecfg.piecewise_graphs:
            self.ecfg = ecfg = dataclasses.replace(ecfg, piecewise_graphs=pieces)
        self.tokenizer = load_tokenizer(folder)
        self.defaults, gen_eos = load_generation_defaults(folder)
        self.eos_ids = set(gen_eos if gen_eos is not None else cfg.eos_token_ids)
        self.expandable_segments = expandable_segments(self.device, ctx)
        # weights first: on a GPU the cache gets what is left of the memory budget after them, while
        # this GPU's known kernel variants compile on other threads (`kernels.preload`)
        started = time.perf_counter()
        compiling = preload.start(self.device)
        model = build_model(cfg, None if ecfg.random_weights else folder, self.dtype, self.device, ctx,
                            ecfg.fp8_weights)
        self.kernels_preloaded = compiling.join() if compiling is not None else 0
        built = time.perf_counter()
        layout, self.max_model_len = plan_cache(cfg, ecfg, self.dtype, self.device, ctx.tp_size, state_dtype,
                                                ctx.dp_size)
        self.runner = ModelRunner(model, layout, self.dtype, self.device, self.max_model_len,
                                  ecfg.cuda_graphs, ecfg.parallel_graphs, ecfg.piecewise_graphs,
                                  ecfg.max_num_batched_tokens)
        planned = time.perf_counter()
        if self.runner.graphs is not None and not self.runner.collectives:
            self.runner.graphs.capture_all()  # with collectives: by every rank at the step needing one
            self.runner.warm_up(ecfg.max_num_batched_tokens)
        captured = time.perf_counter()
        if self.runner.pieces is not None and not self.runner.pieces.capture_all():
            self.runner.pieces = None
        # start-up by phase, seconds: weights built / loaded, cache planned and allocated, decode graphs
        # (and the larger steps' kernel variants), graph pieces
        self.startup = {"weights": round(built - started, 2), "cache": round(planned - built, 2),
                        "graphs": round(captured - planned, 2), "pieces": round(time.perf_counter() - captured, 2)}
        # prefix caching reuses KV blocks, and in a hybrid model the GDN state snapshot at the reuse point
        # (captured inside a prompt chunk where the GDN kernels give it exactly: `kernels.gdn_prefill`)
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        exact = capture_exact(probe, layout.state_dtype)
        self.scheduler = Scheduler(CacheAllocator(layout, ecfg.enable_prefix_caching), ecfg.max_num_seqs,
                                   ecfg.max_num_batched_tokens, CHUNK if exact and SWITCHES.state_capture else 0,
                                   lambda: cudnn_attention.alignment(probe, ecfg.max_num_batched_tokens))
        self.num_requests = 0
        self.pending_resets: list[int] = []
        self.inflight: collections.deque = collections.deque()  # launched steps not yet resolved
        self.last_sampled = 0  # rows sampled by the last launched step
        # a profiler attaches here: `part_scope(name)` wraps the engine's own parts of a step
        self.part_scope: Callable[[str], contextlib.AbstractContextManager] = lambda name: contextlib.nullcontext()
        if self.runner.graphs is not None and not self.runner.collectives:
            self.startup["prefill_warm_up"] = self.warm_up_prefill()

    def warm_up_prefill(self) -> float:
        """A step of the full token budget (prompt chunks) and a few decode steps of stand-in
        requests, then every trace of them removed (cached prefix blocks, counters): the prefill
        path's first compilation and autotuning (the chunked GDN rule, the attention and conv
        kernels at these sizes) is start-up, not the first requests' wait; on an H200 that first
        step took 1.6 s with warm kernel caches, and the bench's warm-up round 44 s on a fresh
        machine (RESULTS.md, end-to-end workloads). With cuDNN's long chunks on, their first plans
        too (`cudnn_attention.warm_up`). Seconds taken."""
        t = time.perf_counter()
        cfg, tp = self.model_config, self.ctx.tp_size
        if self.scheduler.alignment()[0]:
            cudnn_attention.warm_up(cfg.num_heads // tp, max(1, cfg.num_kv_heads // tp), cfg.head_dim, self.dtype,
                                    self.device)
        budget, vocab = self.ecfg.max_num_batched_tokens, self.model_config.vocab_size
        length = max(1, min(1024, budget, self.max_model_len - 5))  # (the cache holds max_model_len)
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        for i in range(max(2, min(64, -(-budget // length)))):
            self.add_request([(7919 * i + j) % (vocab - 1) + 1 for j in range(length)], params)
        while self.has_work():
            self.step()
        self.scheduler.allocator.clear_prefix_cache()
        self.scheduler.allocator.reset_counters()
        self.num_requests = 0
        return round(time.perf_counter() - t, 2)

    def tokenize(self, prompt: str | list[int], name: str, keep: int | None = None) -> list[int]:
        """The prompt's token ids, checked; `name`: how messages call it ("prompt 3"); `keep`:
        `truncate_prompt_tokens` (before the length check)."""
        if isinstance(prompt, str):
            if not prompt:
                raise UserError(f"{name} is empty")
            if self.tokenizer is None:
                raise UserError("this model has no tokenizer: pass prompts as token ids")
            check_text(name, prompt)
            ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        elif isinstance(prompt, (list, tuple)) and all(type(t) is int for t in prompt):
            ids = list(prompt)  # (plain ints: the ABC check below took 0.5 s for 1000 x 1024 tokens on 2 cores)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                                       for t in prompt):
            ids = [int(t) for t in prompt]
        else:
            raise UserError(f"{name} must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise UserError(f"{name} is empty")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:  # (one pass each in C; the offender found only then)
            bad = [t for t in ids if not 0 <= t < vocab]
            raise UserError(f"{name}: token id {bad[0]} is outside the vocabulary (size {vocab})")
        ids = truncate_prompt(ids, keep, self.max_model_len)
        if len(ids) >= self.max_model_len:
            raise UserError(f"{name} has {len(ids)} tokens; the max model length is "
                            f"{self.max_model_len} (prompt + at least one generated token)")
        return ids

    def make_request(self, prompt: str | list[int], params: SamplingParams | None, index: int,
                     named: bool = True) -> Sequence:
        """Validates and tokenizes; raises `UserError` before anything is queued. Its messages name
        the request by `index` ("request 3: ...", "prompt 3 is empty"), or with `named` False not
        (the server's: its client knows which request it sent)."""
        params = (params or SamplingParams()).resolved(self.defaults)
        lead = f"request {index}: " if named else ""
        if params.stop and self.tokenizer is None:  # (they would never match: no text is made)
            raise UserError(f"{lead}stop strings need a tokenizer, and this model has none; "
                            "use stop_token_ids")
        vocab = self.model_config.vocab_size  # (a stop that could never match, a bias on no token)
        for what, ids in (("stop token id", params.stop_token_ids or ()),
                          ("logit_bias token id", params.logit_bias or {}),
                          ("allowed token id", params.allowed_token_ids or ())):
            if (t := next((t for t in ids if t >= vocab), None)) is not None:
                raise UserError(f"{lead}{what} {t} is outside the vocabulary (size {vocab})")
        restrict.check_request(params, lead, self.tokenizer, self.end_ids(params))
        if params.bad_words and self.tokenizer is None:
            raise UserError(f"{lead}bad_words need a tokenizer, and this model has none")
        try:
            guide = restrict.json_guide(params)  # (a schema compiles here: a bad one is refused before queueing)
        except UserError as exc:
            raise UserError(f"{lead}{exc}") from None
        ids = self.tokenize(prompt, f"prompt {index}" if named else "the prompt", params.truncate_prompt_tokens)
        seq = Sequence(index, ids, params, min(len(ids) + params.max_tokens, self.max_model_len), guide=guide,
                       bad_ids=bad_word_ids(self.tokenizer, params.bad_words, vocab) if params.bad_words else [])
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return seq

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None) -> Sequence:
        seq = self.make_request(prompt, params, self.num_requests)
        self.submit(seq)
        return seq

    def submit(self, seq: Sequence) -> None:
        self.num_requests += 1
        self.scheduler.add(seq)

    def plan_step(self) -> tuple[list[ScheduledSeq], StepPlan]:
        """Schedules one step and describes it for the runner (and the TP peers). With async
        scheduling a decoding sequence's input may be the token its last step sampled, still on
        the device (`PENDING`, with its row in that step's sampled tokens)."""
        scheduled = self.scheduler.schedule()
        if not scheduled and self.inflight:  # only in-flight tokens left: learn them first
            self.resolve(0)
            scheduled = self.scheduler.schedule()
        if not scheduled and self.scheduler.has_work() and not self.scheduler.running:
            raise RuntimeError("scheduler has requests but planned nothing")  # invariant
        items, restores = [], []
        layout = self.runner.layout
        for item in scheduled:
            seq, start = item.seq, item.seq.num_computed
            if seq.restore >= 0:  # its first chunk: the state of its reused prefix first
                restores.append((layout.snapshot_row(seq.restore), seq.state_slot))
                seq.restore = -1
            if seq.pending:
                items.append(SeqWork([PENDING], start, seq.state_slot, item.samples, prev_row=seq.pending_row))
            else:
                captures = [(blocks * layout.block_size - start, layout.snapshot_row(index))
                            for blocks, index in seq.capturing if index is not None]
                items.append(SeqWork(seq.token_slice(start, start + item.num_new), start, seq.state_slot,
                                     item.samples, None if seq.blocks_sent else list(seq.block_ids),
                                     captures=captures))
                seq.blocks_sent = True
                if start + 1 < len(seq.prompt_ids) and seq.params.prompt_logprobs is not None:
                    items[-1].targets = seq.prompt_ids[start + 1:start + item.num_new + 1]
                    items[-1].top = seq.params.prompt_logprobs
        if not items:  # nothing runs (the caller may drop this plan): resets and snapshots wait for one that does
            return scheduled, StepPlan([], [], self.has_work(), self.last_sampled)
        snapshots = [(slot, layout.snapshot_row(i)) for slot, i in self.scheduler.snapshots]
        plan = StepPlan(items, self.pending_resets, self.has_work(), self.last_sampled, snapshots, restores)
        self.pending_resets, self.scheduler.snapshots = [], []
        return scheduled, plan

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.inflight)

    def launch(self, scheduled: list[ScheduledSeq], logits: torch.Tensor) -> None:
        """After the forward: samples on the device and starts the tokens' copy to the host; the
        tokens are applied by `resolve`. The sampled tokens also feed the next step's inputs."""
        sampled = [item.seq for item in scheduled if item.samples]
        if any(s.pending and (restrict.guided_request(s.params) or needs_history(s.bad_ids)) for s in sampled):
            self.resolve(0)  # a guided answer (a longer bad word) continues from its previous token: the host needs it
        for i, records in self.runner.take_prompt_logprobs():
            seq = scheduled[i].seq
            seq.prompt_logprobs = seq.prompt_logprobs or [None] * len(seq.prompt_ids)
            seq.prompt_logprobs[seq.num_computed + 1:seq.num_computed + 1 + len(records)] = records
        for item in scheduled:
            item.seq.num_computed += item.num_new
            self.scheduler.computed(item.seq)
        with self.part_scope("sampling"):
            bad = nonfinite_rows(logits)  # such a row fails its request alone (in `resolve`)
            rows = self._allowed(sampled)
            logits = penalize(bias(allow(hold(logits, sampled, self.end_ids), rows), sampled), sampled,
                              self.runner.prev_tokens)
            flags = bad.to(torch.int64)
            if rows:  # every token masked off (a guide or allowed ids, min_tokens, bad words): fails alone too
                none_left = torch.isneginf(logits).all(-1)
                flags, bad = flags + 2 * none_left, bad | none_left
            tokens = sample_tokens(logits, [s.params for s in sampled], [s.generator for s in sampled], bad_S=bad)
        for row, seq in enumerate(sampled):
            seq.pending += 1
            seq.pending_row = row
            seq.final = self._length_reached(seq, len(seq.output_ids) + seq.pending)
        self.runner.prev_tokens = tokens
        self.last_sampled = len(sampled)
        event = None
        packed = torch.stack((tokens, flags.to(tokens.dtype)))  # [2, S]: one copy to the host
        if packed.is_cuda:
            host = packed.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = packed
        self.inflight.append((sampled, host, event))

    def end_ids(self, params: SamplingParams) -> set[int]:
        """The ids that end a request by stopping it."""
        return set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)

    def _allowed(self, sampled: list[Sequence]) -> list[tuple[int, object]]:
        """`restrict.allowed_rows`; a request that no token can continue fails (its own constraints:
        a 400 from the server), one whose guided answer is complete stops."""
        rows, dead, complete = restrict.allowed_rows(sampled, self.tokenizer, self.model_config.vocab_size,
                                                     self.end_ids)
        for seq, why in dead:
            self._fail(seq, why, status=400)
        for seq in complete:
            seq.finish_reason = "stop"
            self.scheduler.finish(seq)
            self.pending_resets.append(seq.state_slot)
        return rows

    def resolve(self, keep: int) -> list[Sequence]:
        """Applies the tokens of all but the newest `keep` launched steps: appends them, applies
        stop rules; returns the sequences that finished. A sequence that finished has no more
        tokens: one it was sampled in a later, already launched step is dropped."""
        finished = []
        while len(self.inflight) > keep:
            sampled, host, event = self.inflight.popleft()
            if event is not None:
                event.synchronize()
            tokens, bad = host.tolist()
            for seq, token, is_bad in zip(sampled, tokens, bad, strict=True):
                seq.pending -= 1
                if seq.finish_reason is not None:
                    continue
                if is_bad & 1:
                    seq.nan_logits = True
                    self._fail(seq, "the model produced non-finite logits (NaN or Inf) for this request "
                                    f"at output token {len(seq.output_ids)}; its sampling stopped")
                if is_bad == 2:
                    self._fail(seq, f"no token may come at output token {len(seq.output_ids)}: its restrictions "
                                    "(allowed ids or guide, min_tokens, bad words) leave none", status=400)
                if is_bad:
                    finished.append(seq)
                    continue
                seq.output_ids.append(token)
                if self._check_stop(seq, token):
                    self.scheduler.finish(seq)
                    self.pending_resets.append(seq.state_slot)
                    finished.append(seq)
        return finished

    def apply(self, scheduled: list[ScheduledSeq], logits: torch.Tensor) -> list[Sequence]:
        """Samples, appends tokens, applies stop rules; returns the sequences that finished."""
        self.launch(scheduled, logits)
        return self.resolve(1 if self.ecfg.async_scheduling else 0)

    def step(self) -> list[Sequence]:
        """Single-process step: one forward; returns the sequences that finished in it (with
        async scheduling, in the next one: the host plans step n+1 while the device runs n)."""
        scheduled, plan = self.plan_step()
        if not scheduled:
            return self.resolve(0)
        return self.apply(scheduled, self.runner.execute(plan))

    def abandon(self, seqs: list[Sequence]) -> None:
        """After an exception inside a step (or an interrupt) ends the caller's loop: these requests
        end ("abort"), their blocks and state slots are freed, launched steps and every state
        snapshot are forgotten, so the next call starts clean instead of waiting on a step that never
        finishes or restoring a snapshot that was never written."""
        self.inflight.clear()
        self.last_sampled = 0
        # the failed step's snapshot copies and captures may not have run, yet their rows are taken
        self.scheduler.allocator.forget_snapshots()
        for seq in seqs:
            seq.pending = 0
            seq.capturing = []
            if seq in self.scheduler.running:
                self.scheduler.finish(seq)
                self.pending_resets.append(seq.state_slot)
            elif seq in self.scheduler.waiting:
                self.scheduler.waiting.remove(seq)
            if seq.finish_reason is None:
                seq.finish_reason = "abort"

    def _fail(self, seq: Sequence, message: str, status: int = 500) -> None:
        """Ends one request with an error; the others in the step go on."""
        seq.finish_reason, seq.error, seq.error_status = "error", message, status
        self.scheduler.finish(seq)
        self.pending_resets.append(seq.state_slot)

    @staticmethod
    def _length_reached(seq: Sequence, generated: int) -> bool:
        """`generated` output tokens end the request by length (max tokens or model length)."""
        return generated >= seq.params.max_tokens or len(seq.prompt_ids) + generated >= seq.max_total_len

    def _check_stop(self, seq: Sequence, token: int) -> bool:
        p = seq.params
        if len(seq.output_ids) <= p.min_tokens:  # (up to min_tokens only the length ends it, as in vLLM)
            pass
        elif token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
            seq.finish_reason = "stop"  # (the token is in the ids; its text is not, unless asked for: vLLM's)
            if not p.include_stop_str_in_output and self.tokenizer is not None:
                seq.stop_text_end = text_before_last(self.tokenizer, seq.output_ids, p.skip_special_tokens)
        elif p.stop and self.tokenizer is not None:
            seq.stop_search = seq.stop_search or StopSearch(self.tokenizer, p.stop, seq.output_ids[:p.min_tokens],
                                                         p.skip_special_tokens)
            if seq.stop_search.found(seq.output_ids):  # a window of ids a token; the whole text once for a match
                seq.stop_text_end = first_match(self._decode(seq), p.stop, seq.stop_search.held_chars,
                                                p.include_stop_str_in_output)
                if seq.stop_text_end is not None:
                    seq.finish_reason = "stop"
        if seq.finish_reason is None and self._length_reached(seq, len(seq.output_ids)):
            seq.finish_reason = "length"
        return seq.finish_reason is not None

    def _decode(self, seq: Sequence) -> str:
        """The request's text so far; a tokenizer that can't decode its tokens fails this request
        alone (its text is empty), never the step."""
        try:
            return self.tokenizer.decode(seq.output_ids, skip_special_tokens=seq.params.skip_special_tokens)
        except Exception as exc:  # tokenizers raise many kinds; the request is what failed
            if seq.finish_reason != "error":
                seq.finish_reason, seq.error = "error", f"detokenisation failed: {type(exc).__name__}: {exc}"
            return ""

    def output(self, seq: Sequence) -> RequestOutput:
        text = None
        if self.tokenizer is not None:
            text = self._decode(seq)
            if seq.stop_text_end is not None:
                text = text[:seq.stop_text_end]
        return RequestOutput(seq.prompt_ids, list(seq.output_ids), text, seq.finish_reason or "",
                             seq.nan_logits, seq.error, seq.prompt_logprobs_out)
