"""The rank side of `epinfer serve`: the lockstep step loop with requests that arrive while it runs.

Channels: the HTTP server (launcher process) puts messages for world rank 0 on `inbox`
(`add`, `cancel`, `stop`); every rank has its own `outboxes[rank]` back to the server (one queue
per rank, so a rank killed while writing can only break its own channel).

Every iteration, on every rank, in this order:
  1. `serve.sync` (world CPU group, all-reduce): each replica's TP leader contributes its
     outstanding tokens (prompt tokens not yet prefilled + tokens still to generate, over its waiting
     and running requests); world rank 0 adds a flag "I have messages".
  2. only if the flag is set, `serve.admit` (world CPU group, broadcast from rank 0): new requests
     with the replica each goes to, cancellations, and the stop flag. Rank 0 routes each new request
     (`routing.Router`: to the replica holding the longest cached prefix of it unless that one is
     much more loaded, else to the one with the fewest outstanding tokens), counting the requests
     it routes in the same message. Leaders submit their requests and drop cancelled ones
     (their KV blocks and state slot are freed and the slot is reset before the next forward).
  3. `runtime.lockstep.lockstep_step`, as in `generate`: the leader plans (`tp.plan`), `dp.sync`
     decides, everybody runs the forward (a dummy batch for an idle replica) or all skip. Leaders
     sample and send each request's new tokens (and logprobs when asked) to the server.
Both new collectives are decided from numbers every rank has (the reduced flag), so every rank
issues the same sequence. When all replicas are idle, rank 0 waits up to `IDLE_WAIT_S` on its inbox
before step 1 (the others wait inside `serve.sync`), so an idle server costs a few collectives a
second; idle iterations tell the watchdog the loop is alive (a skip consumes no step id).
The loop ends on a stop message: leaders cancel what is left, and the joint `dp.sync` "no work
anywhere" stops every rank in the same iteration.

Logprobs (only for requests that ask) are the log-softmax of the raw logits, computed here from
the logits the engine samples from, so the default path does no extra work.
"""

from __future__ import annotations

import dataclasses
import queue
import signal
import time

import torch

from epinfer.core.errors import UserError
from epinfer.distributed.dp_sync import DPCoordinator
from epinfer.distributed.parallel import ParallelContext
from epinfer.engine.engine import Engine
from epinfer.engine.scheduler import ScheduledSeq, Sequence
from epinfer.runtime.job import RankRuntime
from epinfer.runtime.lockstep import lockstep_step
from epinfer.server.routing import Router

IDLE_WAIT_S = 0.2
SKEW_LABEL = "dp.sync"  # ranks arrive at it straight after planning: arrival gaps are real skew
SKEW_EVERY = 8  # sample every 8th dp.sync (same seqs on every rank, so the server can match them)


@dataclasses.dataclass
class ServeChannels:
    """Multiprocessing queues, pickled to the spawned ranks with the job."""

    inbox: object  # server → world rank 0
    outboxes: list  # outboxes[rank]: rank → server


def outstanding_tokens(seq: Sequence) -> int:
    prompt_left = max(0, len(seq.prompt_ids) - seq.num_computed)
    return prompt_left + max(0, seq.max_total_len - seq.num_tokens)


class SkewProbe:
    """Communicator plugin: sends the ledger's arrival time of every SKEW_EVERY-th `dp.sync`."""

    def __init__(self, outbox, rank: int) -> None:
        self.outbox, self.rank = outbox, rank

    def before(self, call) -> None:
        pass

    def after(self, call) -> None:
        entry = getattr(call, "entry", None)  # set by the ledger, which runs first
        if call.label == SKEW_LABEL and entry is not None and entry["seq"] % SKEW_EVERY == 0:
            self.outbox.put(("skew", call.label, call.group.name, entry["seq"], call.group.size, self.rank,
                             entry["t0"]))


class ServeLoop:
    def __init__(self, engine: Engine, ctx: ParallelContext, channels: ServeChannels, watchdog=None) -> None:
        self.engine, self.ctx, self.watchdog = engine, ctx, watchdog
        self.rank = ctx.groups.world_rank
        self.dp = ctx.dp_size
        self.leader = ctx.tp_rank == 0
        self.inbox = channels.inbox if self.rank == 0 else None
        self.outbox = channels.outboxes[self.rank]
        self.seqs: dict[int, Sequence] = {}  # leader: this replica's requests by id
        self.logprobs: dict[int, int] = {}  # request id -> top-N (0: only the chosen token)
        self.sent: dict[int, int] = {}  # request id -> tokens already sent to the server
        self.lp_pending: dict[int, list] = {}  # request id -> logprob records not yet sent
        self.unadmitted: set[int] = set()
        self.pending_events: list[tuple] = []  # cancellations, rejections: sent with the next report
        self.stopping = False
        self.last_stats = None
        alloc = engine.scheduler.allocator  # (every replica runs the same model and cache settings)
        self.router = Router(self.dp, alloc.layout.block_size, alloc.layout.num_blocks if alloc.prefix_caching else 0)
        # ranks wait inside serve.sync while rank 0 waits on its inbox: well under the timeout
        self.idle_wait = min(IDLE_WAIT_S, watchdog.timeout / 4) if watchdog is not None else IDLE_WAIT_S
        ctx.comm.add_plugin(SkewProbe(self.outbox, self.rank))
        # the server process owns the lifecycle (drain, then a joint stop): a Ctrl-C or a SIGTERM
        # sent to the whole process group must not kill ranks under requests in flight. Ranks
        # still stop on their own if the server dies: the watchdog loses the rendezvous store.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        ctx, engine = self.ctx, self.engine
        coord = DPCoordinator(ctx)
        idle, first = True, True
        while True:
            ctx.comm.step = coord.step_id
            self.admit(block=idle)
            if first and self.rank == 0:  # every rank has reached the loop: the model is loaded
                self.outbox.put(("ready", self.engine_info()))
            first = False
            t0 = time.perf_counter()
            decision = lockstep_step(engine, ctx, coord, keep_alive=not self.stopping, apply=self.apply)
            events = self.collect() if self.leader else []
            if decision.done:
                self.report(events, 0.0)
                break
            if not decision.run:  # everybody idle: all skip; not a stuck step
                idle = True
                if self.watchdog is not None:
                    self.watchdog.idle_tick()
                self.report(events, 0.0)
                continue
            idle = False
            if self.leader:
                self.report(events, time.perf_counter() - t0)
        self.report([], 0.0)  # the cancellations of a stop

    def admit(self, block: bool) -> None:
        """Steps 1 and 2 of the module docstring."""
        ctx, dp = self.ctx, self.dp
        messages = self.read_inbox(block) if self.rank == 0 else []
        vec = torch.zeros(dp + 1, dtype=torch.int64)
        if self.leader:
            vec[ctx.dp_rank] = sum(outstanding_tokens(s) for s in self.seqs.values())
        vec[dp] = int(bool(messages))
        ctx.comm.all_reduce_cpu(vec, ctx.groups.world_cpu, "serve.sync")
        values = vec.tolist()
        if not values[dp]:
            return
        payload = self.make_admission(messages, values[:dp]) if self.rank == 0 else None
        payload = ctx.comm.broadcast_object(payload, 0, ctx.groups.world_cpu, "serve.admit")
        assigned, cancels, stop = payload
        if self.leader:
            for replica, rid, ids, params, logprobs in assigned:
                if replica == ctx.dp_rank:
                    self.submit(rid, ids, params, logprobs)
            for rid in cancels:
                self.cancel(rid, "cancelled")
            if stop:
                for rid in list(self.seqs):
                    self.cancel(rid, "cancelled")
        self.stopping = self.stopping or stop

    def read_inbox(self, block: bool) -> list[tuple]:
        messages = []
        if block:
            try:
                messages.append(self.inbox.get(timeout=self.idle_wait))
            except queue.Empty:
                return []
        while True:
            try:
                messages.append(self.inbox.get_nowait())
            except queue.Empty:
                return messages

    def make_admission(self, messages: list[tuple], outstanding: list[int]) -> tuple:
        adds = [m[1:] for m in messages if m[0] == "add"]
        cancels = [m[1] for m in messages if m[0] == "cancel"]
        stop = any(m[0] == "stop" for m in messages)
        replicas = self.router.route(outstanding, adds)
        if adds:
            self.outbox.put(("routed", [(a[0], r) for a, r in zip(adds, replicas, strict=True)]))
        return [(r, *a) for a, r in zip(adds, replicas, strict=True)], cancels, stop

    # --- the leader's bookkeeping ----------------------------------------------------------

    def submit(self, rid: int, ids: list[int], params, logprobs: int | None) -> None:
        try:
            seq = self.engine.make_request(ids, params, rid, named=False)
        except UserError as exc:  # the server validated it already; never let it stop the loop
            self.pending_events.append((rid, [], None, "error", (400, str(exc)), None))
            return
        self.engine.submit(seq)
        self.seqs[rid] = seq
        self.sent[rid] = 0
        self.unadmitted.add(rid)
        if logprobs is not None:
            self.logprobs[rid] = logprobs

    def cancel(self, rid: int, reason: str) -> None:
        seq = self.seqs.pop(rid, None)
        if seq is None:  # finished in the meantime, or another replica's
            return
        sched = self.engine.scheduler
        if seq in sched.waiting:
            sched.waiting.remove(seq)
        elif seq in sched.running:
            seq.finish_reason = "abort"  # a token still in flight (async scheduling) is dropped
            sched.finish(seq)  # frees its KV blocks and state slot
            self.engine.pending_resets.append(seq.state_slot)  # zeroed before the next forward
        self.forget(rid)
        self.pending_events.append((rid, [], None, reason, None, None))

    def forget(self, rid: int) -> None:
        self.sent.pop(rid, None)
        self.logprobs.pop(rid, None)
        self.lp_pending.pop(rid, None)
        self.unadmitted.discard(rid)

    def apply(self, scheduled: list[ScheduledSeq], logits: torch.Tensor) -> None:
        """Samples through the engine and resolves tokens: with async scheduling those of the step
        before (this step's stay on the device), except when a request in this step asked for
        logprobs: they need this step's logits, so the step is resolved at once."""
        engine = self.engine
        sampled = [item.seq for item in scheduled if item.samples]
        want = [i for i, s in enumerate(sampled) if s.index in self.logprobs and s.index in self.seqs]
        logprobs_WV = None
        if want:  # [W, V] fp32, only for requests that asked
            logprobs_WV = torch.log_softmax(logits[torch.tensor(want, device=logits.device)].float(), dim=-1)
        before = [len(sampled[i].output_ids) for i in want]
        engine.launch(scheduled, logits)
        engine.resolve(1 if engine.ecfg.async_scheduling and not want else 0)
        for j, (i, n) in enumerate(zip(want, before, strict=True)):
            seq = sampled[i]
            self.lp_pending.setdefault(seq.index, []).extend(
                self.logprob_record(logprobs_WV[j], tok, self.logprobs[seq.index]) for tok in seq.output_ids[n:])

    def collect(self) -> list[tuple]:
        """Each request's tokens learnt since the last report, and the requests that finished (in
        this step, or when in-flight tokens were resolved while planning it)."""
        events = []
        for rid, seq in list(self.seqs.items()):
            new = seq.output_ids[self.sent[rid]:]
            done = seq.finish_reason is not None
            if not new and not done:
                continue
            prompt = seq.prompt_logprobs_out if self.sent[rid] == 0 else None  # (with its first tokens)
            self.sent[rid] = len(seq.output_ids)
            lp = self.lp_pending.pop(rid, None) if rid in self.logprobs else None
            if done:
                extra = (seq.error_status, seq.error) if seq.finish_reason == "error" else seq.stop_text_end
                events.append((rid, new, lp, seq.finish_reason, extra, prompt))
                del self.seqs[rid]
                self.forget(rid)
            else:
                events.append((rid, new, lp, None, None, prompt))
        return events

    @staticmethod
    def logprob_record(logprobs_V: torch.Tensor, token: int, top_n: int) -> tuple:
        chosen = float(logprobs_V[token])
        top = []
        if top_n > 0:
            values, ids = torch.topk(logprobs_V, top_n)
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
        return chosen, top

    def report(self, events: list[tuple], step_s: float) -> None:
        """One message per step and replica: token events, admissions, cache statistics. An event is
        (request id, new token ids, logprobs or None, finish reason or None, where a stop string
        cut the text — or (HTTP status, message) when the reason is "error" —, the prompt logprobs
        with a request's first tokens when it asked for them, else None)."""
        if not self.leader:
            return
        events, self.pending_events = self.pending_events + events, []
        sched = self.engine.scheduler
        admitted = [rid for rid in self.unadmitted if self.seqs[rid] in sched.running]
        self.unadmitted.difference_update(admitted)
        alloc = sched.allocator
        stats = (len(sched.running), len(sched.waiting), len(alloc.free_slots),
                 len(alloc.free_blocks) + len(alloc.evictable), sum(outstanding_tokens(s) for s in self.seqs.values()),
                 alloc.queried_tokens, alloc.hit_tokens, len(alloc.cached), alloc.evictions,
                 len(alloc.snapshots), alloc.snapshot_evictions, alloc.snapshot_captures)
        if events or admitted or stats != self.last_stats or step_s:
            self.outbox.put(("step", self.ctx.dp_rank, events, admitted, stats, step_s))
            self.last_stats = stats

    def engine_info(self) -> dict:
        engine = self.engine
        alloc = engine.scheduler.allocator
        return {"max_model_len": engine.max_model_len, "vocab_size": engine.model_config.vocab_size,
                "eos_ids": sorted(engine.eos_ids), "defaults": engine.defaults, "dp": self.dp,
                "tp": self.ctx.tp_size, "max_num_seqs": engine.scheduler.max_num_seqs,
                "async_scheduling": engine.ecfg.async_scheduling,
                "num_blocks": len(alloc.free_blocks), "block_size": alloc.layout.block_size,
                "kv_tokens": alloc.layout.capacity_tokens}


@dataclasses.dataclass
class ServeMode:
    """The runtime mode of `epinfer serve` (`runtime.job`): the serving loop on every rank."""

    channels: ServeChannels

    def __call__(self, engine: Engine, ctx: ParallelContext, rt: RankRuntime) -> None:
        ServeLoop(engine, ctx, self.channels, rt.watchdog).run()
