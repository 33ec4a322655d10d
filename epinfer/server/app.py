"""The HTTP routes (FastAPI on uvicorn).

  POST /v1/completions, /v1/chat/completions   OpenAI bodies; `stream: true` → server-sent events
  GET  /v1/models[/NAME], /health (503 unless healthy), /metrics (Prometheus text), /version
  POST /tokenize, /detokenize                   as vLLM's: text or chat messages to token ids, and back

Every request is validated before it reaches the engine (`protocol.parse_request`); its answer,
cancellation on disconnect and engine failures are `reply.Reply`'s.

Hostile input: a body over `max_request_bytes` is refused with 413 before it is read whole (from
its Content-Length, else while it streams in); JSON is decoded with NaN / Infinity / overflowing
numbers and deep nesting refused; decoding, validation and tokenization run in worker threads,
so the event loop (and `/health`) keeps answering while a large prompt is tokenized, and bodies
over `LARGE_BODY` have a thread of their own, so a flood of huge prompts delays only its own kind.
A client that disconnects while its body streams in is dropped without a log line. Every 4xx /
5xx, including unknown routes and unexpected exceptions, carries an OpenAI error body.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import hmac
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from epinfer.core.untrusted import one_line
from epinfer.core.version import VERSION
from epinfer.diagnostics.watchdog import log_line
from epinfer.server.client import EngineClient
from epinfer.server.json_body import decode_json
from epinfer.server.protocol import (
    APIError,
    ModelInfo,
    check_model,
    error_body,
    parse_detokenize,
    parse_request,
    parse_tokenize,
)
from epinfer.server.reply import Reply

LARGE_BODY = 64 << 10  # bytes: a body over this is tokenized in the large prompts' lane
BODY_DEADLINE_S = 120.0  # a request's whole body must arrive within this once its head has
BODY_BYTES_AT_ONCE = 1 << 30  # bodies being read, all connections together, hold at most this
UNREAD_BODY = ("request_timeout", "request_too_large", "server_busy")  # errors that leave a body unread


class BodyBudget:
    """The bytes of request bodies being read at once: many slow bodies, each under the size limit
    and its deadline, would otherwise hold memory without bound. A body that would pass the budget
    gets 429 (the client retries later), as a full queue does."""

    def __init__(self, limit: int = BODY_BYTES_AT_ONCE) -> None:
        self.limit, self.held = limit, 0

    def take(self, size: int) -> None:
        if self.held + size > self.limit:
            raise APIError(429, "the server is reading too many request bodies at once; retry later",
                           code="server_busy")
        self.held += size


async def read_body(request: Request, limit: int, deadline_s: float = BODY_DEADLINE_S,
                    budget: BodyBudget | None = None) -> bytes:
    """The body, refused with 413 once it exceeds `limit` bytes. Nothing past the limit is kept;
    the rest is read and dropped (up to 8 × the limit) so that a client that sends its whole body
    before reading the answer gets the 413 rather than a reset connection. A body still incomplete
    after `deadline_s` is a 408: a client that trickles it would otherwise hold its connection
    (and its buffered bytes) for ever. The bytes kept count in `budget` while it is read."""
    try:
        async with asyncio.timeout(deadline_s):
            return await _read_body(request, limit, budget or BodyBudget())
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {deadline_s:g} s",
                       code="request_timeout") from None


async def _read_body(request: Request, limit: int, budget: BodyBudget) -> bytes:
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"the request body exceeds {limit} bytes; this server accepts at most {limit} "
                       "(--max-request-bytes)", code="request_too_large")
    drain = 8 * limit
    if declared is not None and declared.isdigit() and int(declared) > limit + drain:
        raise too_big  # not worth reading: the connection closes after the answer
    chunks, size, kept = [], 0, 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                budget.take(len(chunk))
                kept += len(chunk)
                chunks.append(chunk)
            elif size > limit + drain:
                break
    finally:
        budget.held -= kept  # (read, refused or timed out: the body's bytes leave the budget)
    if size > limit:
        raise too_big
    return b"".join(chunks)


def failure_response(exc: APIError | ClientDisconnect) -> JSONResponse:
    """A refused request's answer: its error, with the connection closed where its body was not
    read to its end (too large, too slow, over the budget); 499 for a client gone before its body
    arrived (nobody to answer, nothing to log)."""
    if isinstance(exc, ClientDisconnect):
        return JSONResponse(error_body("client disconnected", "cancelled"), status_code=499)
    close = {"Connection": "close"} if exc.code in UNREAD_BODY else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=close)


def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log_line(f"epinfer: error: {request.method} {request.url.path}: {type(exc).__name__}: {one_line(exc)}")
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)


def build_app(client: EngineClient, tokenizer, info: ModelInfo, max_request_bytes: int,
              api_key: str | None = None) -> FastAPI:
    """`api_key`: /v1/*, /tokenize and /detokenize answer only requests that carry it
    (`Authorization: Bearer KEY`), others get 401; /health, /metrics and /version stay open."""
    app = FastAPI(title="epinfer", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    key = None if api_key is None else api_key.encode()

    def refused(request: Request) -> JSONResponse | None:
        if key is None:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # (header values arrive as latin-1: back to the client's bytes, a UTF-8 key's included)
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), key):
            return None
        return JSONResponse(error_body("invalid or missing API key: send 'Authorization: Bearer KEY'",
                                       "invalid_request_error", code="invalid_api_key"), status_code=401)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # unknown route, wrong method
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return internal_error(request, exc)

    @app.get("/health")
    async def health():
        status, body = client.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(client.render_metrics(), media_type="text/plain; version=0.0.4")

    model = {"id": info.name, "object": "model", "created": created, "owned_by": "epinfer",
             "max_model_len": info.max_model_len}

    @app.get("/v1/models")
    async def models(request: Request):
        if (denied := refused(request)) is not None:
            return denied
        return {"object": "list", "data": [model]}

    @app.get("/v1/models/{name:path}")
    async def one_model(request: Request, name: str):
        if (denied := refused(request)) is not None:
            return denied
        try:
            check_model({"model": name}, info)  # (as a request's 'model' is)
        except APIError as exc:
            return failure_response(exc)
        return model

    @app.get("/version")
    async def version():
        return {"version": VERSION}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await tool(request, "tokenize", parse_tokenize)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await tool(request, "detokenize", parse_detokenize)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    # two lanes, a thread and a tokenizer each (a tokenizer object is not meant to be shared by
    # threads), none of it on the event loop: bodies over LARGE_BODY bytes queue behind each other,
    # never in front of ordinary requests; the replies decode on the event loop with a third
    lanes = [(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"epinfer-tokenize-{name}"),
              copy.deepcopy(tokenizer)) for name in ("small", "large")]

    bodies = BodyBudget(max(BODY_BYTES_AT_ONCE, 4 * max_request_bytes))

    async def in_lane(raw: bytes, work):
        """`work(tokenizer)` in the tokenizer lane of a body of `raw`'s size."""
        pool, tok = lanes[len(raw) > LARGE_BODY]
        return await asyncio.get_running_loop().run_in_executor(pool, work, tok)

    async def tool(request: Request, endpoint: str, parse) -> JSONResponse:
        """/tokenize and /detokenize: read as a generation request is, and run in its tokenizer lane."""
        status = 200
        try:
            if (denied := refused(request)) is not None:
                status = 401
                return denied
            raw = await read_body(request, max_request_bytes, budget=bodies)
            return JSONResponse(await in_lane(raw, lambda tok: parse(decode_json(raw), tok, info)))
        except (APIError, ClientDisconnect) as exc:
            answer = failure_response(exc)
            status = answer.status_code
            return answer
        finally:
            client.metrics.http[(endpoint, status)] += 1

    async def generate(request: Request, chat: bool):
        endpoint = "chat" if chat else "completions"
        if (denied := refused(request)) is not None:
            client.metrics.http[(endpoint, 401)] += 1
            return denied
        try:
            client.check_accepting()  # refuse before reading or tokenizing anything
            raw = await read_body(request, max_request_bytes, budget=bodies)
            client.check_queue()  # a full queue: refused before it waits for a tokenizer (n: checked at submit)
            # off the event loop: a long prompt's tokenization must not stall other requests or /health
            client.validating += 1  # counts toward the queue limit until submitted
            try:
                reqs = await in_lane(raw, lambda tok: parse_request(decode_json(raw), chat, tok, info))
            finally:
                client.validating -= 1
            states = client.submit_choices(reqs)
        except (APIError, ClientDisconnect) as exc:
            answer = failure_response(exc)
            client.metrics.http[(endpoint, answer.status_code)] += 1
            return answer
        except Exception as exc:
            # a fault of ours: a 500 and one line, answered here (after an app-level handler
            # Starlette re-raises, and the server prints a traceback)
            client.metrics.http[(endpoint, 500)] += 1
            return internal_error(request, exc)
        reply = Reply(client, tokenizer, info, states, request)
        if reqs[0].stream:  # the status is sent now; a later failure comes as an error event
            client.metrics.http[(endpoint, 200)] += 1
            return StreamingResponse(reply.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        answer = await reply.whole()
        client.metrics.http[(endpoint, answer.status_code)] += 1
        return answer

    return app
