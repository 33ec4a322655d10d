"""The server side of the engine: request streams on the asyncio loop.

`submit` gives a request an id, puts it on rank 0's inbox and returns its `RequestState`, whose
asyncio queue receives `Update`s as the replica's leader reports tokens. One reader thread per
rank outbox hands messages to the loop (`call_soon_threadsafe`); nothing else touches the state
from another thread. `fail` (a rank died) ends every pending request with an error update at
once, so no connection waits for an engine that is gone; `abort_all` does the same at the end of
a shutdown that ran out of time.

Queue limit: a request counts as queued from the end of its body (while it waits for a tokenizer
lane and is checked there) until a replica admits it to its running batch (the leader reports it),
unless a sequence slot is free for it; with `max_queue` queued, new requests get 429, before they
are tokenized (a flood of bodies must not build an unbounded backlog in front of the tokenizer).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import queue
import threading
import time

from epinfer.core.sampling_params import SEED_MAX
from epinfer.server.metrics import Metrics
from epinfer.server.protocol import APIError, GenerateRequest


@dataclasses.dataclass
class Update:
    token_ids: list[int]
    logprobs: list[tuple] | None = None
    finish_reason: str | None = None  # stop | length | cancelled | error
    stop_text_end: int | None = None
    error: str | None = None  # the engine failed, the server stopped, or the request was refused late
    status: int = 500  # the HTTP status of a non-streaming reply that ends with `error`
    prompt_logprobs: list | None = None  # with the first tokens, when asked for (`Sequence.prompt_logprobs`)


def merged(first: Update, queue: asyncio.Queue) -> tuple[Update, Update | None]:
    """`first` and the token updates already queued behind it, up to and including a final one, as
    one update (the HTTP side fell behind the engine: one event instead of several; the text and
    tokens are the same), and an error met on the way, left for the next event (None if none).
    No waiting."""
    update = first
    while update.error is None and update.finish_reason is None and not queue.empty():
        nxt = queue.get_nowait()
        if nxt.error is not None:
            return update, nxt
        logprobs = None if update.logprobs is None and nxt.logprobs is None else \
            (update.logprobs or []) + (nxt.logprobs or [])
        update = Update(update.token_ids + nxt.token_ids, logprobs, nxt.finish_reason, nxt.stop_text_end,
                        prompt_logprobs=update.prompt_logprobs or nxt.prompt_logprobs)
    return update, None


@dataclasses.dataclass(eq=False)
class RequestState:
    rid: int
    req: GenerateRequest
    queue: asyncio.Queue
    arrived: float
    admitted: bool = False
    replica: int | None = None
    first_token_at: float | None = None
    done: bool = False
    cancel_sent: bool = False


class EngineClient:
    def __init__(self, ranks, loop: asyncio.AbstractEventLoop, max_queue: int, dp: int, slots: int) -> None:
        """`slots`: sequence slots of all replicas together (max_num_seqs x dp)."""
        self.ranks, self.loop, self.max_queue, self.slots = ranks, loop, max_queue, slots
        self.requests: dict[int, RequestState] = {}
        self.validating = 0  # requests read whole, waiting for or in a tokenizer lane
        self.ids = itertools.count()
        self.metrics = Metrics(dp)
        self.healthy = True
        self.failure: str | None = None
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()
        self.readers_stop = threading.Event()
        for outbox in ranks.channels.outboxes:
            threading.Thread(target=self._read, args=(outbox,), name="epinfer-outbox", daemon=True).start()

    # --- requests --------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a sequence slot: those not yet admitted (being validated included)
        beyond the slots free (a burst that arrives between two steps finds its slots, not a full
        queue), or those the replicas reported waiting (for cache blocks too), whichever is more."""
        admitted = sum(s.admitted for s in self.requests.values())
        beyond = len(self.requests) + self.validating - admitted - max(self.slots - admitted, 0)
        return max(beyond, sum(s[1] for s in self.metrics.replica_stats), 0)

    def check_accepting(self) -> None:
        if not self.healthy:
            raise APIError(503, f"the engine failed: {self.failure}", "server_error", code="engine_failed")
        if self.draining:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")

    def check_queue(self, count: int = 1) -> None:
        if count > self.max_queue:
            raise APIError(400, f"this request asks for {count} choices (prompts x 'n'), more than the queue holds "
                           f"({self.max_queue}, --max-queue)", param="n")
        if self.queue_depth + count > self.max_queue:
            raise APIError(429, f"the request queue is full ({self.max_queue} requests waiting); retry later",
                           "rate_limit_error", code="queue_full")

    def submit_choices(self, reqs: list[GenerateRequest]) -> list[RequestState]:
        """Each prompt's n choices, each its own engine request (choice i of a prompt seeded with
        seed + i where a seed is given, so the samples differ and repeat), prompt by prompt; all or
        none."""
        if len(reqs) == 1 and reqs[0].n == 1:
            return [self.submit(reqs[0])]
        self.check_queue(sum(req.n for req in reqs))
        states = []
        try:
            for req in reqs:
                seed = req.params.seed
                for i in range(req.n):
                    params = dataclasses.replace(req.params, seed=None if seed is None else (seed + i) % (SEED_MAX + 1))
                    states.append(self.submit(dataclasses.replace(req, params=params), checked=True))
        except BaseException:
            for state in states:
                self.cancel(state)
            raise
        return states

    def submit(self, req: GenerateRequest, checked: bool = False) -> RequestState:
        self.check_accepting()  # again: the state may have changed while the request was validated
        if not checked:
            self.check_queue()
        state = RequestState(next(self.ids), req, asyncio.Queue(), time.monotonic())
        self.requests[state.rid] = state
        self.idle.clear()
        self.metrics.prompt_tokens += len(req.prompt_ids)
        self.ranks.channels.inbox.put(("add", state.rid, req.prompt_ids, req.params, req.logprobs))
        return state

    def cancel(self, state: RequestState) -> None:
        """The client went away: the leader drops the request and frees its cache slots."""
        if not state.done and not state.cancel_sent and self.healthy:
            state.cancel_sent = True
            self.ranks.channels.inbox.put(("cancel", state.rid))

    def _finish(self, state: RequestState, reason: str) -> None:
        state.done = True
        self.requests.pop(state.rid, None)
        self.metrics.finished[reason] += 1
        if reason != "cancelled":
            self.metrics.latency.observe(time.monotonic() - state.arrived)
        if not self.requests:
            self.idle.set()

    def fail(self, message: str) -> None:
        """Every pending request ends now with `message`; /health turns unhealthy."""
        self.healthy, self.failure = False, message
        self.abort_all(message, 500)

    def abort_all(self, message: str, status: int = 503) -> None:
        for state in list(self.requests.values()):
            state.queue.put_nowait(Update([], finish_reason="error", error=message, status=status))
            self._finish(state, "error")

    # --- messages from the ranks -----------------------------------------------------------

    def _read(self, outbox) -> None:
        while not self.readers_stop.is_set():
            try:
                msg = outbox.get(timeout=0.2)
            except queue.Empty:
                continue
            except (EOFError, OSError):  # the rank is gone; the monitor reports why
                return
            try:
                self.loop.call_soon_threadsafe(self._on_message, msg)
            except RuntimeError:  # the loop is closed: the server is exiting
                return

    def _on_message(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "step":
            self._on_step(*msg[1:])
        elif kind == "routed":
            for rid, replica in msg[1]:
                self.metrics.routed[replica] += 1
                if rid in self.requests:
                    self.requests[rid].replica = replica
        elif kind == "skew":
            _, label, group, seq, size, _rank, t0 = msg
            self.metrics.add_skew_sample(label, group, seq, size, t0)

    def _on_step(self, replica: int, events: list[tuple], admitted: list[int], stats: tuple | None,
                 step_s: float) -> None:
        if stats is not None:
            self.metrics.replica_stats[replica] = stats
        if step_s:
            self.metrics.step_time[replica].observe(step_s)
        for rid in admitted:
            if rid in self.requests:
                self.requests[rid].admitted = True
        now = time.monotonic()
        for rid, new_ids, logprobs, reason, extra, prompt in events:
            state = self.requests.get(rid)
            self.metrics.generation_tokens += len(new_ids)
            if state is None:  # already failed / aborted on this side
                continue
            if new_ids and state.first_token_at is None:
                state.first_token_at = now
                self.metrics.ttft.observe(now - state.arrived)
            if reason == "error":  # (status, message): refused by the leader (400) or failed in sampling (500)
                status, message = extra
                state.queue.put_nowait(Update(new_ids, logprobs, reason, error=message, status=status))
            else:
                state.queue.put_nowait(Update(new_ids, logprobs, reason, extra, prompt_logprobs=prompt))
            if reason is not None:
                self._finish(state, reason)

    def health(self) -> tuple[int, dict]:
        if not self.healthy:
            return 503, {"status": "unhealthy", "error": self.failure}
        if self.draining:
            return 503, {"status": "draining", "in_flight": len(self.requests)}
        return 200, {"status": "ok", "in_flight": len(self.requests), "queue_depth": self.queue_depth}

    def render_metrics(self) -> str:
        return self.metrics.render(self.healthy, self.queue_depth, len(self.requests))
