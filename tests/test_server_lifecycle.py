"""`epinfer serve` lifecycle on CPU / Gloo, each on a short-lived server: the queue limit then a
SIGTERM drain (tiny checkpoint, dp=2 tp=2), an engine rank failure, a bad start, and a SIGTERM whose
shutdown timeout ends what is left."""

from __future__ import annotations

import codecs
import os
import signal
import subprocess
import sys
import this
import time

import httpx
import pytest

from epinfer import LLM, SamplingParams
from tests.serving import ENV, Served, metrics, post, sse_events, stream_ids

ZEN = [ln for ln in codecs.decode(this.s, "rot13").splitlines()[2:] if ln.strip()]
SEQS_PER_REPLICA = 8


def test_queue_limit_then_sigterm_drains(ckpt_dir, tmp_path):
    """Tiny checkpoint without a tokenizer (token-id prompts), dp=2 tp=2, one sequence slot per
    replica and a queue of 2: A and B run, C and D wait, E gets 429; SIGTERM (to the whole process
    group) refuses new requests, finishes A-D (equal to offline) and exits 0."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    model = str(ckpt_dir("qwen3_5_moe"))
    prompts = [[5, 6, 7], list(range(30, 71)), [200], [9, 9, 9, 9, 9]]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in LLM(model, dtype="float32", device="cpu").generate(prompts, params)]
    server = Served(["--model", model, "--dtype", "float32", "--dp", "2", "--tp", "2", "--max-num-seqs", "1",
                     "--max-queue", "2", "--shutdown-timeout", "120"], tmp_path / "serve.log")
    try:
        bodies = [{"prompt": p, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "model": model}
                  for p in prompts]
        with ThreadPoolExecutor(4) as pool:
            running = []
            for body in bodies[:2]:
                started = threading.Event()
                running.append(pool.submit(stream_ids, server.url, body, started))
                assert started.wait(120), server.output()
            waiting = [pool.submit(post, server.url, "/v1/completions", body, 300) for body in bodies[2:]]
            deadline = time.time() + 60
            while metrics(server.url)["epinfer_queue_depth"] < 2:
                assert time.time() < deadline and not any(f.done() for f in waiting), server.output()
                time.sleep(0.1)
            refused = post(server.url, "/v1/completions", bodies[0])
            assert refused.status_code == 429 and "queue is full" in refused.json()["error"]["message"]
            os.killpg(server.proc.pid, signal.SIGTERM)  # as a service manager would: the ranks get it too
            time.sleep(0.5)
            try:
                late = post(server.url, "/v1/completions", bodies[0], timeout=10)
                assert late.status_code == 503, late.text
            except httpx.ConnectError:
                pass  # the listening socket is closed: refused, as it should be
            got = [f.result(timeout=300) for f in running]
            got += [r.json()["choices"][0]["token_ids"] for r in (f.result(timeout=300) for f in waiting)]
        assert got == want
        assert server.wait(120) == 0, server.output()
        assert "shutting down" in server.output()
    finally:
        server.kill()


def test_rank_failure_fails_every_request(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    dumps = tmp_path / "dumps"
    timeout = 5.0
    server = Served(["--dp", "2", "--max-num-seqs", "2", "--collective-timeout", str(timeout), "--fault", "kill",
                     "--fault-rank", "1", "--fault-step", "30", "--dump-dir", str(dumps)], tmp_path / "serve.log")

    def request(body: dict) -> str:
        if not body["stream"]:
            r = post(server.url, "/v1/completions", body, timeout=timeout + 30)
            assert r.status_code == 500, r.text
            return r.json()["error"]["message"]
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=timeout + 30) as r:
            errors = [e["error"]["message"] for e in sse_events(r) if "error" in e]
        assert len(errors) == 1
        return errors[0]

    try:
        bodies = [{"prompt": ZEN[i], "max_tokens": 300, "ignore_eos": True, "stream": i % 2 == 0} for i in range(6)]
        start = time.time()
        with ThreadPoolExecutor(6) as pool:  # 4 run, 2 wait in the queue
            messages = list(pool.map(request, bodies))
        assert time.time() - start < timeout + 30
        assert all("rank 1 was killed by SIGKILL" in m for m in messages), messages
        health = httpx.get(f"{server.url}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        assert "rank 1" in health.json()["error"]
        assert server.wait(90) == 3, server.output()
        out = server.output()
        assert "epinfer: doctor: Ranks [1] died" in out, out
        assert "/__w/" not in out and ".cc:" not in out, out  # the backend's own lines stay in the dumps
        assert (dumps / "rank0.jsonl").is_file()
    finally:
        server.kill()


def test_bad_start_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "epinfer", "serve", "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr
    for template, fragment in [(str(tmp_path / "none.jinja"), "none.jinja: cannot read it (No such file"),
                               ("{{ raise_exception('no') }}", "--chat-template cannot render a one-message")]:
        proc = subprocess.run([sys.executable, "-m", "epinfer", "serve", "--port", "0", "--chat-template", template],
                              capture_output=True, text=True, timeout=120, env=ENV)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and fragment in proc.stderr, proc.stderr
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "epinfer", "serve", "--port", str(port)],
                              capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2 and "cannot listen on 127.0.0.1" in proc.stderr, proc.stderr


def test_a_signal_ends_the_wait_for_other_hosts(tmp_path):
    """`serve --nnodes 2`: host 1 waiting for host 0's store, and host 0 waiting for host 1 to join,
    each stop within seconds of a SIGTERM (the store's own waits ran minutes and deferred it); an
    address that resolves to nothing is one line at once."""
    from tests.spawn import free_port

    base = [sys.executable, "-m", "epinfer", "serve", "--dp", "2", "--nnodes", "2", "--master-addr", "127.0.0.1"]
    for node, wait_line in [("1", "host 1: waiting up to 300 s for host 0 at 127.0.0.1"),
                            ("0", "waiting up to 300 s for host(s) 1 to join")]:
        proc = subprocess.Popen([*base, "--node-rank", node, "--master-port", str(free_port()), "--port", "0"],
                                stderr=subprocess.PIPE, text=True, env=ENV)
        try:
            assert wait_line in proc.stderr.readline()
            time.sleep(1)  # (in the wait)
            assert proc.poll() is None
            struck = time.time()
            proc.send_signal(signal.SIGTERM)
            err = proc.communicate(timeout=30)[1]
            assert time.time() - struck < 5 and proc.returncode == 143, (node, err)
            assert err.strip().splitlines()[-1] == "epinfer: stopped by SIGTERM" and "Traceback" not in err, err
        finally:
            proc.kill()
    proc = subprocess.run([*base[:-1], "bad host!", "--node-rank", "1"], capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--master-addr 'bad host!' is not a host name or an IP address" in proc.stderr, proc.stderr


@pytest.mark.parametrize("second_signal", [False, True], ids=["timeout", "second-signal"])
def test_sigterm_timeout_ends_what_is_left(tmp_path, second_signal):
    """dp=1 (one rank, no collectives): a request still running when --shutdown-timeout runs out,
    or when a second SIGTERM comes during the drain, ends with an error event, and the server
    still exits 0 (the second signal says so in a line)."""
    import threading

    server = Served(["--shutdown-timeout", "300" if second_signal else "1"], tmp_path / "serve.log")
    try:
        body = {"prompt": "Beautiful", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        events, started = [], threading.Event()

        def read() -> None:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
                for event in sse_events(r):
                    events.append(event)
                    started.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert started.wait(60), server.output()
        server.proc.send_signal(signal.SIGTERM)
        if second_signal:
            time.sleep(1)
            assert reader.is_alive()  # (draining)
            struck = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
        reader.join(60)
        assert not reader.is_alive()
        ended = "the server was interrupted" if second_signal else "shut down before this request finished"
        assert ended in events[-1]["error"]["message"], events[-1]
        assert sum(len(e["choices"][0]["token_ids"]) for e in events[:-1]) < 1000
        assert server.wait(60) == 0, server.output()
        if second_signal:
            assert time.monotonic() - struck < 15
            assert "second signal: ending every request in flight now (1 left)" in server.output(), server.output()
    finally:
        server.kill()



def test_one_rank_position_moves_with_its_steps(tmp_path):
    """dp=1: one rank, so no collective moves its ledger's step. The step must move with the
    lockstep loop all the same: the watchdog's step limit counts from the step's start, and a rank
    whose step stayed at -1 (start-up) was stopped as stuck after 60 s of back-to-back requests.
    A SIGUSR1 dump after a few requests shows the step the rank is at."""
    import json

    dumps = tmp_path / "dumps"
    server = Served(["--dump-dir", str(dumps)], tmp_path / "serve.log")
    try:
        for length in (5, 9):
            r = post(server.url, "/v1/completions", {"prompt": "Beautiful", "max_tokens": length, "ignore_eos": True})
            assert r.status_code == 200, r.text
        server.proc.send_signal(signal.SIGUSR1)
        deadline = time.time() + 30
        while not (dumps / "rank0.jsonl").is_file():
            assert time.time() < deadline, server.output()
            time.sleep(0.2)
        header = json.loads((dumps / "rank0.jsonl").read_text().splitlines()[0])
        assert header["status"] == "running" and header["step"] >= 12, header  # a step a token: 14 ran
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    finally:
        server.kill()
