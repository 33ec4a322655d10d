"""One request's answer, whole or streamed, for its choices: `n` for each of its prompts (a
completions request may hold several), one engine request each, indexed prompt by prompt.

A handler watches its connection: when the client goes away every choice is cancelled in the
engine (its cache slots are freed). Engine failures reach the client as an error: a 500 body, or,
once a stream has started, an SSE `data: {"error": ...}` event (the `openai` client raises it) —
never a connection left waiting. An error in one choice ends the whole answer (the others are
cancelled). A stream's chunks carry each choice's `index`; with one choice the updates are read
straight from its queue, with several each choice's queue is forwarded into one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from epinfer.diagnostics.watchdog import log_line
from epinfer.server import reasoning
from epinfer.server.bodies import choice, response, usage
from epinfer.server.client import EngineClient, RequestState, Update, merged
from epinfer.server.protocol import ModelInfo, error_body
from epinfer.server.text import (
    TextStream,
    chat_logprobs,
    completion_logprobs,
    echoed_logprobs,
    joined_logprobs,
    prompt_logprobs,
)
from epinfer.server.tools import OPEN, any_call, held_back, parse_calls


def _dumps(value) -> str:
    """JSON as Starlette's JSONResponse writes it."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


DISCONNECTED = Update([], finish_reason="cancelled", error="client disconnected")


class Choice:
    """One choice's text and tokens as its updates arrive."""

    def __init__(self, index: int, state: RequestState, tokenizer) -> None:
        self.index, self.state, self.tokenizer = index, state, tokenizer
        self.text = TextStream(tokenizer, state.req.params.stop, state.req.params.skip_special_tokens)
        self.token_ids: list[int] = []
        self.records: list[tuple] = []  # logprob records, for a whole answer
        self.token_offset = 0  # completions' logprobs: the text offset of the next token (its tokens' lengths)
        self.finish: str | None = None
        self.prompt_records: list | None = None  # the prompt's logprobs, when asked for
        self.echo = ""  # an echoed prompt's text (completions with `echo`)
        self.said = ""  # tool calls looked for (`tools`): the text so far, and how much of it went out
        self.said_sent = 0
        self.call_id = f"call_{uuid.uuid4().hex[:24]}"  # a named function's call, and whether its id went out
        self.call_sent = False
        open_ = state.req.think_open
        self.thinking = None if open_ is None else reasoning.ReasoningStream(open_)  # reasoning split off
        if state.req.echo and tokenizer is not None:
            self.echo = tokenizer.decode(state.req.prompt_ids, skip_special_tokens=False)

    def logprobs(self, ids: list[int], records: list[tuple] | None, offset: int) -> dict | None:
        if self.state.req.logprobs is None or records is None:
            return None
        if self.state.req.chat:
            return chat_logprobs(self.tokenizer, ids, records)
        return completion_logprobs(self.tokenizer, ids, records, offset)

    def add(self, update: Update) -> None:
        self.text.add(update.token_ids)
        self.token_ids += update.token_ids
        self.finish = update.finish_reason
        if update.prompt_logprobs is not None:
            self.prompt_records = update.prompt_logprobs

    def delta(self, update: Update) -> dict | None:
        """The stream chunk's choice for `update` (after `add`), or None when it says nothing yet."""
        final = update.finish_reason is not None
        if self.state.req.no_output:  # echo with max_tokens 0: only the end
            return {**choice(False, "", update.finish_reason, None, [], delta=True), "index": self.index} \
                if final else None
        delta = self.text.delta(final, update.stop_text_end)
        if self.state.req.forced_tool == "":  # "required": the answer is one call, sent whole at the end
            return self.any_call_delta(update, delta)
        if self.state.req.forced_tool is not None:  # the answer is the named call's arguments
            return self.forced_delta(update, delta)
        calls, thought = None, None
        if self.thinking is not None:
            thought, delta = self.thinking.add(delta, final)
        if self.state.req.tool_calls:
            delta, calls = self.tool_delta(delta, final)
        lp = self.logprobs(update.token_ids, update.logprobs, self.token_offset)
        if lp is not None and not self.state.req.chat and lp["tokens"]:
            self.token_offset = lp["text_offset"][-1] + len(lp["tokens"][-1])
        if not (delta or thought or lp or final or update.token_ids):
            return None
        reason = "tool_calls" if calls else update.finish_reason
        return {**choice(self.state.req.chat, delta, reason, lp, update.token_ids, delta=True, tool_calls=calls,
                         thought=thought), "index": self.index}

    def forced_delta(self, update: Update, delta: str) -> dict | None:
        """A stream chunk of a named function's call: its id and name first, then its arguments."""
        if not (delta or not self.call_sent or update.finish_reason is not None):
            return None
        call = {"function": {"arguments": delta}} if delta else None
        if not self.call_sent:
            call = {"id": self.call_id, "type": "function", "function": {"name": self.state.req.forced_tool,
                                                                         "arguments": delta}}
            self.call_sent = True
        lp = self.logprobs(update.token_ids, update.logprobs, 0)
        return {**choice(True, "", update.finish_reason, lp, update.token_ids, delta=True,
                         tool_calls=[call] if call else None), "index": self.index}

    def any_call_delta(self, update: Update, delta: str) -> dict | None:
        """A "required" stream's last chunk: its call (or, cut short, its text); nothing before."""
        self.said += delta
        lp = self.logprobs(update.token_ids, update.logprobs, 0)
        if update.finish_reason is None:
            return {**choice(True, "", None, lp, update.token_ids, delta=True), "index": self.index} if lp else None
        call = any_call(self.said, self.call_id)
        text, reason = ("", "tool_calls") if call else (self.said, update.finish_reason)
        return {**choice(True, text, reason, lp, update.token_ids, delta=True, tool_calls=[call] if call else None),
                "index": self.index}

    def tool_delta(self, delta: str, final: bool) -> tuple[str, list[dict] | None]:
        """The text a stream may send now, held back from a tool call's start; at the end the rest,
        and the calls when the whole text holds them (`tools.parse_calls`)."""
        self.said += delta
        if not final:
            upto = max(self.said_sent, held_back(self.said))
            out, self.said_sent = self.said[self.said_sent:upto], upto
            return out, None
        parsed = parse_calls(self.said)
        end = self.said.index(OPEN) if parsed else len(self.said)
        return self.said[self.said_sent:end], parsed[1] if parsed else None

    def whole(self, stop_text_end: int | None) -> dict:
        req = self.state.req
        text, ids, records = self.text.full_text(stop_text_end), self.token_ids, self.records
        if req.no_output:  # echo with max_tokens 0: the one token the engine sampled is not shown
            text, ids, records = "", [], []
        head = echoed_logprobs(self.tokenizer, req.prompt_ids, self.prompt_records, req.logprobs) \
            if req.echo and req.logprobs is not None else None  # (the echoed prompt's tokens first)
        lp = self.logprobs(ids, records, head["text_offset"][-1] + len(head["tokens"][-1]) if head else 0)
        if head is not None:
            lp = joined_logprobs(head, lp)
        call = any_call(text, self.call_id) if req.forced_tool == "" else None  # ("required": one call)
        if call is not None:
            return {**choice(True, None, "tool_calls", lp, ids, tool_calls=[call]), "index": self.index}
        if req.forced_tool:  # the answer is the named call's arguments
            call = {"id": self.call_id, "type": "function", "function": {"name": req.forced_tool, "arguments": text}}
            return {**choice(True, None, self.finish, lp, ids, tool_calls=[call]), "index": self.index}
        thought, content = (None, text) if req.think_open is None else reasoning.split(text, req.think_open)
        parsed = parse_calls(content or "") if req.tool_calls else None
        if parsed:
            out = choice(True, parsed[0], "tool_calls", lp, ids, tool_calls=parsed[1], thought=thought)
        elif req.think_open is not None:
            out = choice(True, content, self.finish, lp, ids, thought=thought)
        else:
            out = choice(req.chat, self.echo + text, self.finish, lp, ids)
        out["index"] = self.index
        if req.prompt_logprobs is not None and not req.chat:
            out["prompt_logprobs"] = self.prompt_json()
        return out

    def prompt_json(self) -> list:
        req = self.state.req
        return prompt_logprobs(self.tokenizer, req.prompt_ids, self.prompt_records, req.prompt_logprobs)


class Reply:
    def __init__(self, client: EngineClient, tokenizer, info: ModelInfo, states: list[RequestState],
                 request: Request) -> None:
        self.client, self.info, self.states, self.request = client, info, states, request
        self.chat = states[0].req.chat
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.choices = [Choice(i, state, tokenizer) for i, state in enumerate(states)]
        # where a disconnect is told: the one choice's queue, or the queue every choice is forwarded to
        self.shared: asyncio.Queue | None = asyncio.Queue() if len(states) > 1 else None

    async def watch_disconnect(self) -> None:
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                if self.shared is None:
                    self.states[0].queue.put_nowait(DISCONNECTED)
                else:
                    self.shared.put_nowait((None, DISCONNECTED))
                return

    def body(self, choices: list[dict], usage_: dict | None, chunk: bool) -> dict:
        return response(self.chat, self.id, self.created, self.info.name, choices, usage_, chunk)

    def usage(self) -> dict:
        n = self.states[0].req.n  # (each prompt's n choices in a row: its prompt counted once)
        return usage(sum(len(s.req.prompt_ids) for s in self.states[::n]),
                     sum(0 if c.state.req.no_output else len(c.token_ids) for c in self.choices))

    def cancel(self) -> None:
        for state in self.states:
            self.client.cancel(state)  # a no-op once the request finished

    async def updates(self):
        """(choice, update) pairs until every choice has its final update, an error, or a disconnect
        (`DISCONNECTED`); queued updates of one choice merged into one."""
        shared = self.shared
        if shared is None:
            only, held = self.choices[0], None
            while True:
                update, held = merged(held or await only.state.queue.get(), only.state.queue)
                yield only, update
                if update is DISCONNECTED or update.error is not None or update.finish_reason is not None:
                    return

        async def forward(c: Choice) -> None:
            held = None
            while True:
                update, held = merged(held or await c.state.queue.get(), c.state.queue)
                shared.put_nowait((c, update))
                if update.error is not None or update.finish_reason is not None:
                    return

        tasks = [asyncio.create_task(forward(c)) for c in self.choices]
        left = len(self.choices)
        try:
            while left:
                c, update = await shared.get()
                yield c, update
                if update is DISCONNECTED or update.error is not None:
                    return
                left -= update.finish_reason is not None
        finally:
            for task in tasks:
                task.cancel()

    def failure(self, update: Update) -> dict:
        kind = "invalid_request_error" if update.status == 400 else "server_error"
        return error_body(update.error, kind, code="engine_error")

    async def whole(self):
        watcher = asyncio.create_task(self.watch_disconnect())
        ends: dict[int, int | None] = {}
        try:
            async with contextlib.aclosing(self.updates()) as updates:  # (its forwarders end with it)
                async for c, update in updates:
                    if update is DISCONNECTED:
                        return JSONResponse(error_body("client disconnected", "cancelled"), status_code=499)
                    if update.error is not None:
                        return JSONResponse(self.failure(update), status_code=update.status)
                    c.add(update)
                    c.records += update.logprobs or []
                    if update.finish_reason is not None:
                        ends[c.index] = update.stop_text_end
        finally:
            watcher.cancel()
            self.cancel()
        req = self.states[0].req

        def build() -> bytes:
            # each choice encoded on its own: json's encoder holds the GIL for a whole call
            choices = "[" + ",".join(_dumps(c.whole(ends.get(c.index))) for c in self.choices) + "]"
            body = self.body([], self.usage(), chunk=False)
            if self.chat and req.prompt_logprobs is not None:  # (vLLM's place for a chat's)
                body["prompt_logprobs"] = self.choices[0].prompt_json()
            return _dumps(body).replace('"choices":[]', '"choices":' + choices, 1).encode()

        try:  # with logprobs (n choices of echoed prompts: up to hundreds of MB) in a thread, which
            # leaves the event loop its turns: the other requests and /health are answered meanwhile
            heavy = req.logprobs is not None or req.prompt_logprobs is not None
            content = await asyncio.to_thread(build) if heavy else build()
        except Exception as exc:  # this request's text can't be made: it fails, nothing else does
            return JSONResponse(self.text_failure(exc), status_code=500)
        return Response(content, media_type="application/json")

    def text_failure(self, exc: Exception) -> dict:
        log_line(f"epinfer: error: request {self.id}: detokenisation failed: {type(exc).__name__}: {exc}")
        return error_body(f"detokenisation failed: {type(exc).__name__}", "server_error", code="engine_error")

    def sse(self, choices: list[dict], usage_: dict | None = None) -> str:
        return f"data: {json.dumps(self.body(choices, usage_, chunk=True))}\n\n"

    async def events(self):
        watcher = asyncio.create_task(self.watch_disconnect())
        try:
            if self.chat:  # the role comes first, as in OpenAI's streams
                for c in self.choices:
                    first = {**choice(True, "", None, None, [], delta=True), "index": c.index}
                    first["delta"] = {"role": "assistant", "content": ""}
                    yield self.sse([first])
            for c in self.choices:  # an echoed prompt first, as vLLM streams it
                if c.echo:
                    yield self.sse([{**choice(False, c.echo, None, None, [], delta=True), "index": c.index}])
            async with contextlib.aclosing(self.updates()) as updates:
                async for c, update in updates:
                    if update is DISCONNECTED:
                        return
                    if update.error is not None:
                        yield f"data: {json.dumps(self.failure(update))}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    c.add(update)
                    try:
                        part = c.delta(update)
                    except Exception as exc:  # this request's text can't be made: it fails (and is cancelled)
                        yield f"data: {json.dumps(self.text_failure(exc))}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    if part is not None:
                        yield self.sse([part])
            if self.states[0].req.include_usage:
                yield self.sse([], self.usage())
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            self.cancel()
