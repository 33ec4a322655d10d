"""`epinfer serve`'s connection deadlines, on uvicorn with a bare ASGI app: a request head that
does not come, and a stream whose client reads nothing."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import pytest
import uvicorn

from epinfer.server.main import QuietServer


@contextlib.contextmanager
def served(app, **deadlines):
    """`app` on uvicorn with epinfer's protocol deadlines, in a thread; yields its port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = QuietServer(uvicorn.Config(app, log_level="critical", lifespan="off"), **deadlines)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


def test_slow_request_head_is_cut_off():
    """A connection that has not sent a whole request head by the deadline is closed, also when it
    is its second request (after a response, trickled a byte at a time: each byte stops uvicorn's
    keep-alive timer); a whole request on another connection is served."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    with served(app, head_deadline_s=1.0) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # ... and nothing more
            started = time.monotonic()
            assert slow.recv(100) == b"" and 0.8 < time.monotonic() - started < 5
        with socket.create_connection(("127.0.0.1", port), timeout=10) as again:
            again.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert again.recv(100).startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            with pytest.raises(OSError):  # closed under the trickle (broken pipe or reset)
                for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                    again.sendall(bytes([byte]))
                    time.sleep(0.1)
            assert time.monotonic() - started < 5
        with socket.create_connection(("127.0.0.1", port), timeout=10) as whole:
            whole.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert whole.recv(100).startswith(b"HTTP/1.1 200")


def test_a_stream_nobody_reads_is_cut_off():
    """A client that stops reading a stream: once its receive window and our send buffer are full
    and stay full for the write deadline, the connection is aborted and the app sees a disconnect
    (the request is cancelled); a reading client on another connection is served meanwhile."""
    disconnected = threading.Event()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/short":
            await send({"type": "http.response.body", "body": b"ok"})
            return

        async def watch():  # as a request's handler watches its connection
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        watcher = asyncio.create_task(watch())
        while not watcher.done():  # a stream without end: a long generation, to a client that reads nothing
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
            await asyncio.sleep(0)

    with served(app, write_deadline_s=1.0) as port:
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", port))
        stuck.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")  # ... and never reads
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as other:
            other.sendall(b"GET /short HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert other.recv(100).startswith(b"HTTP/1.1 200")
        assert disconnected.wait(15), "the stream nobody reads was never cut off"
        assert 0.8 < time.monotonic() - started < 15
        stuck.close()
