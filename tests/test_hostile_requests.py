"""Hostile or careless requests: the Python API and the HTTP server (the command line:
`test_hostile_cli`). Every bad value gets one clear line (exit 2) or an OpenAI error body (4xx); a request
whose sampling fails (non-finite logits) fails alone; the server keeps serving in the same process."""

from __future__ import annotations

import json
import random
import re
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from epinfer import LLM, SamplingParams
from epinfer.core.errors import UserError
from epinfer.runner.sampler import _filtered_probs, nonfinite_rows, sample_tokens
from tests.serving import Served, post, sse_events

# --- the shared validation ---------------------------------------------------------------------

BAD_PARAMS = [
    (dict(seed=2**64), "seed must be an integer in [0, 18446744073709551615]"),
    (dict(seed=-1), "seed must be an integer in"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(temperature=True), "temperature must be a number"),
    (dict(temperature="0.7"), "temperature must be a number"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(top_p=float("nan")), "top_p must be a finite number"),
    (dict(top_k=-2), "top_k must be -1, 0 (off) or positive"),
    (dict(top_k=2**40), "top_k must be -1, 0 (off) or positive"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(max_tokens="3"), "max_tokens must be an integer"),
    (dict(stop=[""]), "stop strings must be non-empty"),
    (dict(stop=["a\ud800"]), "stop is not valid Unicode"),
    (dict(stop=["x"] * 33), "at most 32"),
    (dict(stop=5), "stop must be a string or a list"),
    (dict(stop_token_ids=[-1]), "stop_token_ids must be an integer >= 0"),
    (dict(ignore_eos="yes"), "ignore_eos must be a boolean"),
]


@pytest.mark.parametrize("kwargs,fragment", BAD_PARAMS, ids=[repr(k) for k, _ in BAD_PARAMS])
def test_sampling_params_validation(kwargs, fragment):
    with pytest.raises(UserError) as err:
        SamplingParams(**kwargs).resolved({})
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_sampling_params_accept_edges():
    import numpy as np

    p = SamplingParams(max_tokens=np.int64(3), temperature=1e-300, top_p=1.0, top_k=-1, seed=2**64 - 1,
                       stop="ab").resolved({})
    assert (p.max_tokens, p.seed, p.stop) == (3, 2**64 - 1, ["ab"]) and type(p.max_tokens) is int
    with pytest.raises(UserError, match="top_k must be an integer"):  # a bad default is caught too
        SamplingParams().resolved({"top_k": "20"})


def test_sampler_survives_nonfinite_rows_and_extreme_temperatures():
    """NaN / Inf rows are flagged and still draw (a stand-in distribution, no exception, batched or
    one row at a time); a temperature below fp32's range is greedy, a huge finite one is finite, a
    top_p below fp32's range keeps the most likely token."""
    torch.manual_seed(0)
    logits = torch.randn(5, 40) * 4
    logits[1, 3] = float("nan")
    logits[3, 7] = float("inf")
    params = [SamplingParams(temperature=t, top_p=p, top_k=k).resolved({})
              for t, p, k in [(1.0, 0.9, 0), (1.0, 1.0, 0), (1e-50, 1e-300, 0), (0.7, 0.5, 5), (1e30, 1.0, 3)]]
    bad = nonfinite_rows(logits)
    assert bad.tolist() == [False, True, False, True, False]
    tiny_p = _filtered_probs(logits[:1], [SamplingParams(temperature=1.0, top_p=1e-300).resolved({})])
    assert tiny_p[0].tolist() == torch.nn.functional.one_hot(logits[0].argmax(), 40).float().tolist()
    for batched in (True, False):
        gens = [torch.Generator().manual_seed(i) for i in range(5)]
        tokens = sample_tokens(logits, params, gens if not batched else [None] * 5, batched)
        assert tokens[2] == logits[2].argmax()  # 1e-50 is greedy, not NaN
        assert all(0 <= t < 40 for t in tokens.tolist())
    probs = _filtered_probs(logits, params, bad)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(5))
    assert (probs[4] > 0).sum() == 3  # a huge temperature is uniform over the top-k, still finite


@pytest.fixture(scope="module")
def demo_llm():
    return LLM()


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_nan_logits_fail_one_request_alone(async_scheduling, demo_llm):
    """One request's logits turn NaN at its third token: it ends with an error naming the cause;
    the others in the same steps (greedy, seeded, a 1e-50 temperature) are what they are alone."""
    llm = LLM(async_scheduling=async_scheduling) if async_scheduling else demo_llm
    runner = llm.engine.runner
    execute, calls = runner.execute, [0]

    def broken(plan, *args, **kwargs):
        logits = execute(plan, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 3:
            logits = logits.clone()
            logits[1] = float("nan")
        return logits

    prompts = ["Beautiful is", "Flat is", "Sparse"]
    params = [SamplingParams(max_tokens=8, temperature=0), SamplingParams(max_tokens=8, temperature=1.0, seed=3),
              SamplingParams(max_tokens=8, temperature=1e-50, seed=1)]
    runner.execute = broken
    try:
        outs = llm.generate(prompts, params)
    finally:
        del runner.execute
    assert outs[1].finish_reason == "error" and "non-finite logits" in outs[1].error and outs[1].nan_logits
    assert len(outs[1].token_ids) == 2
    alone = llm.generate([prompts[0], prompts[2]], [params[0], SamplingParams(max_tokens=8, temperature=0)])
    assert [outs[0].token_ids, outs[2].token_ids] == [o.token_ids for o in alone]
    assert all(o.finish_reason == "length" and o.error is None for o in (outs[0], outs[2]))
    again = llm.generate(prompts[1], params[1])[0]  # the engine is fine afterwards
    assert again.finish_reason == "length" and len(again.token_ids) == 8


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("where", ["forward", "sampling"])
def test_exception_in_a_step_leaves_the_llm_usable(where, async_scheduling, monkeypatch):
    """An exception inside a step (a broken kernel, an interrupt) reaches the caller; the call's
    requests end and free their cache, and the next call gives what a fresh engine gives."""
    import epinfer.engine.engine as engine_module

    llm = LLM(async_scheduling=async_scheduling, max_num_batched_tokens=16)
    prompts = ["Beautiful is better than ugly. Explicit is better", "Flat is", "Sparse is better"]
    params = SamplingParams(max_tokens=6, temperature=0)
    calls = [0]

    def count() -> bool:
        calls[0] += 1
        return calls[0] == 3

    if where == "forward":
        execute = llm.engine.runner.execute
        monkeypatch.setattr(llm.engine.runner, "execute", lambda *a, **k: (
            (_ for _ in ()).throw(KeyboardInterrupt()) if count() else execute(*a, **k)))
        raised = KeyboardInterrupt
    else:
        sample = engine_module.sample_tokens
        monkeypatch.setattr(engine_module, "sample_tokens", lambda *a, **k: (
            (_ for _ in ()).throw(RuntimeError("broken sampler")) if count() else sample(*a, **k)))
        raised = RuntimeError
    with pytest.raises(raised):
        llm.generate(prompts, params)
    monkeypatch.undo()
    sched = llm.engine.scheduler
    assert not sched.running and not sched.waiting and not llm.engine.inflight
    again = [o.token_ids for o in llm.generate(prompts, params)]
    assert again == [o.token_ids for o in LLM(async_scheduling=async_scheduling).generate(prompts, params)]


@pytest.mark.parametrize("step", ["snapshot copy", "capture"])
def test_failed_step_leaves_no_unwritten_state_snapshot(step):
    """Hybrid model, prefix caching: a step that was to copy (or capture) a GDN state snapshot fails
    before its forward; a later prompt sharing that prefix must not restore the unwritten row."""
    prefix = ("Explicit is better than implicit. Simple is better than complex. Complex is better than "
              "complicated. Flat is better than nested. Sparse is better than dense.") * (4 if step == "capture" else 1)
    longer = prefix + " Readability counts. Special cases aren't special enough"
    params = SamplingParams(max_tokens=6, temperature=0)

    def logits_of(llm, prompt, fail=None):
        execute, seen = llm.engine.runner.execute, []

        def watched(plan, *args, **kwargs):
            if fail is not None and fail(plan):
                raise KeyboardInterrupt
            seen.append(execute(plan, *args, **kwargs).clone())
            return seen[-1]

        llm.engine.runner.execute = watched
        try:
            tokens = llm.generate(prompt, params)[0].token_ids
        finally:
            del llm.engine.runner.execute
        return tokens, torch.cat([x for x in seen if x.numel()])[-6:]

    llm = LLM()
    wanted = (lambda plan: bool(plan.snapshots)) if step == "snapshot copy" else (
        lambda plan: any(item.captures for item in plan.items))
    with pytest.raises(KeyboardInterrupt):
        logits_of(llm, prefix, wanted)
    assert not llm.engine.scheduler.allocator.unready  # (a row reserved for a capture that never ran: lost)
    tokens, logits = logits_of(llm, longer)
    want_tokens, want_logits = logits_of(LLM(max_num_batched_tokens=llm.engine.ecfg.max_num_batched_tokens), longer)
    assert tokens == want_tokens and torch.allclose(logits, want_logits, atol=1e-4), (logits - want_logits).abs().max()


def test_api_engine_fields_are_checked(ckpt_dir):
    """Every EngineConfig field of the wrong type or range is one UserError naming it, before the
    planner divides by it or casts it; stop strings need a tokenizer."""
    for kw, fragment in [(dict(block_size=0), "block_size must be an integer >= 1"),
                         (dict(block_size=16.0), "block_size must be an integer"),
                         (dict(cache_memory_gb=float("nan")), "(--cache-memory-gb) must be a finite number > 0"),
                         (dict(max_num_batched_tokens=1.5), "(--max-num-batched-tokens) must be an integer"),
                         (dict(max_model_len="100"), "max_model_len (--max-model-len) must be an integer >= 2"),
                         (dict(prefix_state_snapshots=-1), "prefix_state_snapshots must be an integer >= 1"),
                         (dict(gpu_memory_utilization=0), "(--gpu-memory-utilization) must be in (0, 1]"),
                         (dict(enable_prefix_caching="no"), "enable_prefix_caching must be True or False")]:
        with pytest.raises(UserError, match=re.escape(fragment)):
            LLM(**kw)
    assert LLM(max_num_seqs=np.int64(4), cache_memory_gb=np.float32(0.5)).engine.ecfg.max_num_seqs == 4
    llm = LLM(str(ckpt_dir("qwen3_moe")), dtype="float32", device="cpu")  # (no tokenizer)
    with pytest.raises(UserError, match="stop strings need a tokenizer"):
        llm.generate([[1, 2]], SamplingParams(max_tokens=2, stop=["x"]))


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_min_tokens_holds_back_stop_ids_and_strings(async_scheduling, demo_llm):
    """Until min_tokens are out, a stop token id is never sampled (greedy and seeded alike) and a
    stop string does not end the request; then both apply again."""
    llm = LLM(async_scheduling=True) if async_scheduling else demo_llm
    free = llm.generate("Beautiful is", SamplingParams(max_tokens=30, temperature=0))[0].token_ids
    stop_id = free[2]
    stopped = llm.generate("Beautiful is", SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop_id]))
    assert stopped[0].token_ids == free[:3] and stopped[0].finish_reason == "stop"
    for params in (SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop_id], min_tokens=5),
                   SamplingParams(max_tokens=30, temperature=0.9, seed=4, stop_token_ids=[stop_id], min_tokens=5)):
        out = llm.generate("Beautiful is", params)[0]
        assert stop_id not in out.token_ids[:5] and len(out.token_ids) >= 5
        assert out.finish_reason == "length" or out.token_ids.index(stop_id) == len(out.token_ids) - 1
    text = llm.tokenizer.decode(free[:2])
    held = llm.generate("Beautiful is", SamplingParams(max_tokens=30, temperature=0, stop=[text], min_tokens=5))[0]
    # the match inside the first 5 tokens' text does not count; the next one, past them, does
    assert held.finish_reason == "stop" and len(held.token_ids) > 5 and held.token_ids == free[:len(held.token_ids)]
    assert held.text.count(text) == 1 and held.text.startswith(text)
    with pytest.raises(UserError, match=re.escape("min_tokens (7) must not exceed max_tokens (6)")):
        llm.generate("Beautiful is", SamplingParams(max_tokens=6, min_tokens=7))
    unset = llm.generate("Beautiful is", SamplingParams(temperature=0, min_tokens=300))[0]  # (default 256: raised)
    assert len(unset.token_ids) == 300 and unset.finish_reason == "length"


def test_one_generate_at_a_time(demo_llm):
    """A second generate while one runs (here from its progress callback) is a clear error; the
    running call's requests end and the LLM goes on working."""
    def again(*counts):
        if counts[0] == 0 and counts[2] == 1:
            demo_llm.generate("Flat is", SamplingParams(max_tokens=2))

    with pytest.raises(UserError, match="generate is already running on this LLM"):
        demo_llm.generate("Beautiful is", SamplingParams(max_tokens=4, temperature=0), progress=again)
    assert len(demo_llm.generate("Beautiful is", SamplingParams(max_tokens=4))[0].token_ids) == 4


def test_api_prompt_types(demo_llm):
    for prompt, fragment in [(["a", "b"], "must be a string or a list of token ids"),
                             ([1, True], "must be a string or a list of token ids"),
                             ("a\ud800", "prompt 0 is not valid Unicode"), (None, "must be a string")]:
        with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
            demo_llm.generate([prompt], SamplingParams(max_tokens=2))
    # containers that would run something else: a dict's keys as the text, a set in no order
    params = SamplingParams(max_tokens=2, temperature=0)
    for prompts, fragment in [({"a b", "c d"}, "got set"), ({"prompt": "a", "x": 1}, "takes one key"),
                              (iter(["a"]), "got list_iterator")]:
        with pytest.raises(UserError, match=fragment):
            demo_llm.generate(prompts, params)
    for params_, fragment in [({"max_tokens": 2}, "got dict"), ([{"max_tokens": 2}], "list of other types"),
                              ("ab", "got str")]:
        with pytest.raises(UserError, match=fragment):
            demo_llm.generate(["a", "b"], params_)
    # the same prompt in every form it may take: vLLM's dicts, a tuple, numpy ids
    ids = demo_llm.tokenizer("Flat is", add_special_tokens=True)["input_ids"]
    want = demo_llm.generate([ids], params)[0].token_ids
    forms = [{"prompt": "Flat is"}, {"prompt_token_ids": ids}, tuple(ids), [np.int64(t) for t in ids],
             [{"prompt_token_ids": ids}]]
    assert all(demo_llm.generate(f, params)[0].token_ids == want for f in forms)
    assert demo_llm.generate("Flat is", SamplingParams(max_tokens=2, ignore_eos=np.bool_(True)))[0].token_ids


# --- the server ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """dp=2 with async scheduling; rank 0's first sampled row at step 0 gets NaN logits."""
    log = tmp_path_factory.mktemp("hostile") / "serve.log"
    server = Served(["--dp", "2", "--max-num-seqs", "4", "--async-scheduling", "--fault", "nan-logits",
                     "--fault-rank", "0", "--fault-step", "0"], log)
    yield server
    server.proc.terminate()
    assert server.wait(60) == 0, server.output()


def assert_error_body(r: httpx.Response, status: int, fragment: str = "") -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert isinstance(error["message"], str) and "\n" not in error["message"] and error["type"], error
    assert fragment in error["message"], (fragment, error)
    assert not re.match(r"(request|prompt) \d", error["message"]), error  # (no index of the server's own)


def test_server_sampling_failure_fails_that_request_alone(hostile):
    r = post(hostile.url, "/v1/completions", {"prompt": "Beautiful is", "max_tokens": 5, "temperature": 0})
    assert_error_body(r, 500, "non-finite logits")
    assert httpx.get(f"{hostile.url}/health").status_code == 200
    ok = post(hostile.url, "/v1/completions", {"prompt": "Beautiful is", "max_tokens": 5, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5


HOSTILE_BODIES = [
    (b'{"prompt": "hi", "seed": 18446744073709551616}', 400, "seed must be an integer in"),
    (b'{"prompt": "hi", "temperature": NaN}', 400, "NaN"),
    (b'{"prompt": "hi", "temperature": Infinity}', 400, "Infinity"),
    (b'{"prompt": "hi", "temperature": -Infinity}', 400, "-Infinity"),
    (b'{"prompt": "hi", "temperature": 1e309}', 400, "overflows"),
    (b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", 400, "integer of 5001 digits"),
    (b'{"prompt": "a\\ud800b"}', 400, "'prompt' is not valid Unicode"),
    (b'{"prompt": "hi", "stop": ["\\ud800"]}', 400, "not valid Unicode"),
    (b'{"prompt": "hi", "model": "\\udfff"}', 400, "'model' is not valid Unicode"),
    (b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', 400, "'messages' is not valid Unicode"),
    (b'{"prompt": "hi", "guided_json": {"type": "object", "properties": {"\\ud800": {"type": "string"}}}}', 400,
     "'guided_json' is not valid Unicode"),
    (b'{"prompt": "hi", "guided_regex": "[\\ud800-\\udfff]"}', 400, "'guided_regex' is not valid Unicode"),
    (b'{"prompt": "hi", "\\udfff": 1}', 400, "a key of the JSON body is not valid Unicode"),
    (b'{"prompt": "hi", "max_tokens": 4, "guided_regex": "[^\\\\s\\\\S]"}', 400, "no token continues its answer"),
    # (sampled, not greedy: a row with every token masked off once stopped every rank of the server)
    (b'{"prompt": "hi", "max_tokens": 5, "temperature": 1, "allowed_token_ids": [0], "min_tokens": 5}', 400,
     "allowed_token_ids holds only ids that end the request"),
    (b'{"prompt": "hi", "max_tokens": 5, "temperature": 1, "allowed_token_ids": [67], "bad_words": ["a"]}', 400,
     "no token may come at output token 0"),  # (the demo's "a" is token 67)
    (b"[" * 10_000 + b"]" * 10_000, 400, "nested too deeply"),
    (b'{"prompt": "caf\xe9"}', 400, "malformed JSON"),
    (b"\xff\xfe\x00garbage", 400, "malformed JSON"),
    (b'{"prompt": "hi", "presence_penalty": "0.5"}', 400, "'presence_penalty' must be a number"),
    (b'{"prompt": "hi", "frequency_penalty": 3}', 400, "frequency_penalty must be in [-2, 2], got 3"),
    (b'{"prompt": "hi", "repetition_penalty": 0}', 400, "repetition_penalty must be > 0"),
    (b'{"prompt": "hi", "min_p": 2}', 400, "min_p must be in [0, 1], got 2"),
    (b'{"prompt": "hi", "top_k": 4294967296}', 400, "top_k must be"),
    (b'{"prompt": "hi", "stop": ' + json.dumps(["s"] * 40).encode() + b"}", 400, "at most 32"),
]


def test_server_hostile_bodies(hostile):
    pid = hostile.proc.pid
    for body, status, fragment in HOSTILE_BODIES:
        path = "/v1/chat/completions" if b'"messages"' in body else "/v1/completions"
        assert_error_body(post(hostile.url, path, body), status, fragment)
    for body in (b'{"prompt": "hi", "max_tokens": 3, "temperature": 1e-50, "seed": 1}',
                 b'{"prompt": "hi", "max_tokens": 3, "presence_penalty": 0, "repetition_penalty": 1}',
                 b'{"prompt": "hi", "max_tokens": 3, "presence_penalty": 1.5, "frequency_penalty": -0.5, '
                 b'"repetition_penalty": 1.1}',
                 b'{"prompt": "hi", "max_tokens": 3, "min_p": 0.05, "seed": 2}'):
        assert post(hostile.url, "/v1/completions", body).status_code == 200
    r = httpx.get(f"{hostile.url}/v1/nowhere")
    assert_error_body(r, 404)
    assert_error_body(httpx.get(f"{hostile.url}/v1/completions"), 405)
    too_big = b'{"prompt": "' + b"x" * (2**20 + 10) + b'"}'
    r = post(hostile.url, "/v1/completions", too_big)
    assert_error_body(r, 413, "exceeds 1048576 bytes")
    assert r.headers.get("connection") == "close"  # (the rest of such a body is never read)

    def chunks():  # no Content-Length: refused while it streams in
        for _ in range(40):
            yield b" " * 65536

    r = httpx.post(f"{hostile.url}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error_body(r, 413, "exceeds 1048576 bytes")
    ok = post(hostile.url, "/v1/completions", {"prompt": "Flat is", "max_tokens": 4})
    assert ok.status_code == 200 and hostile.proc.pid == pid and hostile.proc.poll() is None


def test_health_answers_while_a_large_prompt_is_tokenized(hostile):
    """A prompt string at the body limit takes seconds to tokenize (then is refused as too long):
    /health keeps answering within 1 s all the while."""
    words = "Beautiful is better than ugly. " * (2**20 // 31 - 1)
    body = json.dumps({"prompt": words, "max_tokens": 2})
    assert len(body) < 2**20
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(r=post(hostile.url, "/v1/completions", body)))
    worker.start()
    slowest, polls = 0.0, 0
    while worker.is_alive():
        t = time.monotonic()
        assert httpx.get(f"{hostile.url}/health", timeout=10).status_code == 200
        slowest, polls = max(slowest, time.monotonic() - t), polls + 1
        time.sleep(0.05)
    worker.join()
    assert_error_body(result["r"], 400, "maximum context length is 1024")
    assert polls >= 3 and slowest < 1.0, (polls, slowest)


def random_body(rng: random.Random) -> bytes:
    values = [None, True, False, 0, 1, -1, 3, 2**31, 2**64, -(2**63), 0.5, 1e-50, 1e300, -0.0, "", "x",
              "\ud800", "Beautiful", [], [1, 2], [[1]], ["a", 3], {}, {"a": 1}, "a" * 3000, [5] * 2000]
    fields = ["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
              "stream_options", "logprobs", "top_logprobs", "ignore_eos", "model", "presence_penalty",
              "max_completion_tokens", "echo", "user", "prompt_logprobs"]
    kind = rng.random()
    if kind < 0.1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    body = {"prompt": "Beautiful is"} if rng.random() < 0.5 else {}
    for key in rng.sample(fields, rng.randrange(1, 6)):
        body[key] = rng.choice(values)
    if rng.random() < 0.9:
        body["max_tokens"] = rng.choice([1, 2, 3, 0, -1, "2", None])
    text = json.dumps(body)
    if kind < 0.2:  # a non-finite literal or a cut
        text = text.replace("0.5", rng.choice(["NaN", "Infinity", "1e999"])) if rng.random() < 0.5 \
            else text[: rng.randrange(len(text))]
    return text.encode()


def test_server_fuzz_keeps_serving(hostile):
    """200 random bodies (fixed seed): every answer is 200 or a 4xx with an OpenAI error body; then a
    normal request still succeeds on the same process and /health is 200."""
    rng = random.Random(1234)
    pid = hostile.proc.pid
    seen = set()
    for i in range(200):
        body = random_body(rng)
        path = "/v1/chat/completions" if i % 3 == 0 else "/v1/completions"
        r = post(hostile.url, path, body, timeout=60)
        seen.add(r.status_code)
        if r.status_code != 200:
            assert r.status_code in (400, 404, 413), (body[:200], r.status_code, r.text[:300])
            assert_error_body(r, r.status_code)
    assert 200 in seen and 400 in seen
    r = post(hostile.url, "/v1/completions", {"prompt": "Sparse is", "max_tokens": 3, "stream": True})
    events = list(sse_events(r)) if r.status_code == 200 else []
    assert events and all("error" not in e for e in events)
    assert httpx.get(f"{hostile.url}/health").status_code == 200 and hostile.proc.pid == pid


def test_a_trickled_body_gets_408_not_a_held_connection():
    """A client that sends its head, then its body a few bytes at a time (or never), gets a 408 once
    the body's deadline passes; a whole body within it is read as ever."""
    import asyncio

    from starlette.requests import Request

    from epinfer.server.app import read_body
    from epinfer.server.protocol import APIError

    def request(parts: list[bytes], stall: bool) -> Request:
        async def receive():
            if parts:
                return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts) or stall}
            await asyncio.sleep(3600)  # the rest never comes
        return Request({"type": "http", "method": "POST", "headers": [(b"content-length", b"100")]}, receive)

    assert asyncio.run(read_body(request([b"ab", b"cd"], False), 1000, 0.5)) == b"abcd"
    t0 = time.time()
    with pytest.raises(APIError) as err:
        asyncio.run(read_body(request([b"ab"], True), 1000, 0.3))
    assert err.value.status == 408 and "the request body did not arrive within 0.3 s" in err.value.message
    assert 0.3 <= time.time() - t0 < 2, time.time() - t0


def test_bodies_read_at_once_are_bounded():
    """Many slow bodies, each under the size limit and its deadline, hold at most the budget: one
    that would pass it gets 429 (and leaves nothing held), and once the others are read (or time
    out) their bytes leave the budget and a new body is read as ever."""
    import asyncio

    from starlette.requests import Request

    from epinfer.server.app import BodyBudget, read_body
    from epinfer.server.protocol import APIError

    def request(parts: list[bytes], release: asyncio.Event | None) -> Request:
        async def receive():
            if len(parts) > 1 or release is None:
                return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}
            await release.wait()  # the last part comes only when released
            return {"type": "http.request", "body": parts.pop(0), "more_body": False}
        return Request({"type": "http", "method": "POST", "headers": []}, receive)

    async def scenario():
        budget = BodyBudget(1000)
        release = asyncio.Event()
        slow = [asyncio.create_task(read_body(request([b"a" * 400, b"b"], release), 10_000, 5, budget))
                for _ in range(2)]
        await asyncio.sleep(0.05)
        assert budget.held == 800
        with pytest.raises(APIError) as err:
            await read_body(request([b"c" * 100, b"d" * 150], None), 10_000, 5, budget)
        assert err.value.status == 429 and err.value.code == "server_busy" and budget.held == 800
        timed_out = asyncio.create_task(read_body(request([b"e" * 100, b"f"], asyncio.Event()), 10_000, 0.2, budget))
        with pytest.raises(APIError, match="did not arrive"):
            await timed_out
        release.set()
        assert [len(await t) for t in slow] == [401, 401] and budget.held == 0
        assert await read_body(request([b"g" * 900], None), 10_000, 5, budget) == b"g" * 900
        assert budget.held == 0

    asyncio.run(scenario())
