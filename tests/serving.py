"""Helpers for the `epinfer serve` tests: a served process, metrics, SSE parsing, concurrent clients."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx

from tests.spawn import free_port

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


class Served:
    def __init__(self, args: list[str], log_path, timeout: float = 180.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path, self.args = log_path, args
        self.log = open(log_path, "w")  # noqa: SIM115 - open for the server's lifetime
        self.proc = subprocess.Popen([sys.executable, "-m", "epinfer", "serve", "--port", str(self.port), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.kill()
        raise AssertionError(f"server not healthy after {timeout} s: {self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return open(self.log_path).read()[-4000:]

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def wait_idle(url: str, slots: int, timeout: float = 30.0) -> dict[str, float]:
    """Until nothing is in flight and every replica has all its slots and blocks back."""
    deadline = time.time() + timeout
    while True:
        m = metrics(url)
        replicas = [k.split('"')[1] for k in m if k.startswith("epinfer_free_sequence_slots")]
        per_replica = [tuple(m[f'epinfer_{name}{{replica="{r}"}}'] for name in
                             ("running_requests", "outstanding_tokens", "free_sequence_slots")) for r in replicas]
        if m["epinfer_requests_in_flight"] == 0 and all(p == (0, 0, slots) for p in per_replica):
            return m
        assert time.time() < deadline, f"not idle after {timeout} s: {m}"
        time.sleep(0.2)


def post(url: str, path: str, body, timeout: float = 120.0) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json"},
                      timeout=timeout)


def sse_events(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            if data == "[DONE]":
                return
            yield json.loads(data)


async def gather_requests(url: str, bodies: list[dict], path: str = "/v1/completions") -> list[dict]:
    """All at once; streaming bodies are joined into one result (text and token ids)."""
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=200)) as client:
        async def one(body: dict) -> dict:
            if not body.get("stream"):
                r = await client.post(path, json=body)
                assert r.status_code == 200, r.text
                c = r.json()["choices"][0]
                return {"text": c["text"], "token_ids": c["token_ids"], "finish_reason": c["finish_reason"]}
            text, ids, finish = "", [], None
            async with client.stream("POST", path, json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        c = json.loads(line[6:])["choices"][0]
                        text += c["text"]
                        ids += c["token_ids"]
                        finish = c["finish_reason"] or finish
            return {"text": text, "token_ids": ids, "finish_reason": finish}

        return await asyncio.gather(*(one(b) for b in bodies))



def stream_ids(url: str, body: dict, started) -> list[int]:
    ids = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=300) as r:
        assert r.status_code == 200
        for event in sse_events(r):
            assert "error" not in event, event
            ids += event["choices"][0]["token_ids"]
            started.set()
    return ids

