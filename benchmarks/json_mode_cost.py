"""Host cost of JSON mode, JSON schemas and guided regexes on a large vocabulary (CPU; no tokenizer download): a
synthetic vocabulary of N byte strings shaped like a BPE vocabulary's (half of them led by a space
or a quote), the time to index it (`json_mode.JsonVocab`) and to find the allowed ids of the parser
states a typical answer passes through, once each (later steps in a state are cache hits), checked
against a direct walk of every token.

    python benchmarks/json_mode_cost.py [--tokens 150000]
"""

from __future__ import annotations

import argparse
import json
import random
import time
import types

from epinfer.engine.json_mode import OBJECT, JsonVocab
from epinfer.engine.json_schema import SchemaGrammar
from epinfer.engine.regex_grammar import RegexGrammar

PREFIXES = [b"{", b'{"', b'{"name":', b'{"name": "x', b'{"name": "x", "a": [1, ', b'{"a": {"b": tr']
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}}}
SCHEMA_PREFIXES = [b"", b"{", b'{"name": "x', b'{"name": "x", "age": 1', b'{"name": "x", "age": 1, "tags": [']
REGEXES = [(r"\d{3}-\d{4}", [b"", b"12", b"123-"]), (r"[A-Z][a-z]+( [A-Z][a-z]+)*", [b"", b"Ab", b"Ab C"]),
           (r"[^\n]*", [b""]), (r".{0,200}", [b"", b"abc", b"a" * 190])]  # (the last two: nearly every token)
LENGTHS = {"type": "object", "properties": {"code": {"type": "string", "maxLength": 100}}}
LENGTH_PREFIXES = [b'{"code": "', b'{"code": "ab', b'{"code": "' + b"x" * 98]


def synthetic(n: int) -> list[bytes]:
    rng = random.Random(0)
    letters, punct = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", b' ,.:;"{}[]()\\\n-_\'!?'
    toks: set[bytes] = set()
    while len(toks) < n:
        lead = bytes([rng.choice(b' "')]) if rng.random() < 0.5 else b""
        toks.add(lead + bytes(rng.choice(letters) if rng.random() < 0.85 else rng.choice(punct)
                              for _ in range(rng.randint(1, 10))))
    return sorted(toks)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=150000)
    args = ap.parse_args()
    vocab = types.SimpleNamespace(of=synthetic(args.tokens))
    t = time.perf_counter()
    jv = JsonVocab(vocab)
    print(json.dumps({"tokens": args.tokens, "index_s": round(time.perf_counter() - t, 3)}))
    cases = [(OBJECT, PREFIXES), (SchemaGrammar(SCHEMA), SCHEMA_PREFIXES), (SchemaGrammar(LENGTHS), LENGTH_PREFIXES),
             *((RegexGrammar(pattern), prefixes) for pattern, prefixes in REGEXES)]
    for grammar, prefixes in cases:
        for prefix in prefixes:
            state = grammar.walk(grammar.start, prefix)
            if grammar.json_states:
                state = (*state[:3], 0)
            t = time.perf_counter()
            ids = jv.allowed(state, grammar).ids
            ms = (time.perf_counter() - t) * 1e3
            direct = [i for i, raw in enumerate(vocab.of) if grammar.walk(state, raw) is not None]
            print(json.dumps({"grammar": grammar.key[:40], "prefix": prefix.decode(), "allowed": len(ids),
                              "ms": round(ms, 1), "equals_direct": ids.tolist() == direct}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
