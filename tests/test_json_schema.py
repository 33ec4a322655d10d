"""JSON schema mode (`SamplingParams.json_schema`, `response_format: {"type": "json_schema", ...}`):
the schema's grammar accepts its instances (properties in their order, any layout) and refuses
other values at the byte where they break; refused schemas are one line naming the keyword; the
trie walk's allowed ids equal a direct check of every token; greedy answers equal transformers'
`generate` constrained by the direct check, and every finished answer is an instance."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers

from epinfer import LLM, SamplingParams
from epinfer.core.config import DEMO_MODEL
from epinfer.core.errors import UserError
from epinfer.engine.guided import vocab_bytes
from epinfer.engine.json_mode import json_vocab
from epinfer.engine.json_schema import SchemaGrammar

SCHEMA = {"type": "object", "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"},
                                                                                "y": {"type": "number"}}}},
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"enum": ["red", "green", 7, None]}},
                         "at": {"$ref": "#/$defs/point"}, "none": {"type": "null"}, "v": {"const": "1.0"}},
          "required": ["name"], "title": "ignored", "additionalProperties": False}
GOOD = [{"name": "Ada \"L\" \u00e9", "age": -36, "ok": True, "tags": ["red", 7, None], "at": {"x": 1.5, "y": -2e-3},
         "none": None, "v": "1.0"},
        {"name": "", "age": 0, "ok": False, "tags": [], "at": {"x": 0, "y": 10}, "none": None, "v": "1.0"}]


def walk(grammar, text: bytes):
    return grammar.walk(grammar.start, text)


def instance(value) -> bool:
    """`value` is an instance of SCHEMA, its properties in their order (an independent check)."""
    keys = ["name", "age", "ok", "tags", "at", "none", "v"]
    return (isinstance(value, dict) and list(value) == keys and isinstance(value["name"], str)
            and type(value["age"]) is int and type(value["ok"]) is bool and value["none"] is None
            and all(t in ("red", "green", 7, None) for t in value["tags"]) and value["v"] == "1.0"
            and list(value["at"]) == ["x", "y"] and all(type(c) in (int, float) for c in value["at"].values()))


def test_grammar_accepts_instances_and_refuses_others():
    g = SchemaGrammar(SCHEMA)
    for value in GOOD:
        assert instance(value)
        for text in (json.dumps(value), json.dumps(value, indent=2), json.dumps(value, separators=(",", ":"))):
            state = walk(g, text.encode())
            assert state is not None and g.can_end(state), text
    base = GOOD[1]
    broken = [{**base, "age": 1.5}, {**base, "age": "1"}, {**base, "ok": 1}, {**base, "tags": ["blue"]},
              {**base, "tags": [8]}, {**base, "at": {"x": 1}}, {**base, "v": "2.0"}, {**base, "none": 0},
              {k: base[k] for k in reversed(base)}, {k: v for k, v in base.items() if k != "ok"},
              {**base, "extra": 1}]
    for value in broken:
        state = walk(g, json.dumps(value).encode())
        assert state is None or not g.can_end(state), value
    top = SchemaGrammar({"type": "integer"})  # a number at the top ends with the answer
    assert top.can_end(walk(top, b"-120")) and walk(top, b"1.5") is None and walk(top, b" 1") is None
    enum = SchemaGrammar({"enum": [1, 12, "a"]})
    assert enum.can_end(walk(enum, b"1")) and enum.can_end(walk(enum, b"12")) and walk(enum, b"13") is None


UNION = {"type": "object", "properties": {
    "name": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "Name"},  # (Pydantic's)
    "n": {"type": ["integer", "string"]},
    "items": {"type": "array", "items": {"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                                                 {"type": "object", "properties": {"b": {"type": "boolean"}}},
                                                 {"enum": [1, 2]}]}}}}


def test_alternatives():
    """anyOf / oneOf / a list of types: a value of any alternative, nothing else; the states are sets
    (alternatives sharing a prefix live side by side, and merge again where they close alike)."""
    g = SchemaGrammar(UNION)
    good = [{"name": "x", "n": 3, "items": [{"a": 1}, {"b": True}, 2]}, {"name": None, "n": "s", "items": []}]
    bad = [{"name": 1, "n": 3, "items": []}, {"name": None, "n": 1.5, "items": []},
           {"name": None, "n": 1, "items": [{"c": 1}]}, {"name": None, "n": 1, "items": [3]},
           {"name": None, "n": None, "items": []}, {"name": None, "n": 1, "items": [{"a": True}]}]
    for value in good:
        for text in (json.dumps(value), json.dumps(value, indent=2)):
            state = walk(g, text.encode())
            assert state is not None and g.can_end(state), text
    for value in bad:
        state = walk(g, json.dumps(value).encode())
        assert state is None or not g.can_end(state), value
    assert len(walk(g, b'{"name": null, "n": 1, "items": [{')) == 2  # (the two objects' alternatives)
    assert len(walk(g, b'{"name": null, "n": 1, "items": [{"a": 1}')) == 1
    top = SchemaGrammar({"anyOf": [{"type": "integer"}, {"type": "string"}]})
    assert top.can_end(walk(top, b"12")) and top.can_end(walk(top, b'"a"')) and walk(top, b"1.5") is None


def test_string_patterns_and_lengths():
    """`pattern` (the whole string matches it) and `minLength` / `maxLength`: such strings are written
    without escapes; a quote closes them only where the expression may end."""
    g = SchemaGrammar({"type": "object", "properties": {"zip": {"type": "string", "pattern": "^\\d{5}$"},
                                                        "code": {"type": "string", "minLength": 2, "maxLength": 3}}})
    for value, ok in (({"zip": "12345", "code": "ab"}, True), ({"zip": "12345", "code": "éé"}, True),
                      ({"zip": "1234", "code": "ab"}, False), ({"zip": "123456", "code": "ab"}, False),
                      ({"zip": "12345", "code": "a"}, False), ({"zip": "12345", "code": "abcd"}, False),
                      ({"zip": "12345", "code": 'a"b'}, False), ({"zip": "12345", "code": "a\nb"}, False)):
        state = walk(g, json.dumps(value, ensure_ascii=False).encode())
        assert (state is not None and g.can_end(state)) == ok, value
    from epinfer.engine.json_schema import compiled_pattern

    hits = compiled_pattern.cache_info().hits  # (a pattern is compiled once, however many properties give it)
    SchemaGrammar({"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "^\\d{5}$"}
                                                    for i in range(50)}})
    assert compiled_pattern.cache_info().hits - hits >= 50
    email = {"type": "string", "pattern": "[a-z]{1,20}@[a-z]{1,12}\\.(com|org|net)"}  # (96 nodes, counted once)
    SchemaGrammar({"type": "object", "properties": {f"p{i}": email for i in range(1000)}})


def test_counted_strings_take_what_their_expression_takes():
    """`minLength` / `maxLength` strings keep a count, not an automaton: they take exactly the byte
    strings of `[^"\\\x00-\x1f]{low,high}` (UTF-8 characters of 1 to 4 bytes, not broken or overlong
    ones, no surrogates), every prefix of one stays alive, an unbounded one keeps its states few, and a
    schema of 200 of them compiles at once."""
    import random
    import time

    from epinfer.engine.json_schema import CountedChars
    from epinfer.engine.regex_grammar import RegexGrammar

    rnd = random.Random(3)
    pieces = [b"a", b" ", b"~", b"\x7f", "é".encode(), "日".encode(), "😀".encode(), b'"', b"\\", b"\n", b"\x80",
              b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", "é".encode()[:1], "😀".encode()[:3]]
    for low, high in ((0, 0), (0, 3), (2, 3), (1, None), (3, None), (0, None)):
        counted = CountedChars(low, high)
        regex = RegexGrammar('[^"\\\\\\x00-\\x1f]' + f"{{{low},{'' if high is None else high}}}")
        for _ in range(300):
            raw = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 6)))
            a, b = counted.start, regex.start
            for byte in raw:
                a = counted.step(a, byte) if a is not None else None
                b = regex.step(b, byte) if b is not None else None
                assert (a is None) == (b is None), (low, high, raw)
            assert (a is not None and counted.can_end(a)) == (b is not None and regex.can_end(b)), (low, high, raw)
    free, state = CountedChars(2, None), CountedChars(2, None).start
    for byte in b"abcdefgh":
        state = free.step(state, byte)
    assert state == free.step(free.step(free.start, 97), 98)  # (past its least, one state)
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 200 + i} for i in range(200)}}
    t = time.perf_counter()
    SchemaGrammar(big)
    assert time.perf_counter() - t < 0.2


def test_any_values():
    """A schema without a type takes any JSON value, an array without `items` any values, an object
    without `properties` any keys and values (`additionalProperties: false`: none); every value
    `json.dumps` writes of a random nested one, compact or indented, is taken, and whatever is taken
    is JSON."""
    import random

    rnd = random.Random(5)

    def value(depth: int = 0):
        pick = rnd.randint(0, 5 if depth < 4 else 3)
        if pick == 0:
            return rnd.choice([True, False, None])
        if pick == 1:
            return rnd.choice([rnd.randint(-10**6, 10**6), rnd.random() * 10 ** rnd.randint(-5, 5)])
        if pick in (2, 3):
            return "".join(rnd.choice('ab"\\é日\n\t ') for _ in range(rnd.randint(0, 6)))
        if pick == 4:
            return [value(depth + 1) for _ in range(rnd.randint(0, 3))]
        return {rnd.choice(["a", "b", "k\"", "é"]): value(depth + 1) for _ in range(rnd.randint(0, 3))}

    def takes(g, text: str) -> bool:
        state = walk(g, text.encode())
        return state is not None and g.can_end(state)

    anything = SchemaGrammar({})
    for _ in range(400):
        v = value()
        for text in (json.dumps(v, ensure_ascii=False), json.dumps(v, indent=1), json.dumps(v, separators=(",", ":"))):
            assert takes(anything, text), text
            for cut in {rnd.randrange(len(text) + 1) for _ in range(3)}:  # (a byte changed or dropped)
                broken = text[:cut] + rnd.choice(["", ",", "}", "]", ":", '"', "x", "0"]) + text[cut + 1:]
                if takes(anything, broken):
                    json.loads(broken)
    for text, ok in (("{\"a\" 1}", False), ("[1,]", False), ("{,}", False), ("01", False), ("tru", False),
                     ("[[[]]]", True), ('{"a": {"b": [1, "x", null]}}', True)):
        assert takes(anything, text) == ok, text
    free = SchemaGrammar({"type": "object", "properties": {"x": {"type": "array"}, "y": {}, "z": {"type": "object"}}})
    assert takes(free, '{"x": [1, "a", {"b": null}], "y": {"q": [true]}, "z": {"w": 1.5e3, "v": []}}')
    assert not takes(free, '{"x": 1, "y": 2, "z": {}}')
    closed = SchemaGrammar({"type": "object", "additionalProperties": False})
    assert takes(closed, "{}") and not takes(closed, '{"a": 1}')
    assert walk(free, b'{"x": [' + b"1," * 50) == walk(free, b'{"x": [1,')  # (its states stay few)


def test_array_bounds():
    """minItems / maxItems: the items counted while the bounds need it (an unbounded array keeps one
    state a mode, whatever its length)."""
    g = SchemaGrammar({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3})
    for value, ok in (([], False), ([1], False), ([1, 2], True), ([1, 2, 3], True), ([1, 2, 3, 4], False)):
        state = walk(g, json.dumps(value).encode())
        assert (state is not None and g.can_end(state)) == ok, value
    free = SchemaGrammar({"type": "array", "items": {"type": "integer"}})
    assert walk(free, b"[1,2,3,4") == walk(free, b"[1")
    empty = SchemaGrammar({"type": "array", "items": {"type": "integer"}, "maxItems": 0})
    assert empty.can_end(walk(empty, b"[]")) and walk(empty, b"[1") is None


def nested(depth: int) -> dict:
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize("schema,fragment", [
    ({"type": "object", "properties": {"a": {"type": "integer", "pattern": "x"}}}, "schema.a: pattern not supported"),
    ({"type": "string", "pattern": "(?=x)"}, "schema: pattern: regex: '\\(\\?' groups"),
    ({"type": "string", "pattern": "x", "maxLength": 3}, "pattern with minLength / maxLength not supported"),
    ({"type": "string", "pattern": 'a"b|\\n'}, "pattern matches no string free of quotes, backslashes and control"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength / maxLength must be integers"),
    ({"type": "string", "minLength": "2"}, "minLength / maxLength must be integers"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 1}, "minItems / maxItems must be"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "schema: uniqueItems not supported"),
    ({"anyOf": [{"type": "string"}], "type": "string"}, "schema: type beside anyOf not supported"),
    ({"anyOf": []}, "schema: anyOf must be a non-empty array"), ({"type": []}, "schema: type must be a non-empty"),
    ({"oneOf": [{"type": "string"}, {"type": "date"}]}, r"schema.oneOf[1]: type must be one of"),
    ({"type": "tuple"}, "type must be one of"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "$defs": {"a": {"$ref": "#/$defs/a"}}},
     "not recursively"),
    ({"enum": []}, "enum must be a non-empty array"),
    (nested(40), "nested more than 16 deep"), ({"type": "string", "$defs": [1]}, r"\$defs must be an object"),
    ({"type": "object", "properties": {"a": 1}}, "schema.a must be an object")])
def test_refused_schemas(schema, fragment):
    with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        SchemaGrammar(schema)
    with pytest.raises(UserError, match="request 0: json_schema"):
        LLM().generate("x", SamplingParams(max_tokens=4, json_schema=schema))


def test_python_values_json_cannot_hold_are_refused():
    with pytest.raises(UserError, match="request 0: json_schema: the schema must be JSON values"):
        LLM().generate("x", SamplingParams(max_tokens=4, json_schema={"enum": [{1, 2}]}))


def direct_allowed(vocab, grammar, state) -> list[int]:
    return [t for t, raw in enumerate(vocab.of) if raw and grammar.walk(state, raw) is not None]


def test_trie_walk_equals_a_direct_check():
    llm = LLM()
    vocab = vocab_bytes(llm.tokenizer, llm.engine.model_config.vocab_size)
    g = SchemaGrammar(SCHEMA)
    for prefix in (b"", b"{", b'{"na', b'{"name": "x', b'{"name": "x", "age": 1', b'{"name": "x", "age": 1, "ok": ',
                   b'{"name":"","age":0,"ok":true,"tags":[', b'{"name":"","age":0,"ok":true,"tags":["red",7'):
        state = walk(g, prefix)
        assert state is not None, prefix
        assert json_vocab(vocab).allowed(state, g).ids.tolist() == direct_allowed(vocab, g, state), prefix
    g = SchemaGrammar(UNION)
    for prefix in (b"", b'{"name": ', b'{"name": "x', b'{"name": null, "n": ', b'{"name": null, "n": 1, "items": [{'):
        state = walk(g, prefix)
        assert state is not None, prefix
        assert json_vocab(vocab).allowed(state, g).ids.tolist() == direct_allowed(vocab, g, state), prefix
    g = SchemaGrammar(FREE)
    for prefix in (b"", b'{"meta": ', b'{"meta": {"a', b'{"meta": [1, {"b": ', b'{"meta": null, "tags": [',
                   b'{"meta": 1, "tags": [], "extra": {', b'{"meta": 1, "tags": [], "extra": {"k": 2'):
        state = walk(g, prefix)
        assert state is not None, prefix
        assert json_vocab(vocab).allowed(state, g).ids.tolist() == direct_allowed(vocab, g, state), prefix


def test_counted_strings_share_allowed_ids_where_no_token_reaches_a_bound():
    """A counted string's states whose counts no token can take to a bound share their allowed ids
    (one sweep); at every count, whole characters or a token's first bytes of one, they are the
    ids a direct check allows, closing quote and the schema's next bytes included."""
    llm = LLM()
    vocab = vocab_bytes(llm.tokenizer, llm.engine.model_config.vocab_size)
    jv = json_vocab(vocab)
    reach = len(jv.columns)
    g = SchemaGrammar({"type": "object", "properties": {"s": {"type": "string", "minLength": reach + 5,
                                                              "maxLength": 3 * reach}, "n": {"type": "integer"}}})
    before = len(jv.cache)
    for k in range(3 * reach + 1):
        for tail in ("", "é"[:1]):  # (between characters, or after the first byte of a 3-byte one)
            state = walk(g, b'{"s": "' + b"x" * k + tail.encode("latin-1"))
            if state is None:
                continue
            assert jv.allowed(state, g).ids.tolist() == direct_allowed(vocab, g, state), (k, tail)
    assert len(jv.cache) - before < 2 * (3 * reach + 1) - reach  # (the counts in the middle: one entry each way)


def test_property_orders_are_other_schemas():
    """Two schemas with the same properties in other orders are other grammars: their states (alike
    tuples, other meanings) never share remembered allowed ids."""
    llm = LLM()
    vocab = vocab_bytes(llm.tokenizer, llm.engine.model_config.vocab_size)
    xy = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "boolean"}}}
    yx = {"type": "object", "properties": {"y": {"type": "boolean"}, "x": {"type": "integer"}}}
    for schema, prefix in ((xy, b'{"x": '), (yx, b'{"y": ')):
        g = SchemaGrammar(schema)
        state = walk(g, prefix)
        assert json_vocab(vocab).allowed(state, g).ids.tolist() == direct_allowed(vocab, g, state), schema


SIMPLE = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"},
                                           "c": {"enum": ["red", "green"]}}}
OPTIONAL = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"anyOf": [{"type": "integer"},
                                                                                       {"type": "null"}]},
                                             "c": {"type": ["boolean", "string"]}}}


def fits(schema: dict, v) -> bool:
    """An instance of SIMPLE / OPTIONAL / PATTERNED / FREE (an independent check)."""
    if schema is FREE:
        return list(v) == ["meta", "tags", "extra"] and type(v["tags"]) is list and type(v["extra"]) is dict
    if schema is PATTERNED:
        return (list(v) == ["id", "ok", "tag"] and re.fullmatch(r"[A-Z]{2}\d{2}", v["id"]) is not None
                and type(v["ok"]) is bool and isinstance(v["tag"], str) and len(v["tag"]) <= 4)
    if list(v) != ["ok", "n", "c"] or type(v["ok"]) is not bool:
        return False
    if schema is SIMPLE:
        return type(v["n"]) is int and v["c"] in ("red", "green")
    return (v["n"] is None or type(v["n"]) is int) and type(v["c"]) in (bool, str)


PATTERNED = {"type": "object", "properties": {"id": {"type": "string", "pattern": "[A-Z]{2}\\d{2}"},
                                              "ok": {"type": "boolean"}, "tag": {"type": "string", "maxLength": 4}}}
FREE = {"type": "object", "properties": {"meta": {}, "tags": {"type": "array"}, "extra": {"type": "object"}}}


@pytest.mark.parametrize("schema", [SIMPLE, OPTIONAL, PATTERNED, FREE], ids=["simple", "alternatives", "patterns",
                                                                         "free"])
def test_answers_follow_the_schema(schema):
    llm = LLM(dtype="float32")
    tok, eos = llm.tokenizer, llm.engine.eos_ids
    model = transformers.AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.float32)
    vocab = vocab_bytes(tok, model.config.vocab_size)
    g = SchemaGrammar(schema)
    prompt = "Beautiful is"
    ids = tok(prompt)["input_ids"]

    def allowed(batch, sequence):
        state = walk(g, b"".join(vocab.of[t] for t in sequence[len(ids):].tolist()))
        return (direct_allowed(vocab, g, state) if g.open(state) else []) + (sorted(eos) if g.can_end(state) else [])

    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             prefix_allowed_tokens_fn=allowed, generation_config=transformers.GenerationConfig(
                                 do_sample=False, max_new_tokens=40, eos_token_id=sorted(eos), pad_token_id=0))
    out = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0, json_schema=schema))[0]
    assert out.token_ids == ref[0, len(ids):].tolist()
    sampled = llm.generate([prompt] * 8, [SamplingParams(max_tokens=300, temperature=1.0, seed=i, json_schema=schema)
                                          for i in range(8)])
    finished = [json.loads(o.text) for o in [out, *sampled] if o.finish_reason == "stop"]
    assert finished and all(fits(schema, v) for v in finished), finished
