"""Bounded load test of `epinfer serve`: requests/s, tokens/s, latency and time-to-first-token
percentiles at a fixed concurrency.

Either against a running server (`--url`), or it starts one on a free loopback port with the
given server flags and stops it with SIGTERM afterwards (`--serve "--dp 2 --tp 1 ..."`). Bounded
twice: at most `--requests` requests and `--max-seconds` seconds. Prompts are lines of the Zen of
Python (the demo model's text; any tokenizer works) or, with `--token-prompts`, random token ids
(checkpoints without a tokenizer). Every request streams, so time to first token is measured.

    python3 benchmarks/serve_load.py --serve "--dp 2" --requests 256 --concurrency 32 --max-tokens 32
    python3 benchmarks/serve_load.py --url http://127.0.0.1:8000 --requests 2000 --concurrency 256 \
        --max-tokens 128 --json                          # e.g. a GPU server started by hand
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import io
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx

with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen
    import this
ZEN = [line for line in codecs.decode(this.s, "rot13").splitlines()[2:] if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(flags: str, timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "epinfer", "serve", "--port", str(port), *shlex.split(flags)],
                            stdout=subprocess.DEVNULL, stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit(f"the server was not healthy after {timeout} s")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    start = time.perf_counter()
    first, tokens, error = None, 0, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}", "latency": time.perf_counter() - start}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]["message"]
                    break
                n = len(event["choices"][0].get("token_ids", []))
                if n and first is None:
                    first = time.perf_counter() - start
                tokens += n
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {"latency": time.perf_counter() - start, "ttft": first, "tokens": tokens, "error": error}


async def run_load(url: str, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)

    def body(i: int) -> dict:
        if args.token_prompts:
            prompt = [rng.randrange(1, args.vocab) for _ in range(args.prompt_tokens)]
        else:
            prompt = ZEN[i % len(ZEN)]
        return {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}

    results: list[dict] = []
    deadline = time.perf_counter() + args.max_seconds
    next_id = 0
    limits = httpx.Limits(max_connections=args.concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as client:
        async def worker() -> None:
            nonlocal next_id
            while next_id < args.requests and time.perf_counter() < deadline:
                i, next_id = next_id, next_id + 1
                results.append(await one_request(client, body(i)))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r["error"] is None]
    latencies = [r["latency"] for r in ok]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
            "concurrency": args.concurrency, "max_tokens": args.max_tokens, "wall_s": round(wall, 3),
            "requests_per_s": round(len(ok) / wall, 3), "output_tokens_per_s": round(tokens / wall, 1),
            "latency_p50_s": round(percentile(latencies, 50), 4), "latency_p99_s": round(percentile(latencies, 99), 4),
            "ttft_p50_s": round(percentile(ttfts, 50), 4), "ttft_p99_s": round(percentile(ttfts, 99), 4),
            "latency_mean_s": round(statistics.fmean(latencies), 4) if latencies else None,
            "first_error": next((r["error"] for r in results if r["error"]), None)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--serve", help="start `epinfer serve` with these flags (quoted), stop it after")
    p.add_argument("--requests", type=int, default=256, help="at most this many requests")
    p.add_argument("--max-seconds", type=float, default=120.0, help="no new request after this many seconds")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--token-prompts", action="store_true", help="random token-id prompts (no tokenizer needed)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--vocab", type=int, default=512, help="token ids are drawn below this")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON record")
    args = p.parse_args()
    proc, url = start_server(args.serve) if args.serve else (None, args.url)
    try:
        record = asyncio.run(run_load(url, args))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
            if code != 0:
                print(f"the server exited with {code}", file=sys.stderr)
    record["cpu_count"] = os.cpu_count()
    print(json.dumps(record) if args.json else "  ".join(f"{k}={v}" for k, v in record.items()))
    return 0 if record["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
