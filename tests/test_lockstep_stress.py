"""Lockstep stress test on CPU / Gloo (dp=2 tp=2, EP 4): rounds of random per-replica load —
idle replicas, requests finishing at random steps (stop ids, 1-10 tokens), chunked prefill,
queued requests joining mid-run, greedy and seeded sampling, two dispatcher / padding variants,
synchronous and async scheduling.
Every group's members must have issued identical collectives (op, label, step, sizes, shapes) in
the same order, and every request's tokens must equal the single-process run."""

from __future__ import annotations

import random

import pytest

from epinfer import LLM, SamplingParams
from tests.spawn import run_spawned
from tests.stress_cases import Round, run_stress

ROUNDS = 8


def make_rounds(seed: int = 1234) -> list[Round]:
    rng = random.Random(seed)
    rounds, rid = [], 0
    for i in range(ROUNDS):
        per_replica = []
        for _replica in range(2):
            n = 0 if rng.random() < 0.25 else rng.randint(1, 5)  # an idle replica about one round in four
            reqs = []
            for _ in range(n):
                prompt = [rng.randrange(1, 256) for _ in range(rng.randint(1, 40))]
                stop = [rng.randrange(1, 256) for _ in range(rng.randint(0, 12))]
                if rng.random() < 0.3:
                    params = SamplingParams(max_tokens=rng.randint(1, 10), temperature=0.9, top_p=0.95,
                                            seed=rng.randrange(10**6), stop_token_ids=stop, ignore_eos=True)
                else:
                    params = SamplingParams(max_tokens=rng.randint(1, 10), temperature=0, stop_token_ids=stop,
                                            ignore_eos=True)
                reqs.append((rid, prompt, params))
                rid += 1
            per_replica.append(reqs)
        dispatch, padding = [("agrs", "uniform"), ("alltoall", "none")][i % 2]
        rounds.append(Round(dispatch, padding, per_replica, rng.randint(1, 3), rng.choice([8, 16, 64]),
                            async_scheduling=i % 4 >= 2))
    return rounds


@pytest.mark.timeout(600)
def test_random_load_keeps_every_rank_in_lockstep(ckpt_dir):
    model = str(ckpt_dir("qwen3_5_moe"))
    rounds = make_rounds()
    results = run_spawned(run_stress, 4, (model, rounds), timeout=480, pg_timeout=60)
    # the same collectives in the same order on every member of every group
    for variant in results[0]["ledger"]:
        names = set().union(*(r["ledger"][variant] for r in results))
        for name in names:
            seqs = {rank: r["ledger"][variant][name] for rank, r in enumerate(results) if name in r["ledger"][variant]}
            first = next(iter(seqs.values()))
            assert all(s == first for s in seqs.values()), f"{variant} {name}: ranks disagree"
            if name == "ep":
                assert set(seqs) == {0, 1, 2, 3}
    labels = {e[2] for r in results for v in r["ledger"].values() for s in v.values() for e in s}
    assert {"dp.sync", "tp.plan", "tp.tokens"} <= labels and any(lbl.endswith(".moe.dispatch") for lbl in labels)
    # every request's tokens equal the single-process engine's (which equals transformers elsewhere)
    llm = LLM(model, dtype="float32", device="cpu")
    reqs = [req for rnd in rounds for reqs in rnd.per_replica for req in reqs]
    want = llm.generate([p for _, p, _ in reqs], [sp for _, _, sp in reqs])
    got = results[0]["outputs"]
    assert sorted(got) == [rid for rid, _, _ in reqs]
    assert [got[rid] for rid, _, _ in reqs] == [o.token_ids for o in want]
    idle_rounds = sum(any(not reqs for reqs in rnd.per_replica) for rnd in rounds)
    assert idle_rounds >= 1  # the seed gives at least one round with an idle replica
