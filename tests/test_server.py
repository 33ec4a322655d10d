"""`epinfer serve` on CPU / Gloo: one dp=2 server on the shipped demo model answers many cases
(the official `openai` client, 64 concurrent requests equal to offline `LLM.generate`, seeded
sampling, streaming, logprobs, validation, routing, disconnects); short-lived servers cover the
queue limit + SIGTERM drain (tiny checkpoint, dp=2 tp=2) and an engine rank failure."""

from __future__ import annotations

import asyncio
import codecs
import json
import os
import signal
import subprocess
import sys
import this
import time

import httpx
import pytest
import torch

from epinfer import LLM, SamplingParams
from epinfer.server.engine_loop import outstanding_tokens, pick_replica, route
from epinfer.server.protocol import chat_prompt_ids
from epinfer.server.text import TextStream, held_back
from tests.spawn import free_port

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
ZEN = [ln for ln in codecs.decode(this.s, "rot13").splitlines()[2:] if ln.strip()]
SEQS_PER_REPLICA = 8


# --- helpers ---------------------------------------------------------------------------------

class Served:
    def __init__(self, args: list[str], log_path, timeout: float = 180.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
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


# --- units (no processes) ----------------------------------------------------------------------

def test_routing_rule():
    assert pick_replica([5, 3, 3]) == 1 and pick_replica([0, 0]) == 0 and pick_replica([7]) == 0
    params = SamplingParams(max_tokens=10).resolved({})
    # each routed request counts toward the next decision: 4+10 on replica 1 makes replica 0 (9) lighter
    assert route([9, 0], [(0, [1] * 4, params, None), (1, [1], params, None)]) == [1, 0]
    from epinfer.engine.scheduler import Sequence

    seq = Sequence(0, [1, 2, 3, 4], params, 14)
    seq.num_computed = 3
    assert outstanding_tokens(seq) == 1 + 10
    seq.num_computed, seq.output_ids = 6, [5, 6]
    assert outstanding_tokens(seq) == 8


def test_stream_holds_back_stop_prefixes(demo_llm):
    assert held_back("abc", ["cd"]) == 1 and held_back("abc", ["x"]) == 0 and held_back("ab", ["abc"]) == 2
    tok = demo_llm.tokenizer
    ids = tok("Beautiful is better than ugly.\nExplicit is", add_special_tokens=False)["input_ids"]
    stop = "ugly.\nEx"
    stream, snapshots = TextStream(tok, [stop]), []
    for i, t in enumerate(ids):  # token by token, stopping where the engine would
        stream.add([t])
        so_far = tok.decode(ids[: i + 1], skip_special_tokens=True)
        if stop in so_far:
            final = so_far[: so_far.find(stop)]
            snapshots.append(snapshots[-1] + stream.delta(final=True, stop_end=so_far.find(stop)))
            break
        snapshots.append((snapshots[-1] if snapshots else "") + stream.delta(final=False))
    assert snapshots[-1] == final == "Beautiful is better than "
    assert all(final.startswith(s) for s in snapshots)  # nothing sent is ever taken back
    assert any(len(s) < len(final) and final.startswith(s + "u") for s in snapshots)  # "u" was held back


def test_chat_template_renders_chatml(demo_llm):
    tok = demo_llm.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = chat_prompt_ids(tok, text)
    assert tok.convert_ids_to_tokens(ids[0]) == "<|im_start|>" and tok.decode(ids) == text


# --- the shared dp=2 demo server -----------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_llm():
    return LLM()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "demo.log"
    server = Served(["--dp", "2", "--max-num-seqs", str(SEQS_PER_REPLICA), "--max-queue", "64"], log)
    yield server
    server.proc.send_signal(signal.SIGTERM)
    code = server.wait(60)
    assert code == 0, server.output()


def test_models_health_metrics(demo):
    models = httpx.get(f"{demo.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["epinfer-demo"] and models["data"][0]["max_model_len"] == 1024
    assert httpx.get(f"{demo.url}/health").json()["status"] == "ok"
    m = metrics(demo.url)
    for name in ("epinfer_healthy", "epinfer_queue_depth", 'epinfer_running_requests{replica="1"}',
                 'epinfer_free_kv_blocks{replica="0"}', "epinfer_prompt_tokens_total",
                 "epinfer_generation_tokens_total",
                 'epinfer_collective_skew_max_seconds{label="dp.sync"}', 'epinfer_step_seconds_count{replica="0"}'):
        assert name in m, name
    assert m["epinfer_healthy"] == 1


def test_openai_client(demo, demo_llm):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{demo.url}/v1", api_key="unused", max_retries=0, timeout=120)
    prompt = "Beautiful is better than"
    want = demo_llm.generate(prompt, SamplingParams(max_tokens=30, stop=["complex"]))[0]
    whole = client.completions.create(model="epinfer-demo", prompt=prompt, max_tokens=30, stop=["complex"])
    assert whole.choices[0].text == want.text and whole.choices[0].finish_reason == want.finish_reason == "stop"
    assert whole.usage.prompt_tokens == len(want.prompt_token_ids)
    assert whole.usage.completion_tokens == len(want.token_ids)
    chunks = list(client.completions.create(model="epinfer-demo", prompt=prompt, max_tokens=30, stop=["complex"],
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert len(chunks) > 3 and chunks[-1].usage.completion_tokens == len(want.token_ids)

    messages = [{"role": "system", "content": "Recite."}, {"role": "user", "content": "Flat is better"}]
    tok = demo_llm.tokenizer
    ids = chat_prompt_ids(tok, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    want = demo_llm.generate([ids], SamplingParams(max_tokens=25))[0]
    chat = client.chat.completions.create(model="epinfer-demo", messages=messages, max_tokens=25)
    assert chat.choices[0].message.content == want.text and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(ids) and chat.choices[0].finish_reason == want.finish_reason
    stream = client.chat.completions.create(model="epinfer-demo", messages=messages, max_tokens=25, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want.text


def test_64_concurrent_greedy_requests_equal_offline(demo, demo_llm):
    prompts, bodies = [], []
    for i in range(64):
        words = ZEN[i % len(ZEN)].split()
        prompt = " ".join(words[: 1 + (i // len(ZEN)) % len(words)])
        max_tokens = 6 + (i * 7) % 40
        prompts.append(prompt)
        bodies.append({"prompt": prompt, "max_tokens": max_tokens, "stream": i % 2 == 1,
                       "temperature": 0, "some_unknown_field": [1, 2]})
    want = demo_llm.generate(prompts, [SamplingParams(max_tokens=b["max_tokens"], temperature=0) for b in bodies])
    got = asyncio.run(gather_requests(demo.url, bodies))
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert (g["token_ids"], g["text"], g["finish_reason"]) == (w.token_ids, w.text, w.finish_reason), i
    m = wait_idle(demo.url, SEQS_PER_REPLICA)
    assert m['epinfer_routed_requests_total{replica="0"}'] > 0 and m['epinfer_routed_requests_total{replica="1"}'] > 0


def test_seeded_sampling_equals_offline(demo, demo_llm):
    bodies = [{"prompt": ZEN[i], "max_tokens": 24, "temperature": 1.0, "top_k": 50, "top_p": 0.95,
               "seed": 1000 + i, "ignore_eos": True, "stream": i % 3 == 0} for i in range(12)]
    params = [SamplingParams(max_tokens=24, temperature=1.0, top_k=50, top_p=0.95, seed=1000 + i, ignore_eos=True)
              for i in range(12)]
    want = demo_llm.generate([b["prompt"] for b in bodies], params)
    got = asyncio.run(gather_requests(demo.url, bodies))
    assert [g["token_ids"] for g in got] == [w.token_ids for w in want]
    assert [g["text"] for g in got] == [w.text for w in want]
    greedy = demo_llm.generate([b["prompt"] for b in bodies], SamplingParams(max_tokens=24, ignore_eos=True))
    assert [w.token_ids for w in want] != [g.token_ids for g in greedy]  # it really sampled


def offline_logprobs(llm: LLM, prompt: str, max_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's log-softmax row, captured from the engine's logits."""
    eng, captured = llm.engine, []
    apply = eng.apply

    def capture(scheduled, logits):
        captured.append(torch.log_softmax(logits.float(), dim=-1)[0])
        return apply(scheduled, logits)

    eng.apply = capture
    try:
        out = llm.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))[0]
    finally:
        del eng.apply
    return out.token_ids, captured


def test_logprobs(demo, demo_llm):
    prompt = "Sparse is better"
    ids, rows = offline_logprobs(demo_llm, prompt, 8)
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 3}
    lp = post(demo.url, "/v1/completions", body).json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) == len(lp["top_logprobs"]) == len(lp["tokens"])
    for got, top, tok_id, row in zip(lp["token_logprobs"], lp["top_logprobs"], ids, rows, strict=True):
        assert abs(got - row[tok_id].item()) < 1e-4
        assert len(top) == 3 and abs(max(top.values()) - got) < 1e-6  # greedy: the chosen token is the top one
        want_top = row.topk(3).values.tolist()
        assert all(abs(a - b) < 1e-4 for a, b in zip(sorted(top.values(), reverse=True), want_top, strict=True))
    streamed = []
    with httpx.stream("POST", f"{demo.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for event in sse_events(r):
            streamed += event["choices"][0]["logprobs"]["token_logprobs"] if event["choices"][0]["logprobs"] else []
    assert streamed == lp["token_logprobs"]
    chat = post(demo.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                                   "logprobs": True, "top_logprobs": 2}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"]
    assert all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 and c["bytes"] == list(c["token"].encode())
               for c in content)
    plain = post(demo.url, "/v1/completions", {"prompt": prompt, "max_tokens": 2}).json()
    assert plain["choices"][0]["logprobs"] is None


BAD = [
    ("/v1/completions", b'{"prompt": "x", ', 400, "malformed JSON"),
    ("/v1/completions", [1, 2], 400, "JSON object"),
    ("/v1/completions", {"max_tokens": 3}, 400, "'prompt' is required"),
    ("/v1/completions", {"prompt": ""}, 400, "'prompt' is empty"),
    ("/v1/completions", {"prompt": []}, 400, "'prompt' is empty"),
    ("/v1/completions", {"prompt": 5}, 400, "'prompt' must be"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "one prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "at least 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "3"}, 400, "'max_tokens' must be an integer"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, 400, "'max_tokens' must be an integer"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1024}, 400, "maximum context length is 1024"),
    ("/v1/completions", {"prompt": "x " * 1100}, 400, "maximum context length is 1024"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "'temperature' must be a number"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "seed": "1"}, 400, "'seed' must be an integer"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "'stop'"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop strings"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "'n'"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "'stream' must be a boolean"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "'logprobs' must be in"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    ("/v1/chat/completions", {"messages": []}, 400, "'messages'"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "'messages'"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "'role'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "'logprobs': true"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}, 400,
     "at least 1"),
]


def test_invalid_requests_get_clear_errors(demo):
    for path, body, status, fragment in BAD:
        r = post(demo.url, path, body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert fragment in error["message"] and error["type"], (body, error)
    assert metrics(demo.url)['epinfer_http_requests_total{endpoint="completions",code="400"}'] >= 20
    r = post(demo.url, "/v1/completions", {"prompt": "Now is better", "max_tokens": 3, "frobnicate": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1  # unknown fields ignored
    assert httpx.get(f"{demo.url}/health").status_code == 200


def routed(url: str) -> list[float]:
    m = metrics(url)
    return [m[f'epinfer_routed_requests_total{{replica="{r}"}}'] for r in (0, 1)]


def test_routing_to_fewest_outstanding_tokens(demo):
    wait_idle(demo.url, SEQS_PER_REPLICA)
    before = routed(demo.url)
    long = {"prompt": "Beautiful", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{demo.url}/v1/completions", json=long, timeout=60) as r:
        events = sse_events(r)  # keep it referenced: closing the generator closes the connection
        next(events)  # running: ~400 tokens outstanding on the replica it went to
        assert [a - b for a, b in zip(routed(demo.url), before, strict=True)] == [1, 0]  # a tie goes to replica 0
        for _ in range(3):
            short = post(demo.url, "/v1/completions", {"prompt": "Flat is", "max_tokens": 4})
            assert short.status_code == 200
        assert [a - b for a, b in zip(routed(demo.url), before, strict=True)] == [1, 3]
        assert next(events)["choices"][0]["finish_reason"] is None  # still running


def test_disconnect_cancels_and_frees_slots(demo):
    start = wait_idle(demo.url, SEQS_PER_REPLICA)
    long = {"prompt": "Beautiful", "max_tokens": 900, "ignore_eos": True}
    with httpx.stream("POST", f"{demo.url}/v1/completions", json={**long, "stream": True}, timeout=60) as r:
        events = sse_events(r)
        for _ in range(3):
            next(events)
    with pytest.raises(httpx.ReadTimeout):  # the non-streaming client gives up
        post(demo.url, "/v1/completions", long, timeout=1.5)
    end = wait_idle(demo.url, SEQS_PER_REPLICA, timeout=30)
    key = 'epinfer_requests_finished_total{reason="cancelled"}'
    assert end.get(key, 0) - start.get(key, 0) == 2
    for r in ("0", "1"):
        assert end[f'epinfer_free_kv_blocks{{replica="{r}"}}'] == start[f'epinfer_free_kv_blocks{{replica="{r}"}}']
    assert end["epinfer_generation_tokens_total"] - start["epinfer_generation_tokens_total"] < 2 * 900 - 200
    assert post(demo.url, "/v1/completions", {"prompt": "Simple is", "max_tokens": 3}).status_code == 200


# --- short-lived servers ---------------------------------------------------------------------------

def stream_ids(url: str, body: dict, started) -> list[int]:
    ids = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=300) as r:
        assert r.status_code == 200
        for event in sse_events(r):
            assert "error" not in event, event
            ids += event["choices"][0]["token_ids"]
            started.set()
    return ids


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
        assert (dumps / "rank0.jsonl").is_file()
    finally:
        server.kill()


def test_bad_start_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "epinfer", "serve", "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "epinfer", "serve", "--port", str(port)],
                              capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2 and "cannot listen on 127.0.0.1" in proc.stderr, proc.stderr


def test_sigterm_timeout_ends_what_is_left(tmp_path):
    """dp=1 (one rank, no collectives): a request still running when --shutdown-timeout runs out
    ends with an error event, and the server still exits 0."""
    import threading

    server = Served(["--shutdown-timeout", "1"], tmp_path / "serve.log")
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
        reader.join(60)
        assert not reader.is_alive()
        assert "shut down before this request finished" in events[-1]["error"]["message"]
        assert sum(len(e["choices"][0]["token_ids"]) for e in events[:-1]) < 1000
        assert server.wait(60) == 0, server.output()
    finally:
        server.kill()
