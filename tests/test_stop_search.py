"""Stop strings searched incrementally (`engine.stops.StopSearch`): the same first match as a
search of the whole text at every token, and work in proportion to the output's length."""

from __future__ import annotations

import random

import pytest

from epinfer import LLM, SamplingParams
from epinfer.engine.stops import StopSearch


@pytest.fixture(scope="module")
def demo_llm():
    return LLM()


def test_stop_search_finds_the_first_match_a_whole_search_finds(demo_llm):
    """Random outputs (text tokens, byte tokens that split or break UTF-8, special tokens), stop
    strings cut from the text or absent from it, with and without min_tokens' held text: the first
    token at which StopSearch reports a match is the first at which the whole text holds one."""
    tok = demo_llm.tokenizer
    text_ids = tok("Beautiful is better than ugly.\nExplicit is better than implicit. \u00e9\u20ac\U0001F600 \ufffd",
                   add_special_tokens=False)["input_ids"]
    pools = [text_ids, list(range(tok.vocab_size)), text_ids + tok.all_special_ids + list(range(120, 260))]
    rng = random.Random(3)
    for _ in range(300):
        ids = [rng.choice(rng.choice(pools)) for _ in range(rng.choice([3, 20, 80]))]
        full = tok.decode(ids, skip_special_tokens=True)
        stops = []
        for _ in range(rng.randint(1, 3)):
            a = rng.randrange(len(full) or 1)
            stops.append(full[a:a + rng.randint(1, 12)] or "zz" if rng.random() < 0.7 else rng.choice(["zz", "\ufffd"]))
        min_tokens = min(rng.choice([0, 1, 3]), len(ids) - 1)  # (the engine searches past min_tokens only)
        held = len(tok.decode(ids[:min_tokens], skip_special_tokens=True))
        search, want, got = StopSearch(tok, stops, ids[:min_tokens]), None, None
        assert search.held_chars == held
        for i in range(min_tokens + 1, len(ids) + 1):
            text = tok.decode(ids[:i], skip_special_tokens=True)
            if want is None and any(text.find(s, max(0, held - len(s) + 1)) >= 0 for s in stops):
                want = i
            if got is None and search.found(ids[:i]):
                got = i
        assert want == got, (ids, stops, held)


def test_stop_strings_cost_a_window_a_token(demo_llm, monkeypatch):
    """A long request with stop strings that never match decodes a short window of its newest ids
    a token, not its whole output (that was O(length^2) a request, on the host between steps, which
    delays every request in the batch), and the output is the same as without stop strings."""
    tok = demo_llm.tokenizer
    decoded = []
    real = type(tok).decode

    def counting(self, ids, *args, **kwargs):
        decoded.append(len(ids))
        return real(self, ids, *args, **kwargs)

    params = dict(max_tokens=800, temperature=0, ignore_eos=True)
    plain = demo_llm.generate(["Beautiful"], SamplingParams(**params))[0]
    monkeypatch.setattr(type(tok), "decode", counting)
    out = demo_llm.generate(["Beautiful"], SamplingParams(**params, stop=["never in the Zen", "Q" * 500]))[0]
    assert out.token_ids == plain.token_ids and out.finish_reason == "length"
    assert sum(decoded) < 100 * len(out.token_ids), sum(decoded)


def test_include_stop_str_in_output(demo_llm):
    """`include_stop_str_in_output`: the text ends with the stop string that ended it (of two that
    begin at the same place, the shorter); without it, just before. `first_match` alone too."""
    from epinfer.engine.stops import first_match

    assert first_match("a better than", ["than", "better th"], 0) == 2
    assert first_match("a better than", ["than", "better th", "bet"], 0, through=True) == 5
    params = dict(max_tokens=16, temperature=0, stop=["than", "Explicit"])
    cut, kept = (demo_llm.generate("Beautiful is", SamplingParams(**params, include_stop_str_in_output=inc))[0]
                 for inc in (False, True))
    assert cut.token_ids == kept.token_ids and cut.finish_reason == kept.finish_reason == "stop"
    assert kept.text == cut.text + "than" and kept.text.endswith(" better than")


def test_a_stop_token_is_in_the_ids_not_the_text(demo_llm):
    """A request that ends on a stop token id (or the end of sequence, its text kept by
    skip_special_tokens=False) has the token in its ids and not its text, unless
    include_stop_str_in_output (vLLM's)."""
    tok = demo_llm.tokenizer
    z = tok("z", add_special_tokens=False)["input_ids"]
    forced = dict(max_tokens=8, temperature=0, allowed_token_ids=z, stop_token_ids=z)
    cut, kept = demo_llm.generate(["Hi"] * 2, [SamplingParams(**forced),
                                                SamplingParams(include_stop_str_in_output=True, **forced)])
    assert cut.token_ids == kept.token_ids == z and cut.finish_reason == kept.finish_reason == "stop"
    assert (cut.text, kept.text) == ("", "z"), (cut, kept)
    eos = sorted(demo_llm.engine.eos_ids)[0]
    ended = demo_llm.generate("Hi", SamplingParams(max_tokens=4, temperature=0, allowed_token_ids=[eos],
                                                   skip_special_tokens=False))[0]
    assert ended.token_ids == [eos] and ended.finish_reason == "stop" and ended.text == "", ended
