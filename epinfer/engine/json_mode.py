"""JSON mode (`SamplingParams.json_object`, OpenAI's `response_format: {"type": "json_object"}`):
the answer is one JSON object (RFC 8259), from its first byte "{" to its closing brace, then the end
of the sequence. At each step only the tokens whose bytes continue a valid JSON text may be
sampled, and an end id once the object is closed.

A byte-level parser state (`State`: the open containers, what may come next, and a counter of
the current run of whitespace, at most `MAX_SPACE` bytes long so that a model cannot pad forever)
steps one byte at a time (`step`, None where the byte is not valid there). The ids a state allows
are found by walking the vocabulary's bytes as a trie from that state, pruned where a byte is
refused (the vocabulary sorted by bytes: the tokens under a prefix are one range of it); inside a
string, where almost every token is valid, the tokens free of quotes, backslashes and control bytes
are taken whole and only the others walked. Each state's allowed ids are remembered
(`JsonVocab.allowed`), so a request pays for a state once. Objects nest at most `MAX_DEPTH` deep;
string bytes are not checked as UTF-8.
"""

from __future__ import annotations

import bisect
import collections

import torch

from epinfer.engine.guided import VocabBytes

MAX_DEPTH = 16
MAX_SPACE = 16  # whitespace bytes in a row (an indented line of nesting 3 and 4 spaces, and its newline)
MAX_STATES = 4096  # states whose allowed ids are remembered (least recently used go first)
SPACE = frozenset(b" \t\n\r")
HEX = frozenset(b"0123456789abcdefABCDEF")
DIGITS = frozenset(b"0123456789")
LITERALS = (b"true", b"false", b"null")
ESCAPES = frozenset(b'"\\/bfnrt')
# modes: T top level (an object must start), V a value must come, A a value or "]", K0 a key or "}",
# K a key must come, C ":" must come, E after a value (",", a closer), S in a string, N in a number,
# L in a literal, D done (only the end)
State = tuple  # (open containers "o" / "a" as a str, mode, aux, whitespace run)
START: State = ("", "T", 0, 0)
KEY = 8  # (S's aux: the string is a key)


def after_value(stack: str) -> State:
    return (stack, "E", 0, 0) if stack else (stack, "D", 0, 0)


def step(state: State, b: int) -> State | None:
    """The state after byte `b`, or None where `b` cannot come next."""
    stack, mode, aux, space = state
    if mode == "S":
        return _string(stack, aux, b)
    if mode == "N":
        return _number(stack, aux, b)
    if mode == "L":
        word, at = LITERALS[aux >> 3], aux & 7
        if b != word[at]:
            return None
        return after_value(stack) if at + 1 == len(word) else (stack, "L", aux + 1, 0)
    if b in SPACE:
        return (stack, mode, aux, space + 1) if space < MAX_SPACE and mode not in ("T", "D") else None
    if mode == "T":
        return ("o", "K0", 0, 0) if b == ord("{") else None
    if mode in ("V", "A"):
        if b == ord("]") and mode == "A":
            return after_value(stack[:-1])
        return _value(stack, b)
    if mode in ("K0", "K"):
        if b == ord('"'):
            return (stack, "S", KEY, 0)
        return after_value(stack[:-1]) if b == ord("}") and mode == "K0" else None
    if mode == "C":
        return (stack, "V", 0, 0) if b == ord(":") else None
    if mode == "E":
        top = stack[-1]
        if b == ord(","):
            return (stack, "K" if top == "o" else "V", 0, 0)
        if b == ord("}" if top == "o" else "]"):
            return after_value(stack[:-1])
    return None


def _value(stack: str, b: int) -> State | None:
    if b in (ord("{"), ord("[")):
        if len(stack) >= MAX_DEPTH:
            return None
        return (stack + "o", "K0", 0, 0) if b == ord("{") else (stack + "a", "A", 0, 0)
    if b == ord('"'):
        return (stack, "S", 0, 0)
    if (phase := number_start(b)) is not None:
        return (stack, "N", phase, 0)
    for i, word in enumerate(LITERALS):
        if b == word[0]:
            return (stack, "L", i * 8 + 1, 0)
    return None


CLOSED = END = -1  # (string_byte: the closing quote; number_byte: the number ended before the byte)


def string_byte(sub: int, b: int) -> int | None:
    """A string's next state after byte `b` (sub: 0 plain, 1 after a backslash, 2..5 the hex digits
    of a \\u escape left + 1), CLOSED at its closing quote, None where `b` cannot come."""
    if sub == 0:
        if b == ord('"'):
            return CLOSED
        if b == ord("\\"):
            return 1
        return None if b < 0x20 else 0
    if sub == 1:
        if b in ESCAPES:
            return 0
        return 5 if b == ord("u") else None
    return (sub - 1 if sub > 2 else 0) if b in HEX else None


# number phases: 1 after "-", 2 after a leading 0, 3 integer digits, 4 after ".", 5 fraction digits,
# 6 after "e", 7 after the exponent's sign, 8 exponent digits (2, 3, 5, 8 may end the number)
def number_start(b: int) -> int | None:
    if b == ord("-"):
        return 1
    return (2 if b == ord("0") else 3) if b in DIGITS else None


def number_byte(phase: int, b: int, integer: bool = False) -> int | None:
    """A number's next phase after byte `b`, END where the number ended before `b` (the byte belongs
    to what follows), None where `b` cannot come; `integer`: no fraction or exponent."""
    digit = b in DIGITS
    if phase == 1:
        return (2 if b == ord("0") else 3) if digit else None
    if phase in (2, 3, 5) and b in (ord("e"), ord("E")) and not integer:
        return 6
    if phase in (2, 3) and b == ord(".") and not integer:
        return 4
    if digit and phase in (3, 4, 5, 6, 7, 8):
        return {3: 3, 4: 5, 5: 5, 6: 8, 7: 8, 8: 8}[phase]
    if phase == 6 and b in (ord("+"), ord("-")):
        return 7
    return END if phase in (2, 3, 5, 8) else None


def _string(stack: str, aux: int, b: int) -> State | None:
    key = aux & KEY
    sub = string_byte(aux & 7, b)
    if sub == CLOSED:
        return (stack, "C", 0, 0) if key else after_value(stack)
    return None if sub is None else (stack, "S", key | sub, 0)


def _number(stack: str, phase: int, b: int) -> State | None:
    nxt = number_byte(phase, b)
    if nxt == END:  # the byte belongs to what follows the number
        return step(after_value(stack), b)
    return None if nxt is None else (stack, "N", nxt, 0)


class Grammar:
    """A byte grammar: its `step` and the key its states are remembered under. `json_states`: the
    states are in this module's layout (frames, mode, aux, whitespace run; mode "S" with aux & 7 == 0
    a plain string), which `JsonVocab.allowed` takes short cuts through (`regex_grammar`'s are not)."""

    json_states = True

    def __init__(self, key: str, step_fn) -> None:
        self.key, self.step = key, step_fn
        self.start: State = START

    def can_end(self, state: State) -> bool:
        """Whether the answer may end in `state` (JSON mode: its object is closed)."""
        return state[1] == "D"

    def open(self, state: State) -> bool:
        """Whether a byte may still come in `state`."""
        return state[1] != "D"

    def loop_bytes(self, state) -> tuple[int, int]:
        """(bytes as a 256-bit set, depth): any token of at most `depth` of those bytes is allowed in
        `state`, where a grammar knows them cheaply (`JsonVocab.looped`); (0, 0): none known."""
        return 0, 0

    def walk(self, state: State | None, raw: bytes) -> State | None:
        for b in raw:
            if state is None:
                return None
            state = self.step(state, b)
        return state


OBJECT = Grammar("object", step)  # JSON mode: any object


class JsonVocab:
    """A tokenizer's vocabulary sorted by bytes (a trie without nodes: the tokens under a prefix are
    a range of the list), and the ids each grammar state allows (remembered)."""

    def __init__(self, vocab: VocabBytes) -> None:
        pairs = sorted((raw, t) for t, raw in enumerate(vocab.of) if raw)
        self.keys = [raw for raw, _ in pairs]
        self.ids = [t for _, t in pairs]
        self.of = vocab.of
        safe = [t for raw, t in pairs if not any(b < 0x20 or b in (0x22, 0x5C) for b in raw)]
        self.unsafe = [t for raw, t in pairs if any(b < 0x20 or b in (0x22, 0x5C) for b in raw)]
        self.safe = torch.tensor(safe, dtype=torch.long)  # (keep a plain string plain)
        # each token's leading whitespace bytes: a state's allowed ids depend on its whitespace run only
        # through them, so a state is searched once for every run length
        self.lead = torch.tensor([len(raw) - len(raw.lstrip(bytes(SPACE))) for raw in vocab.of], dtype=torch.long)
        self.cache: collections.OrderedDict = collections.OrderedDict()
        self.bytes_used: torch.Tensor | None = None  # (`looped`: each token's bytes, 8 x 32 bits, and its length)
        self.lengths: torch.Tensor | None = None

    def allowed(self, state: State, grammar: Grammar = OBJECT) -> torch.Tensor:
        """The ids that may come next in `state` (a host tensor; empty where none may)."""
        json_states = grammar.json_states
        if json_states and state[3]:  # a whitespace run of state[3] bytes: the run-free state's ids, room for theirs
            ids = self.allowed((*state[:3], 0), grammar)
            return ids[self.lead[ids] <= MAX_SPACE - state[3]]
        key = (grammar.key, state)
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            return hit
        if json_states and state[1] == "S" and state[2] & 7 == 0:  # a plain string: the safe tokens keep it so
            ids = self.safe.tolist() + [t for t in self.unsafe if grammar.walk(state, self.of[t]) is not None]
        else:
            loop = grammar.loop_bytes(state)
            ids = self.looped(state, grammar, *loop) if loop[0].bit_count() >= 32 else None  # (few: a short walk)
            ids = self.search(state, grammar.step) if ids is None else ids
        out = torch.tensor(sorted(ids), dtype=torch.long)
        self.cache[key] = out
        if len(self.cache) > MAX_STATES:
            self.cache.popitem(last=False)
        return out

    def looped(self, state, grammar: Grammar, loop: int, depth: int) -> list[int] | None:
        """Where most tokens are made only of `loop`'s bytes and at most `depth` long
        (`Grammar.loop_bytes`: a regex's `[^\n]*`), those tokens whole and the others walked one by
        one; None where they are not most (the trie search prunes better)."""
        if self.bytes_used is None:
            used = [[0] * 8 for _ in self.of]
            for t, raw in enumerate(self.of):
                for b in set(raw):
                    used[t][b >> 5] |= 1 << (b & 31)
                if not raw:  # (no token: never inside)
                    used[t] = [-1] * 8
            self.bytes_used = torch.tensor(used, dtype=torch.int64)
            self.lengths = torch.tensor([len(raw) for raw in self.of])
        outside = torch.tensor([~(loop >> (32 * k)) & 0xFFFFFFFF for k in range(8)], dtype=torch.int64)
        inside = ((self.bytes_used & outside) == 0).all(1) & (self.lengths <= depth)
        found = inside.nonzero().flatten().tolist()
        if len(found) * 2 < len(self.keys):
            return None
        flags = inside.tolist()
        return found + [t for t in self.ids if not flags[t] and grammar.walk(state, self.of[t]) is not None]

    def search(self, state: State, step_fn) -> list[int]:
        """The tokens whose every byte `step_fn` takes from `state`: ranges of the sorted keys that
        share a prefix, split by their next byte, a range dropped where that byte is refused."""
        keys, found = self.keys, []
        todo = [(0, len(keys), 0, state)]  # keys[lo:hi] share their first `depth` bytes; `s` after them
        while todo:
            lo, hi, depth, s = todo.pop()
            while lo < hi and len(keys[lo]) == depth:  # (whole tokens sort first)
                found.append(self.ids[lo])
                lo += 1
            while lo < hi:
                b = keys[lo][depth]
                end = hi if b == 255 else bisect.bisect_left(keys, keys[lo][:depth] + bytes([b + 1]), lo, hi)
                nxt = step_fn(s, b)
                if nxt is not None:
                    todo.append((lo, end, depth + 1, nxt))
                lo = end
        return found


def json_vocab(vocab: VocabBytes) -> JsonVocab:
    """The vocabulary's trie, built once (for the tokenizer's `VocabBytes`)."""
    if getattr(vocab, "json", None) is None:
        vocab.json = JsonVocab(vocab)
    return vocab.json


class JsonGuide:
    """A request's grammar state (JSON mode's, a schema's: `json_schema.SchemaGrammar`, or a regular
    expression's: `regex_grammar.RegexGrammar`), brought up to date with its output a token at a time."""

    def __init__(self, grammar: Grammar = OBJECT) -> None:
        self.grammar = grammar
        self.state: State | None = grammar.start
        self.seen = 0  # output ids fed

    def allowed(self, vocab: VocabBytes, output_ids: list[int], end_ids: set[int]) -> torch.Tensor:
        """The ids that may come next (empty: none; the end ids once the value is complete)."""
        for t in output_ids[self.seen:]:
            raw = vocab.of[t] if t < len(vocab.of) else b""
            self.state = self.grammar.walk(self.state, raw) if raw else None
        self.seen = len(output_ids)
        if self.state is None:
            return torch.zeros(0, dtype=torch.long)
        ids = json_vocab(vocab).allowed(self.state, self.grammar) if self.grammar.open(self.state) else None
        if not self.grammar.can_end(self.state):
            return ids
        ends = torch.tensor(sorted(end_ids), dtype=torch.long)
        return ends if ids is None else torch.cat([ids, ends])
