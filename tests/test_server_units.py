"""`epinfer serve`'s parts without a server process: the routing rule, the queue's depth and limit,
the tokenizer lanes, the API key (the app on Starlette's test client, a fake engine client)."""

from __future__ import annotations

import time

from epinfer import SamplingParams
from epinfer.server.engine_loop import outstanding_tokens
from epinfer.server.routing import AFFINITY_SLACK, Router, pick_replica


def test_routing_rule():
    assert pick_replica([5, 3, 3]) == 1 and pick_replica([0, 0]) == 0 and pick_replica([7]) == 0
    params = SamplingParams(max_tokens=10).resolved({})
    # each routed request counts toward the next decision: 4+10 on replica 1 makes replica 0 (9) lighter
    route = Router(2, 16).route  # by load only
    assert route([9, 0], [(0, [1] * 4, params, None), (1, [1], params, None)]) == [1, 0]
    # prefix affinity: a request follows its prefix to the replica that prefilled it ...
    router = Router(2, 4, prefix_blocks=100)
    shared = list(range(1, 13))  # 3 blocks of 4
    assert router.route([0, 0], [(0, shared + [50], params, None)]) == [0]
    assert router.route([30, 0], [(1, shared + [60, 61], params, None)]) == [0]  # not the lighter replica 1
    assert router.route([30, 0], [(2, [99] * 13, params, None)]) == [1]  # no prefix anywhere: by load
    assert router.route([0, 0], [(3, shared[:4] + [7] * 9, params, None)]) == [0]  # one shared block suffices
    # ... unless that replica is much more loaded: more than 2 x the lightest + the slack
    assert router.route([2 * 100 + AFFINITY_SLACK, 100], [(4, shared + [1], params, None)]) == [0]
    assert router.route([2 * 100 + AFFINITY_SLACK + 1, 100], [(5, shared + [1], params, None)]) == [1]
    from epinfer.engine.cache import block_hashes

    assert router.cached_blocks(1, block_hashes(shared + [1], 4)) == 3  # replica 1 now holds it too
    small = Router(1, 4, prefix_blocks=2)  # bounded: the least recently routed blocks are forgotten
    small.route([0], [(0, shared + [1], params, None)])
    assert len(small.known[0]) == 2
    from epinfer.engine.scheduler import Sequence

    seq = Sequence(0, [1, 2, 3, 4], params, 14)
    seq.num_computed = 3
    assert outstanding_tokens(seq) == 1 + 10
    seq.num_computed, seq.output_ids = 6, [5, 6]
    assert outstanding_tokens(seq) == 8


def fake_client(slots: int, max_queue: int = 8):
    from types import SimpleNamespace

    from epinfer.server.client import EngineClient

    return EngineClient(SimpleNamespace(channels=SimpleNamespace(outboxes=[])), None, max_queue, 2, slots)


def test_queue_depth_counts_requests_beyond_the_free_slots():
    """A burst that arrives between two step reports finds free slots, not a full queue; requests a
    replica reports waiting (for cache blocks) count however many slots are free."""
    from types import SimpleNamespace

    client = fake_client(slots=4)
    for i in range(4):
        client.requests[i] = SimpleNamespace(admitted=False)
    assert client.queue_depth == 0
    client.requests[4] = SimpleNamespace(admitted=False)
    assert client.queue_depth == 1
    for i in range(3):
        client.requests[i].admitted = True
    assert client.queue_depth == 1  # 2 not admitted, 1 slot free
    client.metrics.replica_stats = [(3, 3) + (0,) * 10, (0,) * 12]
    assert client.queue_depth == 3


def test_large_bodies_are_tokenized_apart(monkeypatch):
    """A body over LARGE_BODY bytes is decoded and tokenized on its own thread: while one is stuck
    there, an ordinary request is answered."""
    import threading

    from starlette.testclient import TestClient

    import epinfer.server.app as app_module
    from epinfer.server.protocol import APIError, ModelInfo

    release, threads = threading.Event(), []

    def parse(body, chat, tokenizer, info):
        threads.append(threading.current_thread().name)
        if len(body["prompt"]) > app_module.LARGE_BODY:
            release.wait(30)
        raise APIError(400, "checked")

    monkeypatch.setattr(app_module, "parse_request", parse)
    client = TestClient(app_module.build_app(fake_client(4), None, ModelInfo("m", 64, 10, {}), 1 << 20))
    big = threading.Thread(target=client.post, args=("/v1/completions",), kwargs={
        "json": {"prompt": "x" * (app_module.LARGE_BODY + 1)}})
    big.start()
    while not threads:
        time.sleep(0.01)
    small = client.post("/v1/completions", json={"prompt": "hi"})  # would wait for `release` in one lane
    assert small.status_code == 400 and not release.is_set()
    release.set()
    big.join(30)
    assert threads == ["epinfer-tokenize-large_0", "epinfer-tokenize-small_0"]


def test_api_key(monkeypatch):
    """With a key, /v1/* answers only requests that carry it (401 with an OpenAI error body
    otherwise, counted in the metrics); /health and /metrics stay open."""
    from starlette.testclient import TestClient

    import epinfer.server.app as app_module
    from epinfer.server.protocol import APIError, ModelInfo

    def parse(body, chat, tokenizer, info):
        raise APIError(400, "checked")

    monkeypatch.setattr(app_module, "parse_request", parse)
    engine = fake_client(2)
    client = TestClient(app_module.build_app(engine, None, ModelInfo("m", 64, 10, {}), 1 << 20, "s3cret-é"))
    good = {"Authorization": "Bearer s3cret-é".encode()}  # (a UTF-8 key, as the client's bytes)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic x"}):
        for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                             ("POST", "/tokenize"), ("POST", "/detokenize")):
            r = client.request(method, path, json={"prompt": "hi"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, path, r.text)
    assert client.post("/v1/completions", json={"prompt": "hi"}, headers=good).status_code == 400  # (past the key)
    assert client.get("/v1/models", headers=good).status_code == 200
    assert engine.metrics.http[("completions", 401)] == engine.metrics.http[("tokenize", 401)] == 4
    assert client.get("/version").status_code == 200
    monkeypatch.setattr(engine, "health", lambda: (200, {"status": "ok"}))
    assert client.get("/health").status_code == 200


def test_queue_limit_counts_requests_waiting_for_the_tokenizer(monkeypatch):
    """Bodies read whole but not yet tokenized count toward --max-queue: beyond it a flood gets 429
    at once instead of a backlog in front of the tokenizer that every later request waits behind."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from starlette.testclient import TestClient

    import epinfer.server.app as app_module
    from epinfer.server.protocol import APIError, ModelInfo

    release, parsed = threading.Event(), []

    def parse(body, chat, tokenizer, info):
        parsed.append(1)
        release.wait(30)
        raise APIError(400, "checked")

    monkeypatch.setattr(app_module, "parse_request", parse)
    client = TestClient(app_module.build_app(fake_client(2, max_queue=2), None, ModelInfo("m", 64, 10, {}), 1 << 20))
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(client.post, "/v1/completions", json={"prompt": "hi"})
        while not parsed:
            time.sleep(0.01)
        rest = [pool.submit(client.post, "/v1/completions", json={"prompt": "hi"}) for _ in range(7)]
        deadline = time.time() + 20
        while sum(f.done() for f in rest) < 4 and time.time() < deadline:  # 2 slots + 2 queued: 4 go on
            time.sleep(0.01)
        release.set()
        codes = sorted(f.result(timeout=30).status_code for f in [first, *rest])
    assert codes == [400] * 4 + [429] * 4 and len(parsed) == 4
