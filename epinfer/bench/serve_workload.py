"""`epinfer bench --workload NAME --serve`: the same workloads through `epinfer serve` over HTTP.

A server is started as its own process on a free loopback port (the model shape with random
weights, the bench's engine and `--dp/--tp` flags), waited for until `/health` answers, warmed up
with one full-budget round of requests, then given every request of the workload by
`--concurrency` streaming clients (default: all at once), spread over a few processes
(`client_processes`: one Python process cannot parse 512 streams' events as fast as the server
sends them). Each request streams `/v1/completions` with token-id prompts and `ignore_eos`; its
time to first token is the first event that carries tokens. Reported as the offline workload is
(total / output tokens/s, requests/s, TTFT and TPOT p50 / p99), plus the server's start-up
(process start to healthy) and failed requests. The server is stopped with SIGTERM at the end
(killed if it does not stop).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from epinfer.bench.single import bench_model_len, check_bench_tokens, shape_folder
from epinfer.bench.workload import (
    GREEDY,
    Workload,
    first_prompts,
    lengths,
    next_turn,
    summary,
    warm_up_workload,
    workload,
)
from epinfer.core.config import ModelConfig
from epinfer.core.env import raise_open_file_limit
from epinfer.core.errors import UserError

HEALTH_TIMEOUT_S = 900.0  # a full-size shape on a GPU compiles and captures for a minute or more
REQUEST_TIMEOUT_S = 3600.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log: Path, lines: int = 5) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def start_server(flags: list[str], log: Path) -> tuple[subprocess.Popen, str, float]:
    """(process, base url, seconds to healthy); a server that exits or never gets healthy is a
    `UserError` carrying the end of its log."""
    import httpx

    port = _free_port()
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "epinfer", "serve", "--port", str(port), *flags],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        while time.perf_counter() - t0 < HEALTH_TIMEOUT_S:
            if proc.poll() is not None:
                raise UserError(f"the server exited with {proc.returncode} before it was healthy: {_tail(log)}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return proc, url, time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    except BaseException:  # (a signal while it starts: the server does not outlive the bench)
        stop_server(proc)
        raise
    stop_server(proc)
    raise UserError(f"the server was not healthy after {HEALTH_TIMEOUT_S:.0f} s: {_tail(log)}")


def stop_server(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    return proc.returncode


async def _one(client, prompt: list[int], max_tokens: int, sampling: dict | None = None) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True, **GREEDY,
            **(sampling or {})}
    start = time.perf_counter()
    first, ids, error = None, [], None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}", "start": start, "end": time.perf_counter(), "ids": [],
                        "prompt": prompt}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"].get("message", "error")
                    break
                new = event["choices"][0].get("token_ids", [])
                if new and first is None:
                    first = time.perf_counter()
                ids += new
    except Exception as exc:  # a dropped connection ends this request only
        error = f"{type(exc).__name__}: {exc}"
    return {"start": start, "first": first, "end": time.perf_counter(), "ids": ids, "error": error, "prompt": prompt}


async def drive(url: str, prompts: list[list[int]], outputs: list[int], concurrency: int,
                chat: tuple[Workload, int] | None = None, ids: list[int] | None = None,
                sampling: dict | None = None) -> tuple[list[dict], float]:
    """Every request through `concurrency` clients; (per-request results, wall s). `chat`: the
    workload and vocabulary of multi-turn chats: prompt i opens chat `ids[i]` (default i), whose
    later turns its client sends one after the other, each once the previous reply is complete.
    `sampling`: fields every request's body carries (default greedy)."""
    import httpx

    raise_open_file_limit()  # a socket per client
    results: list[dict] = []
    todo = iter(range(len(prompts)))

    async def worker() -> None:
        # a client (one connection) per worker: httpx's shared pool scans all its connections at
        # every request and response event, which cost more CPU than the streams at 256 clients
        # (plain HTTP on loopback: no TLS context, whose certificates take 30 ms to load per client)
        async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, verify=False,
                                     limits=httpx.Limits(max_connections=1)) as client:
            for i in todo:
                prompt, last = prompts[i], None
                for turn in range(1, (chat[0].turns if chat else 1) + 1):
                    if turn > 1:
                        if last["error"] is not None:
                            break
                        prompt = next_turn(chat[0], prompt, last["ids"], chat[1], ids[i] if ids else i, turn - 1)
                    last = await _one(client, prompt, outputs[i], sampling)
                    results.append(last)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - start


def client_processes(concurrency: int, cores: int | None = None) -> int:
    """Processes the streaming clients are spread over: one per 64 streams, at most half the cores
    (the server and its ranks keep the rest) and 8. One Python process parsing every stream's events
    measured ≈ 1 ms of CPU a token and became the bottleneck at 512 streams."""
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return max(1, min(8, cores // 2, -(-concurrency // 64)))


def run_clients(url: str, prompts: list[list[int]], outputs: list[int], concurrency: int,
                chat: tuple[Workload, int] | None = None, processes: int | None = None,
                sampling: dict | None = None) -> tuple[list[dict], float]:
    """`drive` over `processes` (default `client_processes`) forked processes, request i in process
    i mod P with its share of the clients, all told to start at one moment; (results, wall s from
    the first process's start to the last one's end). Each process has its own requests: one that
    runs out early leaves its clients idle while others still queue (the run's tail only, with
    requests of similar length)."""
    processes = min(processes or client_processes(concurrency), concurrency, len(prompts))
    if processes <= 1:
        return asyncio.run(drive(url, prompts, outputs, concurrency, chat, sampling=sampling))
    start_at = time.monotonic() + 0.5  # (CLOCK_MONOTONIC: one clock for every process)
    shares = []
    for p in range(processes):
        ids = list(range(p, len(prompts), processes))
        shares.append((url, [prompts[i] for i in ids], [outputs[i] for i in ids],
                       concurrency // processes + (p < concurrency % processes), chat, ids, start_at, sampling))
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        parts = pool.starmap(_client_process, shares)
    return [r for part, _, _ in parts for r in part], max(end for *_, end in parts) - min(s for _, s, _ in parts)


def _client_process(url, prompts, outputs, concurrency, chat, ids, start_at,
                    sampling) -> tuple[list[dict], float, float]:
    time.sleep(max(0.0, start_at - time.monotonic()))
    start = time.monotonic()
    results, _ = asyncio.run(drive(url, prompts, outputs, concurrency, chat, ids, sampling))
    return results, start, time.monotonic()


def summarize(results: list[dict], wall: float) -> dict:
    """TTFT per request from its own send (all at once: the workload's start)."""
    ok = [r for r in results if r["error"] is None]
    ttft = [r["first"] - r["start"] for r in ok if r["first"] is not None]
    tpot = [(r["end"] - r["first"]) / (len(r["ids"]) - 1) for r in ok if r["first"] is not None and len(r["ids"]) > 1]
    return {"requests": len(results), "failed": len(results) - len(ok),
            "first_error": next((r["error"] for r in results if r["error"]), None),
            **summary(len(ok), sum(len(r["prompt"]) for r in ok), sum(len(r["ids"]) for r in ok), wall, ttft, tpot)}


def bench_serve_workload(shape: str, name: str, server_flags: list[str], layers: int | None = None,
                         requests: int | None = None, input_len: int | None = None, output_len: int | None = None,
                         concurrency: int | None = None, budget: int = 8192, seed: int = 0,
                         client_procs: int | None = None, sampling: dict | None = None) -> dict:
    """One record: workload `name` through a fresh `epinfer serve` of `shape` (`server_flags`: the
    engine and parallel flags, passed through); `client_procs`: the clients' processes (default
    `client_processes`)."""
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise UserError("--serve needs httpx: pip install httpx (or epinfer[serve])") from None
    w = workload(name, requests, input_len, output_len)
    pairs = lengths(w, seed)
    check_bench_tokens(sum(i + o for i, o in pairs))
    clients = min(concurrency or len(pairs), len(pairs))
    if clients < 1:
        raise UserError("--concurrency must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        folder = shape_folder(shape, layers, tmp, "--fp8-weights" in server_flags)
        cfg = ModelConfig.from_dir(folder)
        vocab = cfg.vocab_size
        longest = max(i + o for i, o in pairs)
        log = Path(tmp, "server.log")
        warm = warm_up_workload(w, budget, longest)
        model_len = bench_model_len(cfg, longest, 16)
        flags = ["--model", str(folder), "--random-weights", "--max-model-len", str(model_len),
                 "--max-queue", str(max(len(pairs), warm.requests) + 16), "--max-num-batched-tokens", str(budget),
                 *server_flags]
        proc, url, healthy_s = start_server(flags, log)
        try:
            warm_prompts, warm_outputs = zip(*first_prompts(warm, vocab, seed + 7), strict=True)
            t = time.perf_counter()
            warm_res, _ = run_clients(url, list(warm_prompts), list(warm_outputs), warm.requests, sampling=sampling)
            warm_s = time.perf_counter() - t
            if any(r["error"] for r in warm_res):
                raise UserError(f"the warm-up failed: {next(r['error'] for r in warm_res if r['error'])}; "
                                f"server log: {_tail(log)}")
            prompts, outputs = zip(*first_prompts(w, vocab, seed), strict=True)
            procs = min(client_procs or client_processes(clients), clients)
            results, wall = run_clients(url, list(prompts), list(outputs), clients,
                                        (w, vocab) if w.turns > 1 else None, procs, sampling)
            record = {"workload": name, "shape": shape, "via": "epinfer serve (HTTP, streaming)",
                      "server_flags": shlex.join(server_flags), "concurrency": clients,
                      "client_processes": procs,
                      "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                      "max_num_batched_tokens": budget, "sampling": sampling or GREEDY,
                      "startup_s": {"server_healthy": round(healthy_s, 2), "warm_up": round(warm_s, 2)},
                      **summarize(results, wall)}
        finally:
            code = stop_server(proc)
    record["server_exit"] = code
    print(f"epinfer bench: {name} via epinfer serve: {record['requests']} requests ({record['failed']} failed), "
          f"{record['total_tok_s']} tok/s total, {record['output_tok_s']} tok/s out, TTFT p50 "
          f"{record['ttft_ms_p50']} ms, TPOT p50 {record['tpot_ms_p50']} ms", file=sys.stderr, flush=True)
    return record
