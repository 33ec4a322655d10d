"""`epinfer serve` on CPU / Gloo: one dp=2 server on the shipped demo model (synchronous, then with
async scheduling) answers many cases
(the official `openai` client, 64 concurrent requests equal to offline `LLM.generate`, seeded
sampling, streaming, logprobs, validation, routing, disconnects). Lifecycle cases (queue limit,
SIGTERM, rank failure, bad start) are in test_server_lifecycle.py, the text units (stop strings,
deltas, chat templates, logprob bytes) in test_server_text.py, the units without a server process
(routing, the queue, tokenizer lanes, the API key) in test_server_units.py."""

from __future__ import annotations

import asyncio
import codecs
import re
import signal
import socket
import this
import time

import httpx
import pytest
import torch

from epinfer import LLM, SamplingParams
from epinfer.server.protocol import chat_prompt_ids
from tests.serving import Served, gather_requests, metrics, post, sse_events, wait_idle

ZEN = [ln for ln in codecs.decode(this.s, "rot13").splitlines()[2:] if ln.strip()]
SEQS_PER_REPLICA = 8


# --- the shared dp=2 demo server -----------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_llm():
    return LLM()


@pytest.fixture(scope="module", params=[[], ["--async-scheduling"]], ids=["sync", "async"])
def demo(tmp_path_factory, request):
    """Every served case runs twice: synchronous steps, and async scheduling (a step's tokens are
    learnt while the next step runs; a request asking for logprobs makes its steps synchronous)."""
    log = tmp_path_factory.mktemp("serve") / "demo.log"
    server = Served(["--dp", "2", "--max-num-seqs", str(SEQS_PER_REPLICA), "--max-queue", "64", *request.param], log)
    yield server
    server.proc.send_signal(signal.SIGTERM)
    code = server.wait(60)
    assert code == 0, server.output()


def test_models_health_metrics(demo):
    assert ("async scheduling" in demo.output()) == ("--async-scheduling" in demo.args)
    # the serving line says what a replica's KV cache holds
    assert re.search(r"KV cache [\d,]+ tokens a replica: room for \d+\.\d requests of that length at once, "
                     rf"{SEQS_PER_REPLICA} sequences at most\)", demo.output()), demo.output()
    models = httpx.get(f"{demo.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["epinfer-demo"] and models["data"][0]["max_model_len"] == 1024
    assert httpx.get(f"{demo.url}/v1/models/epinfer-demo").json() == models["data"][0]
    missing = httpx.get(f"{demo.url}/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{demo.url}/health").json()["status"] == "ok"
    m = metrics(demo.url)
    for name in ("epinfer_healthy", "epinfer_queue_depth", 'epinfer_running_requests{replica="1"}',
                 'epinfer_free_kv_blocks{replica="0"}', "epinfer_prompt_tokens_total",
                 "epinfer_generation_tokens_total",
                 'epinfer_collective_skew_max_seconds{label="dp.sync"}', 'epinfer_step_seconds_count{replica="0"}',
                 'epinfer_prefix_cache_queries_total{replica="0"}', 'epinfer_prefix_cache_hits_total{replica="1"}',
                 'epinfer_prefix_cache_hit_rate{replica="0"}', 'epinfer_prefix_cache_blocks{replica="1"}',
                 'epinfer_prefix_cache_evictions_total{replica="0"}',
                 'epinfer_prefix_cache_state_snapshots{replica="1"}',
                 'epinfer_prefix_cache_snapshot_evictions_total{replica="0"}',
                 'epinfer_prefix_cache_snapshot_captures_total{replica="1"}'):
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
    kept = {"include_stop_str_in_output": True}  # (vLLM's extension, as the client passes it)
    whole = client.completions.create(model="epinfer-demo", prompt=prompt, max_tokens=30, stop=["complex"],
                                      extra_body=kept)
    chunks = list(client.completions.create(model="epinfer-demo", prompt=prompt, max_tokens=30, stop=["complex"],
                                            stream=True, extra_body=kept))
    assert whole.choices[0].text == want.text + "complex" == "".join(c.choices[0].text for c in chunks)

    messages = [{"role": "system", "content": "Recite."}, {"role": "user", "content": "Flat is better"}]
    tok = demo_llm.tokenizer
    ids = chat_prompt_ids(tok, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    want = demo_llm.generate([ids], SamplingParams(max_tokens=25))[0]
    chat = client.chat.completions.create(model="epinfer-demo", messages=messages, max_tokens=25)
    assert chat.choices[0].message.content == want.text and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(ids) and chat.choices[0].finish_reason == want.finish_reason
    stream = client.chat.completions.create(model="epinfer-demo", messages=messages, max_tokens=25, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want.text
    # the template's own switches: no generation prompt, or the last (assistant) message continued
    partial = [*messages, {"role": "assistant", "content": "Flat is better than"}]
    for extra in ({"add_generation_prompt": False}, {"add_generation_prompt": False, "continue_final_message": True}):
        text = tok.apply_chat_template(partial, tokenize=False, **extra)
        ids = chat_prompt_ids(tok, text)
        want = demo_llm.generate([ids], SamplingParams(max_tokens=8))[0]
        got = client.chat.completions.create(model="epinfer-demo", messages=partial, max_tokens=8, extra_body=extra)
        assert got.usage.prompt_tokens == len(ids) and got.choices[0].message.content == want.text, extra
    assert text.endswith("Flat is better than")  # (continued: no end of turn after it)


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
    # penalties (Qwen's cards suggest presence_penalty against repetition), half of the rows greedy
    penalties = [{"presence_penalty": 1.5, "frequency_penalty": 0.5 * (i % 3), "repetition_penalty": 1.0 + 0.1 * i}
                 for i in range(12)]
    bodies = [{**b, **pen, **({"temperature": 0} if i % 2 else {})}
              for i, (b, pen) in enumerate(zip(bodies, penalties, strict=True))]
    params = [SamplingParams(max_tokens=24, temperature=0 if i % 2 else 1.0, top_k=50, top_p=0.95, seed=1000 + i,
                             ignore_eos=True, **pen) for i, pen in enumerate(penalties)]
    want = demo_llm.generate([b["prompt"] for b in bodies], params)
    assert [g["token_ids"] for g in asyncio.run(gather_requests(demo.url, bodies))] == [w.token_ids for w in want]
    assert [w.token_ids for w in want[1::2]] != [g.token_ids for g in greedy[1::2]]  # the penalties acted


def test_n_choices(demo, demo_llm):
    """'n': each choice an engine request, choice i seeded with seed + i (equal to offline runs with
    those seeds), indexed in the answer and in the stream's chunks (a role chunk for each in chat);
    usage counts the prompt once and every choice's tokens. A batch of prompts: n choices each."""
    prompt, n = ZEN[3], 3
    want = demo_llm.generate([prompt] * n, [SamplingParams(max_tokens=12, temperature=1.0, seed=77 + i,
                                                          ignore_eos=True) for i in range(n)])
    assert len({tuple(w.token_ids) for w in want}) > 1  # the choices differ
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 1.0, "seed": 77, "ignore_eos": True, "n": n}
    whole = post(demo.url, "/v1/completions", body).json()
    assert [c["index"] for c in whole["choices"]] == list(range(n))
    assert [c["token_ids"] for c in whole["choices"]] == [w.token_ids for w in want]
    assert [c["text"] for c in whole["choices"]] == [w.text for w in want]
    assert whole["usage"]["prompt_tokens"] == len(want[0].prompt_token_ids)
    assert whole["usage"]["completion_tokens"] == 12 * n
    with httpx.stream("POST", f"{demo.url}/v1/completions", timeout=120,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = list(sse_events(r))
    ids, text = [[] for _ in range(n)], [""] * n
    for e in events:
        for c in e["choices"]:
            ids[c["index"]] += c["token_ids"]
            text[c["index"]] += c["text"]
    assert ids == [w.token_ids for w in want] and text == [w.text for w in want]
    assert events[-1]["usage"]["completion_tokens"] == 12 * n
    messages = [{"role": "user", "content": "Recite"}]
    with httpx.stream("POST", f"{demo.url}/v1/chat/completions", timeout=120,
                      json={"messages": messages, "max_tokens": 8, "n": 2, "stream": True}) as r:
        events = list(sse_events(r))
    roles = [c["index"] for e in events for c in e["choices"] if c["delta"].get("role") == "assistant"]
    content = ["".join(c["delta"].get("content", "") for e in events for c in e["choices"] if c["index"] == i)
               for i in range(2)]
    chat = post(demo.url, "/v1/chat/completions", {"messages": messages, "max_tokens": 8}).json()
    assert roles == [0, 1] and content == [chat["choices"][0]["message"]["content"]] * 2  # greedy: the same
    # a batch of prompts (OpenAI's completions): each prompt's n choices in a row, indexed in that order
    batch = [ZEN[5], [5, 6, 7]]
    want = demo_llm.generate([p for p in batch for _ in range(2)],
                             [SamplingParams(max_tokens=6, temperature=1.0, seed=9 + i, ignore_eos=True)
                              for _ in batch for i in range(2)])
    got = post(demo.url, "/v1/completions", {"prompt": batch, "n": 2, "max_tokens": 6, "temperature": 1.0,
                                             "seed": 9, "ignore_eos": True}).json()
    assert [c["index"] for c in got["choices"]] == [0, 1, 2, 3]
    assert [c["token_ids"] for c in got["choices"]] == [w.token_ids for w in want]
    assert got["usage"]["prompt_tokens"] == len(want[0].prompt_token_ids) + 3


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
    # the stream's text offsets are the whole answer's, also where a stop string's start is held back
    held = {"prompt": "Beautiful is", "max_tokens": 6, "temperature": 0, "logprobs": 0, "stop": "than pretty"}
    whole = post(demo.url, "/v1/completions", held).json()["choices"][0]["logprobs"]
    offsets = []
    with httpx.stream("POST", f"{demo.url}/v1/completions", json={**held, "stream": True}, timeout=60) as r:
        for event in sse_events(r):
            offsets += (event["choices"][0]["logprobs"] or {}).get("text_offset", [])
    assert offsets == whole["text_offset"] and len(offsets) > 2, (offsets, whole)
    # each top_logprobs entry holds the sampled token, chosen or not (up to logprobs + 1 entries)
    hot = post(demo.url, "/v1/completions", {"prompt": "Beautiful is", "max_tokens": 6, "temperature": 3.0,
                                            "seed": 1, "logprobs": 1}).json()["choices"][0]["logprobs"]
    assert all(tok in top and top[tok] == got and 1 <= len(top) <= 2
               for tok, got, top in zip(hot["tokens"], hot["token_logprobs"], hot["top_logprobs"], strict=True))
    assert any(len(top) == 2 for top in hot["top_logprobs"]), hot  # at temperature 3 some token is not the top
    chat = post(demo.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                                   "logprobs": True, "top_logprobs": 2}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"]
    assert all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 and c["bytes"] == list(c["token"].encode())
               for c in content)
    plain = post(demo.url, "/v1/completions", {"prompt": prompt, "max_tokens": 2}).json()
    assert plain["choices"][0]["logprobs"] is None


def test_echo_and_prompt_logprobs(demo, demo_llm):
    """The prompt's logprobs as lm-eval-harness asks for them (echo, logprobs, max_tokens 1 or 0) and
    as vLLM's `prompt_logprobs`, against the engine's offline prompt logprobs; echo streamed."""
    prompt = "Sparse is better than dense."
    offline = demo_llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2))[0]
    ids, records = offline.prompt_token_ids, offline.prompt_logprobs
    n = len(ids)
    body = {"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 1, "temperature": 0}
    answer = post(demo.url, "/v1/completions", body).json()["choices"][0]
    lp = answer["logprobs"]
    assert answer["text"].startswith(prompt) and len(lp["tokens"]) == n + 1 == len(lp["text_offset"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert "".join(lp["tokens"][:n]) == prompt and lp["text_offset"][n] == len(prompt)
    for got, top, rec in zip(lp["token_logprobs"][1:n], lp["top_logprobs"][1:n], records[1:], strict=True):
        assert abs(got - rec[0]) < 1e-4 and 2 <= len(top) <= 3
        assert all(abs(a - b) < 1e-4 for a, b in zip(sorted(top.values(), reverse=True)[:2],
                                                      [v for _, v in rec[2]], strict=True))
    only = post(demo.url, "/v1/completions", {**body, "max_tokens": 0}).json()
    assert only["choices"][0]["text"] == prompt and only["usage"]["completion_tokens"] == 0
    assert only["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][:n]
    assert only["choices"][0]["finish_reason"] == "length" and only["choices"][0]["token_ids"] == []
    vllm = post(demo.url, "/v1/completions", {"prompt": prompt, "prompt_logprobs": 1, "max_tokens": 2}).json()
    pl = vllm["choices"][0]["prompt_logprobs"]
    assert len(pl) == n and pl[0] is None and not vllm["choices"][0]["text"].startswith(prompt)
    for entry, token, rec in zip(pl[1:], ids[1:], records[1:], strict=True):
        assert abs(entry[str(token)]["logprob"] - rec[0]) < 1e-4 and entry[str(token)]["rank"] == rec[1]
        best = rec[2][0][0]
        assert entry[str(best)]["rank"] == 1 and len(entry) <= 2
    chat = post(demo.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                   "prompt_logprobs": 0}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert all(len(entry) == 1 and next(iter(entry.values()))["logprob"] <= 0 for entry in chat["prompt_logprobs"][1:])
    text = ""
    with httpx.stream("POST", f"{demo.url}/v1/completions", timeout=60,
                      json={"prompt": prompt, "echo": True, "max_tokens": 4, "temperature": 0, "stream": True}) as r:
        for event in sse_events(r):
            text += event["choices"][0]["text"] if event["choices"] else ""
    whole = post(demo.url, "/v1/completions", {"prompt": prompt, "echo": True, "max_tokens": 4, "temperature": 0})
    assert text == whole.json()["choices"][0]["text"] and text.startswith(prompt) and len(text) > len(prompt)


def test_guided_choice(demo):
    choices = ["yes", "no", "maybe so"]
    for extra in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        for path, prompt in (("/v1/completions", {"prompt": "The answer is"}),
                             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            answer = post(demo.url, path, {"max_tokens": 12, "temperature": 1.0, "seed": 4, **extra, **prompt}).json()
            text = answer["choices"][0]["text" if "prompt" in prompt else "message"]
            assert (text if "prompt" in prompt else text["content"]) in choices, answer


def test_json_mode(demo):
    import json

    for path, prompt in (("/v1/completions", {"prompt": "The answer is"}),
                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        body = {"max_tokens": 40, "temperature": 0, "response_format": {"type": "json_object"}, **prompt}
        choice = post(demo.url, path, body).json()["choices"][0]
        text = choice["text"] if "prompt" in prompt else choice["message"]["content"]
        assert text.startswith("{") and (choice["finish_reason"] != "stop" or isinstance(json.loads(text), dict))


def test_json_schema(demo):
    import json

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}}}
    for path, prompt, extra in (
            ("/v1/completions", {"prompt": "Beautiful is"}, {"guided_json": schema}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
             {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})):
        body = {"max_tokens": 300, "temperature": 1.0, "seed": 3, **prompt, **extra}
        choice = post(demo.url, path, body).json()["choices"][0]
        value = json.loads(choice["text"] if "prompt" in prompt else choice["message"]["content"])
        assert list(value) == ["ok", "n"] and type(value["ok"]) is bool and type(value["n"]) is int


def test_allowed_token_ids(demo):
    allowed = [72, 101, 108, 111]
    body = {"max_tokens": 12, "temperature": 1.0, "seed": 3, "ignore_eos": True, "allowed_token_ids": allowed}
    for path, prompt in (("/v1/completions", {"prompt": "Beautiful is"}),
                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        answer = post(demo.url, path, {**body, **prompt}).json()
        ids = answer["choices"][0]["token_ids"]
        assert len(ids) == 12 and set(ids) <= set(allowed), answer


BAD = [
    ("/v1/completions", b'{"prompt": "x", ', 400, "malformed JSON"),
    ("/v1/completions", [1, 2], 400, "JSON object"),
    ("/v1/completions", {"max_tokens": 3}, 400, "'prompt' is required"),
    ("/v1/completions", {"prompt": ""}, 400, "'prompt' is empty"),
    ("/v1/completions", {"prompt": []}, 400, "'prompt' is empty"),
    ("/v1/completions", {"prompt": 5}, 400, "'prompt' must be"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": ["a", ""]}, 400, "'prompt[1]' is empty"),
    ("/v1/completions", {"prompt": ["a", [1, 99999]]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": ["a", "b " * 1100]}, 400, "prompt 1 has"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "at least 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "3"}, 400, "'max_tokens' must be an integer"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, 400, "'max_tokens' must be an integer"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1024}, 400, "maximum context length is 1024"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10 ** 39}, 400, "maximum context length is 1024"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1' + b"0" * 4299 + b"}", 400, "integer of 4300 digits"),
    ("/v1/completions", {"prompt": [1, -10 ** 50]}, 400, "integer of 51 digits"),
    ("/v1/completions", {"prompt": "x " * 1100}, 400, "maximum context length is 1024"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "'temperature' must be a number"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "seed": "1"}, 400, "'seed' must be an integer"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "'stop'"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop strings"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "'n' must be in [1, 128], got 0"),
    ("/v1/completions", {"prompt": "x", "n": 100}, 400,
     "asks for 100 choices (prompts x 'n'), more than the queue holds (64"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"a5": -100}}, 400, "logit_bias keys must be token ids"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, 400, "token id 99999 is outside the vocabulary"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 200}}, 400, "logit_bias value must be in [-100, 100]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "echo": True}, 400,
     "'echo' is not supported for chat"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 21}, 400, "'prompt_logprobs' must be in [0, 20]"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True}, 400, "not available with 'stream'"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1, "stream": True}, 400, "not available with"),
    ("/v1/completions", {"prompt": "x", "best_of": 2}, 400, "'best_of' is not supported"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": []}, 400, "'allowed_token_ids' must be a non-empty"),
    ("/v1/completions", {"prompt": "x", "guided_choice": []}, 400, "choices must be a list of 1 to 64"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"grammar": "a"}}, 400, "'json' or 'regex'"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"json": {"type": "x"}}}, 400, "schema: type must"),
    ("/v1/completions", {"prompt": "x", "guided_json": {"type": "object", "minProperties": 1}}, 400,
     "json_schema: schema: minProperties not supported"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {}}}, 400,
     "'response_format' must be"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "(?=a)"}, 400, "regex: '(?' groups"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [5, 99999]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [99999]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "min_tokens": 3}, 400, "must not exceed max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"tokenize": 1}},
     400, "'chat_template_kwargs' keys"),
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
    ("/tokenize", {"prompt": "x", "messages": []}, 400, "exactly one of 'prompt' or 'messages'"),
    ("/tokenize", {"prompt": ""}, 400, "'prompt' is empty"),
    ("/tokenize", {"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    ("/detokenize", {"tokens": [1, 99999]}, 400, "outside the vocabulary"),
    ("/detokenize", {"tokens": "abc"}, 400, "'tokens' must be a non-empty array"),
]


def test_tokenize_and_detokenize(demo, demo_llm):
    """/tokenize gives the ids a request's prompt gets (text with special tokens or without, chat
    messages through the template), /detokenize their text; /version answers."""
    tok = demo_llm.tokenizer
    text = "Beautiful is better than ugly."
    got = post(demo.url, "/tokenize", {"prompt": text}).json()
    assert got["tokens"] == tok(text)["input_ids"] and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == 1024
    bare = post(demo.url, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert bare == tok(text, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "Recite"}]
    chat = post(demo.url, "/tokenize", {"messages": messages}).json()["tokens"]
    assert chat == chat_prompt_ids(tok, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert post(demo.url, "/detokenize", {"tokens": bare}).json() == {"prompt": tok.decode(bare)}
    assert httpx.get(f"{demo.url}/version").json()["version"]
    assert metrics(demo.url)['epinfer_http_requests_total{endpoint="tokenize",code="200"}'] >= 3


def test_invalid_requests_get_clear_errors(demo):
    for path, body, status, fragment in BAD:
        r = post(demo.url, path, body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert fragment in error["message"] and error["type"], (body, error)
    assert metrics(demo.url)['epinfer_http_requests_total{endpoint="completions",code="400"}'] >= 20
    forced = post(demo.url, "/v1/completions", {"prompt": "Now is better", "max_tokens": 3, "temperature": 0,
                                                "logit_bias": {"5": 100}}).json()["choices"][0]["token_ids"]
    assert forced == [5, 5, 5]  # OpenAI's logit_bias
    r = post(demo.url, "/v1/completions", {"prompt": "Now is better", "max_tokens": 3, "frobnicate": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1  # unknown fields ignored
    body = {"prompt": "Now is better", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    free = post(demo.url, "/v1/completions", body).json()["choices"][0]["token_ids"]
    stopped = post(demo.url, "/v1/completions", {**body, "stop_token_ids": [free[1]]}).json()["choices"][0]
    assert stopped["token_ids"] == free[:free.index(free[1]) + 1] and stopped["finish_reason"] == "stop"
    held = post(demo.url, "/v1/completions", {**body, "stop_token_ids": [free[1]], "min_tokens": 6}).json()
    assert free[1] not in held["choices"][0]["token_ids"] and held["usage"]["completion_tokens"] == 6
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
    with httpx.stream("POST", f"{demo.url}/v1/completions", json={**long, "stream": True, "n": 2},
                      timeout=60) as r:  # every choice of a stream is cancelled
        events = sse_events(r)
        for _ in range(4):
            next(events)
    host, port = demo.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:  # gone before its body arrives: no traceback
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\":")
        time.sleep(0.2)
    end = wait_idle(demo.url, SEQS_PER_REPLICA, timeout=30)
    assert "Traceback" not in demo.output() and "ClientDisconnect" not in demo.output()
    key = 'epinfer_requests_finished_total{reason="cancelled"}'
    assert end.get(key, 0) - start.get(key, 0) == 4
    for r in ("0", "1"):
        assert end[f'epinfer_free_kv_blocks{{replica="{r}"}}'] == start[f'epinfer_free_kv_blocks{{replica="{r}"}}']
    assert end["epinfer_generation_tokens_total"] - start["epinfer_generation_tokens_total"] < 4 * 900 - 400
    assert post(demo.url, "/v1/completions", {"prompt": "Simple is", "max_tokens": 3}).status_code == 200
