"""Guided regex (`SamplingParams.regex`, vLLM's `guided_regex` / `structured_outputs.regex`): the
grammar accepts exactly what `re.fullmatch` accepts (random strings, and strings drawn from the
automaton), every prefix of a match stays alive; unsupported syntax is one line naming it; the
sweep's allowed ids equal a direct check of every token; greedy answers equal transformers' `generate`
constrained by the direct check, with and without async scheduling, and every finished answer matches."""

from __future__ import annotations

import random
import re

import pytest
import torch
import transformers

from epinfer import LLM, SamplingParams
from epinfer.core.config import DEMO_MODEL
from epinfer.core.errors import UserError
from epinfer.engine.guided import vocab_bytes
from epinfer.engine.json_mode import json_vocab
from epinfer.engine.regex_grammar import RegexGrammar

PATTERNS = [r"[a-z]+", r"\d{3}-\d{4}", r"(yes|no|maybe)", r"-?\d+(\.\d+)?", r"[^\n]{0,5}x", r"(ab|a)*b?",
            "é+[ü-ÿ]?日*", r"\w+@\w+\.(com|org)", r"[A-Z][a-z]*( [A-Z][a-z]*){0,2}", r"^a.c$", r"(?:x|y){2,3}z*?",
            r'\s*\{"a":\s*\d+\}', r"[^a-c]*", r"(?P<n>\d)+\.", r"\u00e9\x41", r"a{,2}b", r"[\d\s-]+", "a{²}b",
            r"\012x?", r"[\0121]+", r"\101+\0?",  # (octal escapes, as Python reads them)
            r"[\U000000e9-\U000000ff]+\U00000041?"]
ALPHABET = 'abcxyz0123456789-. \n@éüÿAZ{}":日'


def matches(g: RegexGrammar, text: str) -> bool:
    state = g.walk(g.start, text.encode())
    return state is not None and g.can_end(state)


def drawn(g: RegexGrammar, rnd: random.Random, limit: int = 30) -> str | None:
    """A random string the automaton accepts (None where the walk went nowhere)."""
    a, out = g.auto, []
    nodes = a.closure([a.start])
    for _ in range(limit):
        edges = [(r, t) for i in nodes for r, _, t in a.edges[i]]
        if a.accept in nodes and (not edges or rnd.random() < 0.3):
            return "".join(out)
        if not edges:
            return None
        ranges, target = rnd.choice(edges)
        lo, hi = rnd.choice(ranges)
        c = rnd.randint(lo, min(hi, lo + 300))
        if 0xD800 <= c <= 0xDFFF:
            return None
        out.append(chr(c))
        nodes = a.closure([target])
    return None


def test_grammar_is_fullmatch():
    rnd = random.Random(0)
    for pattern in PATTERNS:
        g, rx = RegexGrammar(pattern), re.compile(pattern, re.ASCII)
        texts = ["".join(rnd.choice(ALPHABET) for _ in range(rnd.randint(0, 8))) for _ in range(400)]
        texts += [t for t in (drawn(g, rnd) for _ in range(400)) if t is not None]
        assert sum(rx.fullmatch(t) is not None for t in texts) >= 20, pattern
        for text in texts:
            assert matches(g, text) == (rx.fullmatch(text) is not None), (pattern, text)
            if rx.fullmatch(text):  # every byte prefix of a match can still become one
                raw = text.encode()
                assert all(g.walk(g.start, raw[:k]) is not None for k in range(len(raw))), (pattern, text)
    g = RegexGrammar("日本")
    assert g.walk(g.start, "日".encode()[:2]) is not None and g.walk(g.start, "é".encode()[:1]) is None
    assert g.walk(g.start, "旦".encode()) is None  # (its first two bytes are 日's)


@pytest.mark.parametrize("pattern,fragment", [
    (r"(?=a)b", "'(?' groups"), (r"(a)\1", r"the escape \1"), (r"\bword", r"the escape \b"), ("(ab", "missing ')'"),
    ("ab)", "unmatched ')'"), ("*a", "nothing to repeat"), ("a**", "a quantifier after a quantifier"),
    ("[z-a]", "out of order"), ("a{5,2}", "a repetition {5,2}"), ("a{2000}", "a repetition {2000}"),
    (r"\U00110000", "past the last code point"), (r"\U1F600", r"\U escape"),
    ("a^b", "'^' is supported only"), ("[ab", "unterminated '['"), (r"\x4", r"\x escape"),
    ("[[:alpha:]]", "POSIX classes"), ("a" * 5000, "at most 4096 characters"),
    ("(a{1000}){1000}", "more than 20000 automaton nodes"), ("(" * 1500 + "a" + ")" * 1500, "nested more than 64"),
    ("a{²}", None)])
def test_unsupported_expressions_are_one_line(pattern, fragment):
    if fragment is None:  # (a literal brace, as in Python: "²" is no count)
        assert RegexGrammar(pattern).walk(RegexGrammar(pattern).start, "a{²}".encode()) is not None
        return
    with pytest.raises(UserError) as exc:
        RegexGrammar(pattern)
    assert fragment in str(exc.value) and "\n" not in str(exc.value) and str(exc.value).startswith("regex")


def direct_allowed(vocab, grammar, state) -> list[int]:
    return [t for t, raw in enumerate(vocab.of) if raw and grammar.walk(state, raw) is not None]


def test_sweep_equals_a_direct_check():
    llm = LLM()
    vocab = vocab_bytes(llm.tokenizer, llm.engine.model_config.vocab_size)
    for pattern, prefixes in ((r"[A-Z][a-z]+( [A-Z][a-z]+)?", ("", "N", "Now", "Now T")),
                              (r"-?\d+(\.\d+)?", ("", "-", "12", "12.")), ("é+[ü-ÿ]?", ("", "é", "éé")),
                              (r"[^\n]*\.", ("", "ab", "a.")), (r".{0,12}!", ("", "abc", "a" * 10)),
                              (r'[^"\\\x00-\x1f]{2,5}', ("", "x", "xyzw"))):
        g = RegexGrammar(pattern)
        for prefix in prefixes:
            state = g.walk(g.start, prefix.encode())
            assert state is not None, (pattern, prefix)
            got = json_vocab(vocab).allowed(state, g).ids.tolist()
            assert got == direct_allowed(vocab, g, state), (pattern, prefix)


def reference(model, tokenizer, eos: list[int], prompt: str, pattern: str) -> list[int]:
    """transformers' greedy tokens, each step restricted by the direct check of every token."""
    g, ids = RegexGrammar(pattern), tokenizer(prompt)["input_ids"]
    vocab = vocab_bytes(tokenizer, model.config.vocab_size)

    def allowed(batch, sequence):
        state = g.walk(g.start, b"".join(vocab.of[t] for t in sequence[len(ids):].tolist()))
        return direct_allowed(vocab, g, state) + (eos if g.can_end(state) else [])

    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             prefix_allowed_tokens_fn=allowed, generation_config=transformers.GenerationConfig(
                                 do_sample=False, max_new_tokens=30, eos_token_id=eos, pad_token_id=0))
    return out[0, len(ids):].tolist()


def test_answers_match_the_expression():
    prompts = ["The answer is", "Beautiful is", "Errors should"]
    patterns = [r"\d{3}-\d{4}", r"[A-Z][a-z]+( [A-Z][a-z]+)?", r"[a-z ]{5,20}\."]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.float32)
    refs = None
    for async_scheduling in (False, True):
        llm = LLM(dtype="float32", async_scheduling=async_scheduling)
        eos = sorted(llm.engine.eos_ids)
        refs = refs or [reference(model, llm.tokenizer, eos, p, x) for p, x in zip(prompts, patterns, strict=True)]
        outs = llm.generate(prompts, [SamplingParams(max_tokens=30, temperature=0, regex=p) for p in patterns])
        assert [o.token_ids for o in outs] == refs, async_scheduling
        sampled = llm.generate(prompts * 3, [SamplingParams(max_tokens=40, temperature=1.0, seed=i,
                                                            regex=patterns[i % 3]) for i in range(9)])
        finished = [(o, patterns[i % 3]) for i, o in enumerate(outs + sampled) if o.finish_reason == "stop"]
        assert finished and all(re.fullmatch(p, o.text, re.ASCII) for o, p in finished), finished


def test_regex_requests_checked():
    from epinfer.server.protocol import APIError, ModelInfo, parse_request

    llm = LLM()
    with pytest.raises(UserError, match="request 0: regex: the escape"):
        llm.generate("x", SamplingParams(max_tokens=4, regex=r"\1"))
    with pytest.raises(UserError, match="json_object, json_schema, regex and choices: give one of them"):
        llm.generate("x", SamplingParams(max_tokens=4, regex="a", choices=["a"]))
    with pytest.raises(UserError, match="a guided regex needs a tokenizer"):
        llm.generate("x", SamplingParams(max_tokens=4, regex="a", ignore_eos=True))
    info = ModelInfo("m", 64, 1000, {})
    body = {"model": "m", "prompt": [5, 6], "max_tokens": 4}
    for spelled in ({"guided_regex": "a+b"}, {"structured_outputs": {"regex": "a+b"}}):
        assert parse_request({**body, **spelled}, False, None, info)[0].params.regex == "a+b"
    for bad, param in (({"guided_regex": "(?=x)"}, "guided_regex"), ({"guided_regex": 5}, "guided_regex"),
                       ({"guided_regex": "a", "structured_outputs": {"regex": "a"}}, "structured_outputs")):
        with pytest.raises(APIError) as exc:
            parse_request({**body, **bad}, False, None, info)
        assert exc.value.status == 400 and exc.value.param == param, (bad, exc.value.param, exc.value.message)


def test_costly_or_unsatisfiable_guides_fail_alone():
    """Counted repetitions nested in one another keep hundreds of automaton nodes alive a state: such
    a request fails alone once they pass the limit, with what each grammar remembers bounded by the
    nodes it holds; a schema's patterns are bounded in all. A guide whose answer is complete ends the
    request (stop) even short of min_tokens; allowed_token_ids narrows a guide, and a guide nothing
    continues fails that request (a 400 from the server), as does a sampled row whose restrictions
    leave no token (it once reached the sampler and stopped the step)."""
    from epinfer.engine import json_schema, regex_grammar

    g = RegexGrammar(r"(.{0,1000}){4}c")
    with pytest.raises(UserError, match="automaton nodes alive at once"):
        g.walk(g.start, b"x" * 400)
    assert g.memo_nodes <= regex_grammar.MAX_MEMO_NODES
    assert max(len(s[0]) for s in g.memo if s) <= regex_grammar.MAX_STATE_NODES
    words = RegexGrammar("|".join(f"word{i}" for i in range(200)))
    assert matches(words, "word199")  # (401 nodes alive at its start)
    props = {f"p{i}": {"type": "string", "pattern": f"(.{{0,1000}}){{4}}r{i}"} for i in range(1000)}  # (distinct)
    with pytest.raises(UserError, match="automaton nodes in all"):
        json_schema.SchemaGrammar({"type": "object", "properties": props})

    llm = LLM(dtype="float32")
    yes = llm.tokenizer("yes", add_special_tokens=False)["input_ids"]
    eos = sorted(llm.engine.eos_ids)
    a = llm.tokenizer("a", add_special_tokens=False)["input_ids"]  # (one token: the bad word "a" as it is)
    cases = [SamplingParams(max_tokens=20, temperature=0, regex=r"(.{0,1000}){4}c"),
             SamplingParams(max_tokens=12, temperature=0, regex="ab", min_tokens=5),
             SamplingParams(max_tokens=12, temperature=0, json_schema={"type": "boolean"}, min_tokens=8),
             SamplingParams(max_tokens=12, temperature=0, choices=["yes", "no"], allowed_token_ids=yes + eos),
             SamplingParams(max_tokens=12, temperature=0, choices=["yes", "no"], allowed_token_ids=[5]),
             SamplingParams(max_tokens=12, temperature=0, regex=r"[^\s\S]"),
             SamplingParams(max_tokens=8, temperature=1, regex="a{0,3}", min_tokens=5),
             SamplingParams(max_tokens=8, temperature=1, allowed_token_ids=a, bad_words=["a"]),
             SamplingParams(max_tokens=6, temperature=0)]
    outs = llm.generate(["Hi"] * len(cases), cases)
    costly, held, boolean, narrowed, none, empty, sampled_held, masked, plain = outs
    assert sampled_held.finish_reason == "stop" and sampled_held.text in ("", "a", "aa", "aaa"), sampled_held
    assert masked.finish_reason == "error" and "no token may come" in masked.error, masked
    assert costly.finish_reason == "error" and "too costly to follow" in costly.error, costly
    assert (held.text, held.finish_reason) == ("ab", "stop") and boolean.text in ("true", "false"), (held, boolean)
    assert boolean.finish_reason == "stop" and (narrowed.text, narrowed.finish_reason) == ("yes", "stop"), narrowed
    assert none.finish_reason == "error" and "among its allowed_token_ids" in none.error, none
    assert empty.finish_reason == "error" and "no token continues" in empty.error, empty
    assert plain.finish_reason == "length" and len(plain.token_ids) == 6
    alone = llm.generate(["Hi"], SamplingParams(max_tokens=6, temperature=0))[0]
    assert alone.token_ids == plain.token_ids
    with pytest.raises(UserError, match="allowed_token_ids holds only ids that end the request"):
        llm.generate("Hi", SamplingParams(max_tokens=4, temperature=1, allowed_token_ids=eos, min_tokens=2))
