"""JSON schema mode (`SamplingParams.json_schema`, OpenAI's `response_format: {"type": "json_schema",
"json_schema": {"schema": ...}}`): the answer is one JSON value of the schema, then the end of the
sequence, as `json_mode` does for any object.

The schemas OpenAI's strict mode takes, which is what clients send: an object's `properties` all
come, in their order (strict mode requires them all; `required` may list fewer, but every one is
written), and no others; `type` string, integer, number, boolean, null, object or array (`items`),
or a list of them; no type (nor `properties` or `items`: any JSON value), an array without `items`
(any values) and an object without `properties` (any keys and values; none with
`additionalProperties: false`); `enum` and `const` of any JSON values; `anyOf` / `oneOf` (Pydantic's optional
fields: a value of any of the alternatives); a string's `pattern` (`regex_grammar`'s subset; the whole
string matches it) or `minLength` / `maxLength` (such strings are written without escapes); an array's
`minItems` / `maxItems`; `$ref` to `#/$defs/NAME` (or `#/definitions/NAME`), not recursive. Other
keywords that would constrain the value (`minimum`, `uniqueItems`, ...) are refused with a one-line
error naming them; descriptive ones (`title`, `description`, `default`, ...) are ignored.

The schema compiles into nodes; the parser state is `json_mode`'s layout with the open containers
as (kind, node, property index) frames, so `json_mode.JsonVocab` finds each state's allowed ids. A
schema with alternatives (`anyOf`, a list of types) steps a set of such states, one per alternative
still alive (where two close the same way they are one again).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json

from epinfer.core.errors import UserError
from epinfer.engine import json_mode
from epinfer.engine.json_mode import CLOSED, END, MAX_DEPTH, MAX_SPACE, SPACE, Grammar, number_byte, number_start
from epinfer.engine.regex_grammar import MAX_REPEAT, RegexGrammar

IGNORED = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "additionalProperties",
           "required", "strict", "format"}  # (format: a hint, not checked here)
STRING_KEYS = {"pattern", "minLength", "maxLength"}
ARRAY_KEYS = {"minItems", "maxItems"}
MAX_ITEMS = 1024
TYPES = ("string", "integer", "number", "boolean", "null", "object", "array")
MAX_NODES = 1024
MAX_PATTERN_NODES = 50_000  # its patterns' automata in all (their build: about 4 µs a node, on the step loop)


def escape_free(lo: int, hi: int) -> bool:
    """Whether code points [lo, hi] hold one a JSON string holds without an escape (not a quote, a
    backslash or a control character)."""
    return hi > 0x5C or any(c not in (0x22, 0x5C) for c in range(max(lo, 0x20), hi + 1))


@functools.lru_cache(maxsize=64)
def compiled_pattern(pattern: str) -> RegexGrammar:
    """A string pattern's expression, compiled once for all the properties and schemas that give it
    (200 properties of one e-mail pattern compiled in 0.1-0.2 s, each its own). Few are kept: each
    remembers its steps (up to `regex_grammar.MAX_MEMO`, kept while the pattern is)."""
    return RegexGrammar(pattern)


class CountedChars:
    """A string of `low` to `high` (None: any number) characters written without escapes (not a quote,
    a backslash or a control character): the expression `[^"\\\x00-\x1f]{low,high}` with the count in
    its state, not an automaton node a character (each length its own automaton: a schema of 200 such
    strings compiled in about half a second). States: (characters read, capped at `low` where `high`
    is None; the one-character automaton's state)."""

    def __init__(self, low: int, high: int | None) -> None:
        self.one = compiled_pattern('[^"\\\\\\x00-\\x1f]')  # (one such character: compiled once, shared)
        self.low, self.high = low, high
        self.start = (0, self.one.start)

    def step(self, state: tuple, b: int) -> tuple | None:
        k, inner = state
        if self.high is not None and k >= self.high:  # (no character more: not even its first byte)
            return None
        nxt = self.one.step(inner, b)
        if nxt is None or not self.one.can_end(nxt):  # (refused, or a character's first bytes)
            return None if nxt is None else (k, nxt)
        if self.high is None:
            return (min(k + 1, self.low), self.one.start)
        return (k + 1, self.one.start)

    def can_end(self, state: tuple) -> bool:
        return state[0] >= self.low and state[1] == self.one.start

    def weight(self, state: tuple) -> int:
        return self.one.weight(state[1])

    def cache_key(self, state: tuple, reach: int) -> tuple:
        """Counts no token of at most `reach` bytes can take to a bound are one: from `low` to
        `high` - `reach` a token may close the string or not, whatever the count, and below `low` -
        `reach` none may (a token adds at most a character a byte). A string of `maxLength` 1000
        then takes a sweep for its first characters and its last `reach`, not one a count."""
        k, inner = state
        if k >= self.low and (self.high is None or k + reach <= self.high):
            return ("free", inner)
        return ("short", inner) if k + reach < self.low else state


class SchemaGrammar(Grammar):
    """A compiled schema: nodes ("obj", ((key literal, node), ...)), ("map", any key's value node),
    ("arr", node, minItems, maxItems or None), ("str",), ("pat", RegexGrammar or CountedChars),
    ("int",), ("num",), ("lit", (serialised value, ...)) or ("any", (node, ...)); `start` the state
    before the answer's first byte (with alternatives: the set of states, `step_union`)."""

    def __init__(self, schema: dict) -> None:
        self.nodes: list[tuple] = []
        self.defs: dict = {}
        for key in ("$defs", "definitions"):
            defs = schema.get(key, {}) if isinstance(schema, dict) else {}
            if not isinstance(defs, dict):
                raise UserError(f"json_schema: {key} must be an object")
            self.defs.update(defs)
        self.unions = False  # an "any" node: the states are sets
        self.any_node: int | None = None  # (`any_value`)
        self.pattern_nodes = 0  # the automaton nodes of its distinct patterns, in all
        self.patterns: set[str] = set()  # (their keys: one given twice is compiled, and counted, once)
        root = self.compile(schema, "schema", (), 0)
        text = json.dumps(schema)  # (in its own key order: properties come in it)
        super().__init__("schema:" + hashlib.sha256(text.encode()).hexdigest(),  # (a short key: remembered states
                         # keep theirs alive, and 4,096 of them of distinct megabyte schemas held gigabytes)
                         self.step_union if self.unions else self.step_schema)
        self.start = ((), "V", root, 0)
        if self.unions:
            self.json_states = False
            self.start = frozenset([self.start])

    def compile(self, s, where: str, refs: tuple, depth: int) -> int:
        if not isinstance(s, dict):
            raise UserError(f"json_schema: {where} must be an object")
        if depth > MAX_DEPTH:  # (the answer nests at most that deep anyway)
            raise UserError(f"json_schema: nested more than {MAX_DEPTH} deep")
        if "$ref" in s:
            ref = s["$ref"]
            name = ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None
            if name not in self.defs or not ref.startswith(("#/$defs/", "#/definitions/")) or name in refs:
                raise UserError(f"json_schema: {where}: $ref {ref!r} must name a definition, not recursively")
            return self.compile(self.defs[name], f"$defs/{name}", (*refs, name), depth + 1)
        union = next((k for k in ("anyOf", "oneOf") if k in s), None)
        if union is not None or isinstance(s.get("type"), list):
            return self.alternatives(s, union, where, refs, depth)
        unknown = sorted(set(s) - IGNORED - {"type", "properties", "items", "enum", "const", "$defs", "definitions"}
                         - {"string": STRING_KEYS, "array": ARRAY_KEYS}.get(s.get("type"), set()))
        if unknown:
            raise UserError(f"json_schema: {where}: {', '.join(unknown)} not supported")
        if len(self.nodes) >= MAX_NODES:
            raise UserError(f"json_schema: more than {MAX_NODES} parts")
        if "const" in s or "enum" in s:
            values = [s["const"]] if "const" in s else s["enum"]
            if not isinstance(values, list) or not values:
                raise UserError(f"json_schema: {where}: enum must be a non-empty array")
            try:
                return self.add(("lit", tuple(sorted({json.dumps(v, ensure_ascii=False).encode() for v in values}))))
            except (TypeError, ValueError):
                raise UserError(f"json_schema: {where}: enum values must be JSON values") from None
        kind = s.get("type")
        if kind is None:  # (properties or items say which; else any JSON value, as JSON Schema reads it)
            kind = "object" if "properties" in s else "array" if "items" in s else None
            if kind is None:
                return self.any_value()
        if kind not in TYPES:
            raise UserError(f"json_schema: {where}: type must be one of {', '.join(TYPES)} (or give enum / const)")
        if kind == "object":
            if "properties" not in s and s.get("additionalProperties", True) is not False:
                return self.add(("map", self.any_value()))  # (any keys, any values)
            props = s.get("properties", {})
            if not isinstance(props, dict):
                raise UserError(f"json_schema: {where}: properties must be an object")
            index = self.add(None)
            self.nodes[index] = ("obj", tuple((json.dumps(k, ensure_ascii=False).encode(),
                                               self.compile(v, f"{where}.{k}", refs, depth + 1))
                                              for k, v in props.items()))
            return index
        if kind == "array":
            index = self.add(None)
            low, high = s.get("minItems", 0), s.get("maxItems")
            if any(type(v) is not int or not 0 <= v <= MAX_ITEMS for v in (low, high) if v is not None) or (
                    high is not None and high < low):
                raise UserError(f"json_schema: {where}: minItems / maxItems must be integers in [0, {MAX_ITEMS}], "
                                "the least first")
            items = self.compile(s["items"], f"{where}[]", refs, depth + 1) if "items" in s else self.any_value()
            self.nodes[index] = ("arr", items, low, high)
            return index
        if kind == "string" and STRING_KEYS & set(s):
            grammar = self.string_pattern(s, where)
            if isinstance(grammar, RegexGrammar) and grammar.key not in self.patterns:
                self.patterns.add(grammar.key)
                self.pattern_nodes += len(grammar.auto.edges)
            if self.pattern_nodes > MAX_PATTERN_NODES:
                raise UserError(f"json_schema: its patterns need more than {MAX_PATTERN_NODES:,} automaton nodes "
                                "in all")
            return self.add(("pat", grammar))
        return self.add({"string": ("str",), "integer": ("int",), "number": ("num",),
                         "boolean": ("lit", (b"false", b"true")), "null": ("lit", (b"null",))}[kind])

    @staticmethod
    def string_pattern(s: dict, where: str) -> RegexGrammar | CountedChars:
        """A string's `pattern` (the whole string matches it), or its `minLength` / `maxLength`
        (`CountedChars`): such a string is written without escapes."""
        if "pattern" in s:
            if "minLength" in s or "maxLength" in s:
                raise UserError(f"json_schema: {where}: pattern with minLength / maxLength not supported")
            pattern = s["pattern"]
            if not isinstance(pattern, str):
                raise UserError(f"json_schema: {where}: pattern must be a string")
        else:
            low, high = s.get("minLength", 0), s.get("maxLength")
            if any(type(v) is not int or not 0 <= v <= MAX_REPEAT for v in (low, high) if v is not None) or (
                    high is not None and high < low):
                raise UserError(f"json_schema: {where}: minLength / maxLength must be integers in [0, {MAX_REPEAT}], "
                                "the least first")
            return CountedChars(low, high)
        try:
            grammar = compiled_pattern(pattern)
        except UserError as exc:
            raise UserError(f"json_schema: {where}: pattern: {exc}") from None
        if not grammar.auto.reaches_accept(escape_free):
            raise UserError(f"json_schema: {where}: pattern matches no string free of quotes, backslashes and "
                            "control characters (a patterned string is written without escapes)")
        return grammar

    def any_value(self) -> int:
        """The schema's one node for any JSON value (a schema without a type, an array's values
        without `items`, an object's without `properties`): a string, a number, true, false, null,
        or an array or an object of any values (its states are sets, as alternatives' are)."""
        if self.any_node is None:
            self.unions = True
            index = self.any_node = self.add(None)
            self.nodes[index] = ("any", (self.add(("str",)), self.add(("num",)),
                                         self.add(("lit", (b"false", b"null", b"true"))),
                                         self.add(("arr", index, 0, None)), self.add(("map", index))))
        return self.any_node

    def alternatives(self, s: dict, union: str | None, where: str, refs: tuple, depth: int) -> int:
        """An "any" node: `anyOf` / `oneOf` (generated as anyOf: a value of any alternative), or a list
        of types (the same schema with each)."""
        if union is None:
            options, what = [{**s, "type": t} for t in s["type"]], "type"
        else:
            options, what = s[union], union
            beside = sorted(set(s) - IGNORED - {union, "$defs", "definitions"})
            if beside:
                raise UserError(f"json_schema: {where}: {', '.join(beside)} beside {union} not supported")
        if not isinstance(options, list) or not options:
            raise UserError(f"json_schema: {where}: {what} must be a non-empty array")
        alts = tuple(self.compile(o, f"{where}.{what}[{i}]", refs, depth + 1) for i, o in enumerate(options))
        self.unions = True
        return self.add(("any", alts))

    def weight(self, state) -> int:
        """A string under a pattern: its expression's nodes; a union: its states' weights, and a unit
        for every 16 of them (each is stepped, at about a sixteenth of a regex node's cost)."""
        if isinstance(state, frozenset):
            return len(state) // 16 + sum(self.weight(s) for s in state)
        return self.nodes[state[2][0]][1].weight(state[2][1]) if state[1] == "P" else 0

    def step_union(self, states: frozenset, b: int) -> frozenset | None:
        out = set()
        for state in states:
            nxt = self.step_schema(state, b)
            if isinstance(nxt, list):
                out.update(nxt)
            elif nxt is not None:
                out.add(nxt)
        return frozenset(out) if out else None

    def add(self, node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def cache_key(self, state, reach: int):
        """A state inside a counted string, its count's class (`CountedChars.cache_key`); with
        alternatives, the set of its states' keys."""
        if isinstance(state, frozenset):
            return frozenset(self.cache_key(s, reach) for s in state)
        frames, mode, aux, space = state
        counted = self.nodes[aux[0]][1] if mode == "P" else None
        if not isinstance(counted, CountedChars):
            return state
        return (frames, mode, (aux[0], counted.cache_key(aux[1], reach)), space)

    # states: (frames, mode, aux, whitespace run); frames: ("o", node, property index) / ("a", node, items:
    # counted up to its minItems / maxItems, then no further, so an unbounded array has one state a mode).
    # Modes: V a value of node aux; K the current property's key literal, aux bytes of it read; C ":";
    # E after a value (",", a closer); A0 an array's first item or "]"; S a string (aux: json_mode's
    # string state); N a number (aux: phase, + 16 for an integer); L a literal (aux: (node, its options' run,
    # bytes read): `literal`); D done
    def step_schema(self, state: tuple, b: int) -> tuple | None:
        frames, mode, aux, space = state
        if mode == "P":  # a string under a pattern (aux: its node, the expression's state)
            n, inner = aux
            grammar = self.nodes[n][1]
            if b == ord('"'):
                return self.after(frames) if grammar.can_end(inner) else None
            nxt = None if b == 0x5C or b < 0x20 else grammar.step(inner, b)
            return None if nxt is None else (frames, "P", (n, nxt), 0)
        if mode in ("S", "MS"):  # a string value, or a free object's key (then its ":")
            sub = json_mode.string_byte(aux, b)
            if sub == CLOSED:
                return self.after(frames) if mode == "S" else (frames, "C", 0, 0)
            return None if sub is None else (frames, mode, sub, 0)
        if mode == "N":
            nxt = number_byte(aux & 15, b, integer=aux >= 16)
            if nxt == END:
                return self.step_schema(self.after(frames), b)
            return None if nxt is None else (frames, "N", nxt | (aux & 16), 0)
        if mode == "L":
            return self.literal(frames, aux, b)
        if mode == "K" and (aux or b not in SPACE):  # (whitespace may come before a key)
            key = self.nodes[frames[-1][1]][1][frames[-1][2]][0]
            if b != key[aux]:
                return None
            return (frames, "C", 0, 0) if aux + 1 == len(key) else (frames, "K", aux + 1, 0)
        if b in SPACE:
            return (frames, mode, aux, space + 1) if space < MAX_SPACE and frames and mode != "D" else None
        if mode == "V":
            return self.value(frames, aux, b)
        if mode == "C":
            kind, node, i = frames[-1]
            value = self.nodes[node][1] if kind == "m" else self.nodes[node][1][i][1]
            return (frames, "V", value, 0) if b == ord(":") else None
        if mode in ("M0", "MK"):  # a free object's key begins (M0, after "{": or the object closes)
            if b == ord('"'):
                return (frames, "MS", 0, 0)
            return self.after(frames[:-1]) if b == ord("}") and mode == "M0" else None
        if mode == "A0":
            _, items, low, high = self.nodes[frames[-1][1]]
            if b == ord("]"):
                return self.after(frames[:-1]) if low == 0 else None
            return self.value(frames, items, b) if high != 0 else None
        if mode == "E":
            kind, node, i = frames[-1]
            if kind == "m":
                return (frames, "MK", 0, 0) if b == ord(",") else self.after(frames[:-1]) if b == ord("}") else None
            if kind == "a":
                _, items, low, high = self.nodes[node]
                if b == ord(","):
                    return (frames, "V", items, 0) if high is None or i < high else None
                return self.after(frames[:-1]) if b == ord("]") and i >= low else None
            if i < len(self.nodes[node][1]):
                return (frames, "K", 0, 0) if b == ord(",") else None
            return self.after(frames[:-1]) if b == ord("}") else None
        return None

    def value(self, frames: tuple, n: int, b: int) -> tuple | list | None:
        """The state after a value of node n begins with byte b (a list: one per alternative)."""
        node = self.nodes[n]
        if node[0] == "any":
            out = []
            for alt in node[1]:
                nxt = self.value(frames, alt, b)
                out.extend(nxt if isinstance(nxt, list) else [] if nxt is None else [nxt])
            return out or None
        if node[0] == "obj":
            if b != ord("{") or len(frames) >= MAX_DEPTH:
                return None
            inner = (*frames, ("o", n, 0))
            return (inner, "K", 0, 0) if node[1] else (inner, "E", 0, 0)
        if node[0] == "map":
            return ((*frames, ("m", n, 0)), "M0", 0, 0) if b == ord("{") and len(frames) < MAX_DEPTH else None
        if node[0] == "arr":  # (the frame counts the items that closed)
            return ((*frames, ("a", n, 0)), "A0", 0, 0) if b == ord("[") and len(frames) < MAX_DEPTH else None
        if node[0] == "str":
            return (frames, "S", 0, 0) if b == ord('"') else None
        if node[0] == "pat":
            return (frames, "P", (n, node[1].start), 0) if b == ord('"') else None
        if node[0] in ("int", "num"):
            phase = number_start(b)
            return None if phase is None else (frames, "N", phase | (16 if node[0] == "int" else 0), 0)
        return self.literal(frames, (n, 0, len(node[1]), 0), b)

    def literal(self, frames: tuple, aux: tuple, b: int) -> tuple | None:
        """aux (node, lo, hi, k): the options (sorted) [lo, hi) are those that start with the k bytes
        read, the one of exactly those bytes first where there is one; then byte b. A state holds no
        bytes of its own, and a step is two bisections whatever the options' count and length."""
        n, lo, hi, k = aux
        options = self.nodes[n][1]

        def at(option: bytes) -> int:
            return option[k] if len(option) > k else -1

        start = bisect.bisect_left(options, b, lo, hi, key=at)
        end = bisect.bisect_right(options, b, start, hi, key=at)
        if start < end:  # some go on with b
            if end - start == 1 and len(options[start]) == k + 1:  # only one, and it is whole
                return self.after(frames)
            return (frames, "L", (n, start, end, k + 1), 0)
        if len(options[lo]) == k:  # a complete value that another one extends: it ended before b
            return self.step_schema(self.after(frames), b)
        return None

    def can_end(self, state) -> bool:
        """Whether the answer may end in `state`: its value is complete (a top-level number or a
        literal that another one extends ends with the answer); with alternatives, in one of them."""
        if self.unions:
            return any(self.can_end_one(s) for s in state)
        return self.can_end_one(state)

    def open(self, state) -> bool:
        return any(s[1] != "D" for s in state) if self.unions else state[1] != "D"

    def can_end_one(self, state: tuple) -> bool:
        frames, mode, aux, _ = state
        if mode == "D":
            return True
        if frames:
            return False
        if mode == "L":  # (a value of exactly the bytes read is the first of its run)
            return len(self.nodes[aux[0]][1][aux[1]]) == aux[3]
        return mode == "N" and aux & 15 in (2, 3, 5, 8)

    def after(self, frames: tuple) -> tuple:
        """The state after a value closed inside `frames` (an object's property index moves on, an
        array's item count while its bounds need it)."""
        if not frames:
            return (frames, "D", 0, 0)
        kind, node, i = frames[-1]
        if kind == "a":
            _, _, low, high = self.nodes[node]
            i = min(i + 1, max(low, high or 0))
        elif kind == "o":  # (a free object's frame counts nothing: its states stay few)
            i += 1
        return ((*frames[:-1], (kind, node, i)), "E", 0, 0)


def check_schema(schema) -> None:
    """Refuses (UserError) a schema this mode does not take; nothing for None."""
    if schema is not None:
        SchemaGrammar(schema)
