"""Parallel runtime on CPU / Gloo: every (dp, tp) layout × dispatcher × padding mode gives the
single-process greedy tokens (which equal transformers'), including unequal prompt lengths,
unequal requests per replica, an idle replica, a replica finishing early, prompts in chunks of
1, 7 and 64 tokens mixed with decodes, prompts sharing cached prefixes (hybrid state snapshots
cut at or captured inside chunks), an FP8 checkpoint whose
blocks straddle the TP shard boundaries (dequantised before sharding), row counts not divisible
by TP, NaN-poisoned padding and an expert count EP doesn't divide. One spawn of 4 ranks runs all
cases; a hang fails the test at its timeout."""

from __future__ import annotations

import itertools

import pytest

from epinfer import LLM, SamplingParams
from epinfer.core.config import DEMO_MODEL
from tests.checkpoints import hf_generate
from tests.parallel_cases import Case, run_cases
from tests.spawn import run_spawned

FAMILIES = ("qwen3_moe", "qwen3_next", "qwen3_5_moe")
PROMPTS = [[7], [3, 1, 4, 1, 5, 9], list(range(40, 73)), [(i * 37) % 256 for i in range(140)],
           [2, 7, 1, 8, 2, 8, 1, 8, 2]]
# round-robin over 2 replicas: replica 0 gets 0, 2, 4 (long), replica 1 gets 1, 3 (short: done early)
MAX_TOKENS = [14, 3, 14, 4, 14]
# prompts that share prefixes of 1 and 2 blocks (block size 16), prefilled 7 tokens a step so that
# later ones find the earlier ones' blocks cached (round-robin: replica 0 gets 0, 2, 4)
_S = [(i * 53 + 7) % 250 + 1 for i in range(40)]
SHARED = [_S + [1, 2], _S[:32] + [9] * 5, _S + [1, 2], _S[:16] + [3], _S[:33] + [7] * 20, _S[:34]]
# long enough for the GDN state snapshots to be captured inside whole-prompt chunks (64 rows in at a
# time), one request at a time per replica: replica 0 captures at 192 tokens, restores it for the
# repeat, and captures the branch point (144) moved back to 128; replica 1 captures at 128 and restores it
_L = [(i * 29 + 3) % 250 + 1 for i in range(200)]
SHARED_LONG = [_L + [1, 2], _L[:100] + [3] * 40, _L + [1, 2], _L[:100] + [3] * 40 + [4], _L[:150] + [7] * 20,
               [5] * 70]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


# presence / frequency / repetition penalties, a different presence for each request
PENALIZED = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, presence_penalty=1.0 + 0.2 * i,
                            frequency_penalty=0.3, repetition_penalty=1.3) for i, n in enumerate(MAX_TOKENS)]


# prompt logprobs (the top 2) with the greedy tokens: each replica's leader computes its requests'
LOGPROBS = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, prompt_logprobs=2) for n in MAX_TOKENS]
# restricted sampling on the demo model (it has a tokenizer): guided choice, JSON mode and schema, a regex,
# allowed ids, bad words
RESTRICTED = [SamplingParams(max_tokens=16, temperature=0, choices=["yes", "no", "maybe so"]),
              SamplingParams(max_tokens=24, temperature=0, json_object=True),
              SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, allowed_token_ids=[72, 101, 108]),
              SamplingParams(max_tokens=24, temperature=1.0, seed=3, regex=r"[a-z ]{3,12}\."),
              SamplingParams(max_tokens=40, temperature=0, bad_words=["Explicit", "Simple"], json_schema={
                  "type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}}})]


def build_cases(models: dict[str, str]) -> list[Case]:
    params = [greedy(n) for n in MAX_TOKENS]
    cases = []
    dispatchers = ("agrs", "alltoall", "naive")
    paddings = ("uniform", "none")
    # (2, 2) for every family and dispatcher; padding alternates, both for qwen3_5_moe
    for family, dispatch in itertools.product(FAMILIES, dispatchers):
        pads = paddings if family == "qwen3_5_moe" else (paddings[len(cases) % 2],)
        for pad in pads:
            cases.append(Case(f"{family}-2x2-{dispatch}-{pad}", models[family], 2, 2, PROMPTS, params,
                              dispatch, pad))
    # (2, 1) and (1, 2) for every dispatcher and padding, families rotating
    for i, ((dp, tp), dispatch, pad) in enumerate(itertools.product([(2, 1), (1, 2)], dispatchers,
                                                                     paddings)):
        family = FAMILIES[i % 3]
        cases.append(Case(f"{family}-{dp}x{tp}-{dispatch}-{pad}", models[family], dp, tp, PROMPTS,
                          params, dispatch, pad))
    for family in FAMILIES:
        cases.append(Case(f"{family}-1x1", models[family], 1, 1, PROMPTS, params))
        # one request: replica 1 has nothing at all and runs dummy batches
        cases.append(Case(f"{family}-2x2-idle", models[family], 2, 2, PROMPTS[3:4], params[3:4],
                          "alltoall" if family == "qwen3_next" else "agrs"))
    # prompts in chunks of 1, 7 and 64 tokens, packed with other prompts' chunks and running decodes
    for family, budget in (("qwen3_5_moe", 1), ("qwen3_5_moe", 7), ("qwen3_next", 7), ("qwen3_moe", 7),
                           ("qwen3_next", 64)):
        cases.append(Case(f"{family}-2x2-chunks-{budget}", models[family], 2, 2, PROMPTS, params, budget=budget))
    # prefix caching under DP x TP: each replica's own cache, shared blocks read by every TP rank
    # (and for a hybrid, the GDN state snapshots, copied on every TP rank of the replica)
    for family in ("qwen3_moe", "qwen3_5_moe"):
        cases.append(Case(f"{family}-2x2-prefix-cache", models[family], 2, 2, SHARED, [greedy(6)] * len(SHARED),
                          budget=7))
    cases.append(Case("qwen3_5_moe-2x2-prefix-capture", models["qwen3_5_moe"], 2, 2, SHARED_LONG,
                      [greedy(6)] * len(SHARED_LONG), budget=256, max_num_seqs=1))
    # an FP8 checkpoint (dequantised at load, then sharded) under every dispatcher
    for dispatch in dispatchers:
        cases.append(Case(f"fp8-2x2-{dispatch}", models["fp8"], 2, 2, PROMPTS, params, dispatch))
    cases += [
        Case("qwen3_5_moe-2x2-poison-agrs", models["qwen3_5_moe"], 2, 2, PROMPTS, params,
             "agrs", "uniform", poison_pads=True),
        Case("qwen3_5_moe-2x2-poison-alltoall", models["qwen3_5_moe"], 2, 2, PROMPTS, params,
             "alltoall", "none", poison_pads=True),
        Case("qwen3_next-2x2-poison-naive", models["qwen3_next"], 2, 2, PROMPTS, params,
             "naive", "uniform", poison_pads=True),
        Case("qwen3_5_moe-1x2-no-ep", models["qwen3_5_moe"], 1, 2, PROMPTS, params,
             expert_parallel=False),
        Case("qwen3_moe-2x2-no-ep", models["qwen3_moe"], 2, 2, PROMPTS, params, expert_parallel=False),
        Case("six-experts-2x2-agrs", models["six"], 2, 2, PROMPTS, params, "agrs"),
        Case("six-experts-2x2-alltoall", models["six"], 2, 2, PROMPTS, params, "alltoall", "none"),
        # the decode fast path (device-side padding, batched paged decode; the torch reference
        # kernel on CPU) under DP padding, sequence-parallel MoE and NaN-poisoned pads
        Case("qwen3_5_moe-2x2-fast-poison-agrs", models["qwen3_5_moe"], 2, 2, PROMPTS, params, "agrs",
             "uniform", poison_pads=True, fast_decode=True),
        Case("qwen3_moe-2x2-fast-alltoall-none", models["qwen3_moe"], 2, 2, PROMPTS, params, "alltoall",
             "none", fast_decode=True),
        Case("qwen3_next-1x2-fast-no-ep", models["qwen3_next"], 1, 2, PROMPTS, params, expert_parallel=False,
             fast_decode=True),
        # FP8 weights sharded over TP and EP (blocks that divide the shards): the single process's tokens
        *[Case(f"fp8w-2x2-{d}", models["fp8w"], 2, 2, PROMPTS, params, d, fp8_weights=True)
          for d in ("agrs", "alltoall")],
        Case("fp8w-1x2-no-ep", models["fp8w"], 1, 2, PROMPTS, params, expert_parallel=False, fp8_weights=True),
        # long chunks through `kernels.cudnn_attention` (stand-in sizes, its torch form for cuDNN), heads over TP
        # (qwen3_moe: attention in every layer, so a wrong attention changes its tokens)
        *[Case(f"qwen3_moe-{dp}x{tp}-cudnn-chunks", models["qwen3_moe"], dp, tp, PROMPTS, params, budget=40,
               cudnn_chunks=True) for dp, tp in ((2, 2), (1, 2))],
        # presence / frequency / repetition penalties (each TP rank applies them to the same logits)
        Case("qwen3_5_moe-2x2-penalties", models["qwen3_5_moe"], 2, 2, PROMPTS, PENALIZED),
        # graph pieces: replicas without collectives in the forward, each padding its own steps
        Case("qwen3_5_moe-2x1-no-ep-pieces", models["qwen3_5_moe"], 2, 1, PROMPTS, params, expert_parallel=False,
             budget=40, pieces=True),
        # prompt logprobs: prompts in chunks of 7 under DP x TP, and through the graph pieces
        Case("qwen3_5_moe-2x2-prompt-logprobs", models["qwen3_5_moe"], 2, 2, PROMPTS, LOGPROBS, budget=7),
        Case("qwen3_moe-2x1-no-ep-pieces-prompt-logprobs", models["qwen3_moe"], 2, 1, PROMPTS, LOGPROBS,
             expert_parallel=False, budget=40, pieces=True),
        Case("demo-2x2-restricted", models["demo"], 2, 2, PROMPTS, RESTRICTED),
    ]
    return cases


@pytest.fixture(scope="module")
def models(ckpt_dir):
    out = {f: str(ckpt_dir(f)) for f in FAMILIES}
    out["six"] = str(ckpt_dir("qwen3_5_moe", num_experts=6))
    out["fp8"] = str(ckpt_dir("qwen3_5_moe", fp8_block=(12, 20), seed=3))
    out["fp8w"] = str(ckpt_dir("qwen3_5_moe", fp8_block=(16, 16), seed=5))
    out["demo"] = str(DEMO_MODEL)
    return out


@pytest.fixture(scope="module")
def expected(models):
    """Single-process tokens per model, checked against transformers."""
    params = [greedy(n) for n in MAX_TOKENS]
    out = {}
    for name, path in models.items():
        if name == "demo":  # (its single-process run: the restricted requests below)
            continue
        outs = LLM(path, dtype="float32", device="cpu", fp8_weights=name == "fp8w").generate(PROMPTS, params)
        out[name] = [o.token_ids for o in outs]
        if name == "fp8w":  # FP8 activations: the single process is the reference
            continue
        reference = f"{path}/dequantized" if name == "fp8" else path  # transformers: the same weights dequantised
        for prompt, n, tokens in zip(PROMPTS, MAX_TOKENS, out[name], strict=True):
            assert tokens == hf_generate(reference, prompt, n)[0], f"{name}: single-process != transformers"
    for family in ("qwen3_moe", "qwen3_5_moe"):
        off = LLM(models[family], dtype="float32", device="cpu", enable_prefix_caching=False)
        out[f"shared:{family}"] = [o.token_ids for o in off.generate(SHARED, greedy(6))]
        for prompt, tokens in zip(SHARED, out[f"shared:{family}"], strict=True):
            assert tokens == hf_generate(models[family], prompt, 6)[0], f"{family}, shared prompts: != transformers"
    off = LLM(models["qwen3_5_moe"], dtype="float32", device="cpu", enable_prefix_caching=False)
    out["penalties:qwen3_5_moe"] = [o.token_ids for o in off.generate(PROMPTS, PENALIZED)]
    assert out["penalties:qwen3_5_moe"] != out["qwen3_5_moe"]  # (the penalties change the tokens)
    for family in ("qwen3_moe", "qwen3_5_moe"):
        out[f"prompt_logprobs:{family}"] = [o.prompt_logprobs for o in LLM(models[family], dtype="float32",
                                                                            device="cpu").generate(PROMPTS, LOGPROBS)]
    out["restricted:demo"] = [o.token_ids for o in LLM(models["demo"], dtype="float32", device="cpu").generate(
        PROMPTS, RESTRICTED)]
    out["long:qwen3_5_moe"] = [o.token_ids for o in off.generate(SHARED_LONG, greedy(6))]
    for prompt, tokens in zip(SHARED_LONG, out["long:qwen3_5_moe"], strict=True):
        assert tokens == hf_generate(models["qwen3_5_moe"], prompt, 6)[0], "long shared prompts: != transformers"
    return out


def test_every_layout_matches_single_process(models, expected):
    cases = build_cases(models)
    results = run_spawned(run_cases, 4, cases, timeout=900, pg_timeout=60)
    merged = {}
    for part in results:
        merged.update(part)
    assert {k for k in merged if ":" not in k} == {c.name for c in cases}
    model_name = {path: name for name, path in models.items()}
    mismatches = []
    for case in cases:
        want = expected.get(model_name[case.model], [])[: len(case.prompts)]
        if case.prompts is SHARED:  # the single process with the cache off
            want = expected[f"shared:{model_name[case.model]}"]
            assert merged[f"{case.name}:hits"] > 0, "no prefix-cache hit on replica 0"
        elif case.prompts is SHARED_LONG:  # the same, the snapshots captured inside the chunks
            want = expected[f"long:{model_name[case.model]}"]
            assert merged[f"{case.name}:hits"] == 192 and merged[f"{case.name}:captures"] == 2, (
                merged[f"{case.name}:hits"], merged[f"{case.name}:captures"])
        elif case.params is PENALIZED:
            want = expected[f"penalties:{model_name[case.model]}"]
        elif case.params is RESTRICTED:
            want = expected["restricted:demo"]
        elif case.prompts is not PROMPTS:  # the idle-replica case runs PROMPTS[3] alone
            want = [expected[model_name[case.model]][3]]
        if case.cudnn_chunks:
            assert merged[f"{case.name}:cudnn"] > 0, f"{case.name}: no chunk took the path"
        if case.params is LOGPROBS and not same_prompt_logprobs(merged[f"{case.name}:prompt_logprobs"],
                                                               expected[f"prompt_logprobs:{model_name[case.model]}"]):
            mismatches.append(f"{case.name} (prompt logprobs)")
        if merged[case.name] != want:
            mismatches.append(case.name)
    assert not mismatches, f"cases differing from the single-process run: {mismatches}"


def same_prompt_logprobs(got: list, want: list, tol: float = 1e-4) -> bool:
    """Equal records up to float32 rounding of a different reduction order: logprobs within `tol`,
    the same ranks and top ids (and their logprobs within `tol`)."""
    for g, w in zip(got, want, strict=True):
        if len(g) != len(w) or g[0] is not None or w[0] is not None:
            return False
        for (lg, rg, tg), (lw, rw, tw) in zip(g[1:], w[1:], strict=True):
            if abs(lg - lw) > tol or rg != rw or [t for t, _ in tg] != [t for t, _ in tw]:
                return False
            if any(abs(a - b) > tol for (_, a), (_, b) in zip(tg, tw, strict=True)):
                return False
    return True
