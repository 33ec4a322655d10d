"""`epinfer serve`: the server process from start to exit code.

Start: bind the port (a taken port is a usage error before any rank starts), spawn the ranks and
wait until rank 0's serving loop reports ready, then serve HTTP on this process's asyncio loop.

Exit codes:
  0  SIGTERM / SIGINT: new connections are refused and new requests on open ones get 503; in-flight
     requests finish (up to `--shutdown-timeout` seconds; whatever is left then ends with an
     error), the ranks stop together, the process exits 0.
  2  bad flags, checkpoint or port (one `epinfer: error:` line).
  3  an engine rank failed: every pending request ends with an error naming the failure at once,
     /health turns unhealthy (503), the surviving ranks dump their ledgers and stop, and the
     process prints the doctor's one-paragraph summary and exits 3 (after at least
     `FAILURE_LINGER_S`, so health checks see the unhealthy state).

On several hosts (`--nnodes`) host 0 is this process; the others run `server.nodes.run_headless`:
their ranks only, no HTTP, exit 0 after the joint stop and 3 after a fault.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import time
from pathlib import Path

import uvicorn

from epinfer.core.checkpoint_files import model_folder, read_text_file
from epinfer.core.env import SWITCHES, raise_open_file_limit, under_torchrun
from epinfer.core.errors import Interrupted, UserError, noting_signals
from epinfer.diagnostics.watchdog import EXIT_FAULT, log_line
from epinfer.engine.engine import DEMO_MODEL
from epinfer.engine.generation_files import load_tokenizer
from epinfer.runtime.worker import Job
from epinfer.server.app import build_app
from epinfer.server.client import EngineClient
from epinfer.server.nodes import Nodes, run_headless
from epinfer.server.protocol import ModelInfo, chat_template_problem
from epinfer.server.ranks import RankSet

FAILURE_LINGER_S = 2.0
HEAD_DEADLINE_S = 30.0  # a connection's first request head must arrive within this (`with_deadlines`)
WRITE_DEADLINE_S = 60.0  # a client that reads nothing of its full send buffer for this long is cut off


def bind(host: str, port: int) -> socket.socket:
    if host.startswith("[") and host.endswith("]"):  # an IPv6 address as URLs write it
        host = host[1:-1]
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def serve(args: argparse.Namespace, job: Job) -> int:
    """`job`: the run description built from the flags (its mode is set here: the serving loop)."""
    if under_torchrun():
        raise UserError("epinfer serve spawns its own ranks: run it without torchrun, or unset RANK and WORLD_SIZE "
                        "(on several hosts: "
                        "--nnodes N --node-rank R --master-addr HOST0 on each)")
    if not args.host.strip():  # (an unset variable in `--host "$HOST"`: bind() would take every interface)
        raise UserError("--host is empty: give an address to listen on (0.0.0.0 for every interface)")
    nodes = Nodes.from_args(args, job.dp, job.tp)
    if args.max_queue < 1 or not 0 <= args.shutdown_timeout < float("inf"):
        raise UserError("--max-queue must be >= 1 and --shutdown-timeout a finite number >= 0")
    if args.api_key is not None and not args.api_key.strip():  # (an unset variable: no key at all)
        raise UserError("--api-key is empty: give the key clients must send, or leave the flag out")
    if args.max_request_bytes is not None and args.max_request_bytes < 1024:
        raise UserError(f"--max-request-bytes must be at least 1024, got {args.max_request_bytes}")
    folder = model_folder(Path(args.model) if args.model else DEMO_MODEL)
    if nodes.rank > 0:  # no HTTP here: this host's ranks, relayed to host 0
        return run_headless(RankSet(job, nodes))
    raise_open_file_limit()  # a socket per client
    sock = bind(args.host, args.port)
    tokenizer = load_tokenizer(folder)
    if args.chat_template is not None:
        set_chat_template(tokenizer, args.chat_template)
    problem = chat_template_problem(tokenizer)
    if problem is not None and args.chat_template is not None:  # (asked for: it must work)
        raise UserError(f"--chat-template cannot render a one-message conversation: {problem}")
    if problem is not None:  # completions still work: a warning, not a refusal to start
        log_line(f"epinfer: warning: the chat template cannot render a one-message conversation ({problem}); "
                 "/v1/chat/completions will fail")
    ranks = RankSet(job, nodes)  # (it sets the job's mode: the serving loop, with its channels)
    with noting_signals() as signals:
        try:
            ranks.start(signals.first)
            engine = ranks.wait_ready(signals.first)
        except BaseException:
            ranks.close()
            sock.close()
            raise
    if signals.first():  # (came as the engine reported ready)
        ranks.close()
        sock.close()
        raise Interrupted(signals.first())
    name = args.served_model_name or args.model or "epinfer-demo"
    info = ModelInfo(name, engine["max_model_len"], engine["vocab_size"], engine["defaults"],
                     reasoning=args.reasoning_parser is not None)
    return asyncio.run(Server(args, ranks, tokenizer, info, sock, engine).run())


def capacity(engine: dict) -> str:
    """What a replica's KV cache holds: a request keeps its prompt and its `max_tokens` from admission
    on, so requests of the max model length at once is the fewest it runs together."""
    kv, longest = engine["kv_tokens"], engine["max_model_len"]
    return (f"KV cache {kv:,} tokens a replica: room for {kv / longest:.1f} requests of that length at once, "
            f"{engine['max_num_seqs']} sequences at most")


class Server:
    def __init__(self, args, ranks: RankSet, tokenizer, info: ModelInfo, sock: socket.socket, engine: dict) -> None:
        self.args, self.ranks, self.tokenizer, self.info, self.sock, self.engine = \
            args, ranks, tokenizer, info, sock, engine
        self.exit_code: asyncio.Future | None = None
        self.shutting_down = self.stopping_now = False

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.exit_code = loop.create_future()
        self.client = EngineClient(self.ranks, loop, self.args.max_queue, self.engine["dp"],
                                   self.engine["max_num_seqs"] * self.engine["dp"])
        app = build_app(self.client, self.tokenizer, self.info, request_limit(self.args, self.info),
                        self.args.api_key or SWITCHES.api_key)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5)
        self.http = QuietServer(config)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal)
        loop.add_signal_handler(signal.SIGUSR1, self.ranks.forward_usr1)
        self.ranks.monitor(lambda msg: loop.call_soon_threadsafe(self.on_failure, msg))
        http_task = asyncio.create_task(self.http.serve(sockets=[self.sock]))
        host, port = self.sock.getsockname()[:2]
        mode = ", async scheduling" if self.engine.get("async_scheduling") else ""
        host = f"[{host}]" if ":" in host else host
        log_line(f"epinfer: serving {self.info.name} on http://{host}:{port} (dp={self.engine['dp']} "
                 f"tp={self.engine['tp']}{mode}, max model length {self.info.max_model_len}; {capacity(self.engine)})")
        done, _ = await asyncio.wait({http_task, self.exit_code}, return_when=asyncio.FIRST_COMPLETED)
        if http_task in done and not self.exit_code.done():  # uvicorn stopped on its own
            self.ranks.stop()
            return 1
        code = self.exit_code.result()
        self.http.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(http_task, timeout=10)
        self.client.readers_stop.set()
        return code

    def on_signal(self) -> None:
        if self.shutting_down:  # a second signal: stop now (off the loop: the answers still go out)
            if not self.stopping_now:
                self.stopping_now = True
                left = len(self.client.requests)
                log_line(f"epinfer: second signal: ending every request in flight now ({left} left)")
                self.client.abort_all("the server was interrupted")
                asyncio.ensure_future(self.stop_now())
            return
        self.shutting_down = True
        log_line("epinfer: shutting down: no new requests; waiting for the ones in flight")
        asyncio.ensure_future(self.shutdown())

    async def stop_now(self) -> None:
        self.finish(await asyncio.get_running_loop().run_in_executor(None, self.ranks_stop_code, 5.0))

    async def shutdown(self) -> None:
        self.client.draining = True
        for listener in getattr(self.http, "servers", []):
            listener.close()  # new connections are refused; open ones get 503
        try:
            await asyncio.wait_for(self.client.idle.wait(), timeout=self.args.shutdown_timeout)
        except TimeoutError:
            left = len(self.client.requests)
            log_line(f"epinfer: {left} requests still running after {self.args.shutdown_timeout} s; ending them")
            self.client.abort_all("the server shut down before this request finished")
        if not self.client.healthy or self.stopping_now:
            return  # the failure path, or a second signal, owns the exit
        code = await asyncio.get_running_loop().run_in_executor(None, self.ranks_stop_code)
        self.finish(code)

    def ranks_stop_code(self, timeout: float = 30.0) -> int:
        return 0 if self.ranks.stop(timeout) else EXIT_FAULT

    def on_failure(self, message: str) -> None:
        if self.exit_code.done():
            return
        log_line(f"epinfer: error: {message}; failing every pending request")
        self.client.fail(message)
        asyncio.ensure_future(self.after_failure(message, time.monotonic()))

    async def after_failure(self, message: str, since: float) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.ranks.drain_after_failure)
        for line in self.ranks.errors():
            log_line(f"epinfer: {line}")
        summary = await loop.run_in_executor(None, doctor_summary, self.ranks.dump_dir)
        log_line(f"epinfer: doctor: {summary}")
        log_line(f"epinfer: dumps in {self.ranks.dump_dir}: run `epinfer doctor {self.ranks.dump_dir}`")
        await asyncio.sleep(max(0.0, FAILURE_LINGER_S - (time.monotonic() - since)))
        self.finish(EXIT_FAULT)

    def finish(self, code: int) -> None:
        if not self.exit_code.done():
            self.exit_code.set_result(code)


MAX_TEMPLATE_BYTES = 1 << 20


def set_chat_template(tokenizer, given: str) -> None:
    """--chat-template: a file, or (holding Jinja's `{{` or `{%`) the template itself, as vLLM takes it."""
    if tokenizer is None:
        raise UserError("--chat-template: this model has no tokenizer to apply it with")
    inline = "{{" in given or "{%" in given
    tokenizer.chat_template = given if inline else read_text_file(Path(given), MAX_TEMPLATE_BYTES, "a chat template")


def request_limit(args, info: ModelInfo) -> int:
    """--max-request-bytes, or room for a prompt of the max model length sent as token ids (up to
    ~16 bytes each in JSON), at least 1 MiB."""
    return args.max_request_bytes or max(2**20, 16 * info.max_model_len)


def doctor_summary(dump_dir: str) -> str:
    from epinfer.diagnostics.doctor import analyse

    try:
        return analyse(Path(dump_dir))["summary"]
    except Exception as exc:  # no dumps (every rank died), or unreadable ones: say so, still exit 3
        return f"no analysis ({type(exc).__name__}: {exc})"


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling (this process drains and stops the engine first),
    and with deadlines for each connection's request heads and for a reader that stopped reading
    (`with_deadlines`)."""

    def __init__(self, config: uvicorn.Config, head_deadline_s: float = HEAD_DEADLINE_S,
                 write_deadline_s: float = WRITE_DEADLINE_S) -> None:
        config.load()
        config.http_protocol_class = with_deadlines(config.http_protocol_class, head_deadline_s, write_deadline_s)
        super().__init__(config)

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass


def with_deadlines(base: type, seconds: float, write_seconds: float) -> type:
    """uvicorn's HTTP protocol (h11 or httptools), closing a connection that has not sent a whole
    request head `seconds` after it opened, or after its previous response ended: uvicorn times
    only idle keep-alive connections (and any byte received stops that timer), so clients that send
    their headers a byte at a time, first request or next one, would otherwise hold a socket each
    for ever. And aborting one whose writes have stayed paused (the client's receive window and
    our send buffer full) for `write_seconds`: a stream whose client reads nothing would hold its
    socket, its request and the text waiting for it for ever. The ASGI app then sees a disconnect
    (the request is cancelled in the engine)."""

    class Deadlines(base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.head_timer = self.write_timer = None
            self.arm_head_timer()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self.write_timer is None:
                self.write_timer = self.loop.call_later(write_seconds, self.transport.abort)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self.write_timer is not None:
                self.write_timer.cancel()
                self.write_timer = None

        def arm_head_timer(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            self.head_timer = self.loop.call_later(seconds, self.head_too_slow, self.cycle)

        def head_too_slow(self, cycle_then) -> None:
            # no new request head since the timer was armed (the cycle is the one it was then)
            if self.cycle is cycle_then and not self.transport.is_closing():
                self.transport.close()

        def on_response_complete(self) -> None:
            self.arm_head_timer()  # before the base class, which may start a pipelined request's cycle
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            for timer in (self.head_timer, self.write_timer):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

    return Deadlines
