"""The guides' vocabulary sweep (`json_mode.JsonVocab.sweep`): on a wide random vocabulary (long tokens,
UTF-8 pieces, quotes and control bytes) the ids it allows from a state equal a direct check of every
token, for regular expressions, JSON mode and JSON schemas; its work is bounded, the same whether a
state's ids were remembered or not, and a guide that passes a bound fails its request alone while the
others in its steps give the tokens they give alone."""

from __future__ import annotations

import random

import pytest
import torch

from epinfer import LLM, SamplingParams
from epinfer.core.errors import UserError
from epinfer.engine import json_mode
from epinfer.engine.json_mode import OBJECT, JsonVocab
from epinfer.engine.json_schema import SchemaGrammar
from epinfer.engine.regex_grammar import RegexGrammar

SCHEMA = {"type": "object", "required": ["name", "n"],
          "properties": {"name": {"type": "string", "pattern": "[A-Z][a-z]{1,8}"}, "n": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}}}


class WideVocab:
    """`guided.VocabBytes`'s fields over random byte strings (no tokenizer)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        pieces = {bytes([b]) for b in range(256)}
        pool = ["ab", "a", "b", "c", "x", " ", "\n", '"', "\\", "{", "}", ":", ",", "1", "0", "-", ".", "é", "日",
                "A", "Z", "e", "true", "null", "\t", "\\u00"]
        while len(pieces) < size:
            raw = "".join(rng.choice(pool) for _ in range(rng.choice((1, 2, 3, 5, 8, 20, 40)))).encode()
            if rng.random() < 0.1:
                raw = raw[: rng.randrange(1, len(raw) + 1)]  # (split inside a character)
            pieces.add(raw)
        self.of = [b""] + sorted(pieces)  # (id 0: no bytes, as a special token)
        self.ids: dict = {}
        for t, raw in enumerate(self.of):
            if raw:
                self.ids.setdefault(raw, []).append(t)
        self.json = None


def direct(vocab, grammar, state) -> list[int]:
    return [t for t, raw in enumerate(vocab.of) if raw and grammar.walk(state, raw) is not None]


def test_sweep_equals_a_direct_check_on_a_wide_vocabulary():
    vocab = WideVocab(3000)
    jv = JsonVocab(vocab)
    grammars = [(RegexGrammar(r".*a.{3}"), ["", "ab", "xaxa"]),
                (RegexGrammar(r'(ab|a)*"?\d{0,3}é?'), ["", "aba", 'ab"1']),
                (RegexGrammar(r"[^\n]{0,30}\n"), ["", "a" * 29]), (RegexGrammar("日+[^a-z]"), ["", "日"]),
                (OBJECT, ["{", '{"a', '{"a": 1', '{"a": [tr', '{"a": "x\\u0', "{ \n  "]),
                (SchemaGrammar(SCHEMA), ["", '{"name": "A', '{"name": "Ab", "n": -1',
                                         '{"name": "Ab", "n": 2, "tags": ['])]
    for grammar, prefixes in grammars:
        for prefix in prefixes:
            state = grammar.walk(grammar.start, prefix.encode())
            assert state is not None, (grammar.key, prefix)
            got = jv.allowed(state, grammar)
            assert got.ids.tolist() == direct(vocab, grammar, state), (grammar.key, prefix)
            assert jv.allowed(state, grammar) is got  # (remembered)
            bits = got.bits()  # (its mask: bit t % 8 of byte t // 8)
            assert [t for t in range(len(bits) * 8) if bits[t // 8] >> (t % 8) & 1] == got.ids.tolist()


def test_a_sweep_past_its_bound_fails_the_same_every_time(monkeypatch):
    """The bound counts the (state, byte) pairs a sweep steps and their states' nodes: what a request
    asks for alone, whatever the grammar remembers from earlier requests (ranks agree)."""
    vocab = WideVocab(2000, seed=1)
    grammar = RegexGrammar(r"(.*a.{6}){2}")
    state = grammar.walk(grammar.start, b"xaxxab")
    monkeypatch.setattr(json_mode, "MAX_SWEEP_WORK", 2000)
    for _ in range(2):  # (the second time the grammar's steps are remembered)
        with pytest.raises(UserError, match="too costly to follow: finding the tokens that may come next takes more"):
            JsonVocab(vocab).allowed(state, grammar)
    jv = JsonVocab(vocab)
    with pytest.raises(UserError, match="too costly") as first:
        jv.allowed(state, grammar)
    monkeypatch.setattr(JsonVocab, "sweep", None)  # (a state that failed fails again at once, unswept)
    with pytest.raises(UserError, match="too costly") as again:
        jv.allowed(state, grammar)
    assert str(again.value) == str(first.value)
    monkeypatch.undo()
    assert JsonVocab(vocab).allowed(state, grammar).ids.tolist() == direct(vocab, grammar, state)


def test_a_costly_guide_fails_alone_in_the_engine(monkeypatch):
    monkeypatch.setattr(json_mode, "MAX_SWEEP_WORK", 12_000)  # (the first states here take 7,000-9,000)
    llm = LLM(dtype="float32")
    cases = [SamplingParams(max_tokens=40, temperature=0, regex=r"(.*[a-e].{4}){3}"),
             SamplingParams(max_tokens=6, temperature=0, regex="[a-z ]{1,12}"),
             SamplingParams(max_tokens=6, temperature=0)]
    costly, cheap, plain = llm.generate(["Hi"] * 3, cases)
    assert costly.finish_reason == "error" and "too costly to follow" in costly.error, costly
    assert "\n" not in costly.error and cheap.finish_reason in ("length", "stop") and cheap.error is None, cheap
    alone = llm.generate(["Hi", "Hi"], [cases[1], cases[2]])
    assert [o.token_ids for o in alone] == [cheap.token_ids, plain.token_ids]


def test_remembered_ids_are_bounded_in_all(monkeypatch):
    """Each state of `.{0,40}` allows nearly every token: the states remembered are bounded by their
    ids in all, not only by their count, and a state forgotten is found again the same."""
    vocab = WideVocab(2000, seed=3)
    jv = JsonVocab(vocab)
    monkeypatch.setattr(json_mode, "MAX_REMEMBERED_IDS", 5 * len(vocab.of))
    grammar = RegexGrammar(r"[^\n]{0,40}")
    states = [grammar.walk(grammar.start, b"x" * n) for n in range(20)]
    first = [jv.allowed(state, grammar).ids for state in states]
    assert len(jv.cache) < len(states) and jv.remembered == sum(len(got.ids) for got in jv.cache.values())
    assert jv.remembered <= json_mode.MAX_REMEMBERED_IDS
    assert all(torch.equal(jv.allowed(state, grammar).ids, ids) for state, ids in zip(states, first, strict=True))


@pytest.mark.parametrize("bits_from", [0, 100, 1 << 20])
def test_rows_masked_by_bits_or_by_ids_alike(monkeypatch, bits_from):
    """`penalties.allow`: rows given as a `TokenSet` (sent as a bit mask when it holds more than
    `BITS_FROM` ids), a list or a tensor of ids leave exactly their ids, on a vocabulary whose size
    is not a multiple of 8; other rows are untouched. Long allowed_token_ids are made a `TokenSet`
    once a request."""
    from epinfer.engine import penalties, restrict
    from epinfer.engine.guided import TokenSet
    from epinfer.engine.scheduler import Sequence

    monkeypatch.setattr(penalties, "BITS_FROM", bits_from)
    rng = random.Random(4)
    V = 1003
    logits = torch.randn(6, V)
    sets = [sorted(rng.sample(range(V), k)) for k in (1, 700, 1003, 5)]
    rows = [(0, TokenSet(torch.tensor(sets[0]))), (2, sets[1]), (3, TokenSet(torch.tensor(sets[2])).with_ids([7])),
            (5, torch.tensor(sets[3]))]
    out = penalties.allow(logits, rows)
    for r, ids in ((0, sets[0]), (2, sets[1]), (3, sets[2]), (5, sets[3])):
        assert torch.isfinite(out[r]).nonzero().flatten().tolist() == ids, r
        assert torch.equal(out[r, ids], logits[r, ids])
    assert torch.equal(out[[1, 4]], logits[[1, 4]])
    seq = Sequence(0, [1], SamplingParams(allowed_token_ids=sets[1]), 10)
    first = restrict.allowed_rows([seq], None, V, lambda p: set())[0][0][1]
    again = restrict.allowed_rows([seq], None, V, lambda p: set())[0][0][1]
    assert (first is again and first.ids.tolist() == sets[1]) if bits_from < 700 else first == sets[1]


def test_a_stop_id_that_is_an_ordinary_token_ends_only_a_complete_answer():
    """stop_token_ids holding a token the guide may take mid-answer ('a' inside `a+b`, '{' opening
    a JSON object): it is not sampled before the answer is complete, so an answer that stops is
    whole (or the request fails: nothing else continues it)."""
    import json
    import re

    llm = LLM(dtype="float32")
    tok = llm.tokenizer
    a, brace = (tok(t, add_special_tokens=False)["input_ids"] for t in ("a", "{"))
    assert len(a) == len(brace) == 1
    whole = {"regex": lambda t: re.fullmatch("a+b", t) is not None, "json": lambda t: isinstance(json.loads(t), dict),
             "choice": lambda t: t in ("ab", "aab")}
    cases = {"regex": SamplingParams(max_tokens=16, temperature=0, regex="a+b", stop_token_ids=a),
             "json": SamplingParams(max_tokens=24, temperature=0, json_object=True, stop_token_ids=brace),
             "choice": SamplingParams(max_tokens=16, temperature=1, seed=3, choices=["ab", "aab"], stop_token_ids=a)}
    outs = llm.generate(["Hi"] * len(cases), list(cases.values()))
    for (kind, _), out in zip(cases.items(), outs, strict=True):
        assert out.finish_reason in ("stop", "error", "length"), out
        assert out.finish_reason != "stop" or whole[kind](out.text), (kind, out)


def test_a_long_guided_choice_costs_what_a_short_one_does():
    """The ids a choice allows are looked up for each prefix of its rest up to the longest token's
    length only (a 4,000-byte choice once cost 4,000 lookups a step): the same ids as every prefix."""
    from epinfer.engine.guided import allowed_ids, vocab_bytes

    llm = LLM(dtype="float32")
    vocab = vocab_bytes(llm.tokenizer, llm.engine.model_config.vocab_size)
    choices = ["ab" * 2040 + f"{i:04d}" for i in range(8)] + ["abc"]
    every = sorted({t for c in choices for k in range(1, len(c) + 1) for t in vocab.ids.get(c.encode()[:k], ())})
    assert allowed_ids(vocab, choices, [], {10**6}) == every


def test_a_large_schema_costs_its_remembered_states_little():
    """A schema's key is a digest, and a literal's state holds where it is among the options, not
    the bytes read: 4,096 remembered states of distinct megabyte schemas once held gigabytes."""
    g = SchemaGrammar({"enum": ["a" + "x" * 100_000, "b" + "x" * 100_000, "ax"]})
    state = g.walk(g.start, b'"a' + b"x" * 50_000)
    assert state is not None and len(repr(state)) < 200 and len(g.key) < 80
    assert g.can_end(g.walk(g.start, b'"ax"')) and g.walk(g.start, b'"ay') is None
