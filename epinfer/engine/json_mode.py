"""JSON mode (`SamplingParams.json_object`, OpenAI's `response_format: {"type": "json_object"}`):
the answer is one JSON object (RFC 8259), from its first byte "{" to its closing brace, then the end
of the sequence. At each step only the tokens whose bytes continue a valid JSON text may be
sampled, and an end id once the object is closed.

A byte-level parser state (`State`: the open containers, what may come next, and a counter of
the current run of whitespace, at most `MAX_SPACE` bytes long so that a model cannot pad forever)
steps one byte at a time (`step`, None where the byte is not valid there). The ids a state allows
are found by stepping every token's bytes from that state at once, a byte position at a time, each
distinct (state, byte) pair once (`JsonVocab.sweep`). Each state's allowed ids are remembered
(`JsonVocab.allowed`), so a request pays for a state once. Objects nest at most `MAX_DEPTH` deep;
string bytes are not checked as UTF-8.
"""

from __future__ import annotations

import collections

import torch

from epinfer.core.errors import UserError
from epinfer.engine.guided import TokenSet, VocabBytes

MAX_DEPTH = 16
MAX_SPACE = 16  # whitespace bytes in a row (an indented line of nesting 3 and 4 spaces, and its newline)
MAX_STATES = 4096  # states whose allowed ids are remembered (least recently used go first)
MAX_REMEMBERED_IDS = 1 << 23  # and their ids in all (64 MiB: a state of a broad regex allows nearly every token,
# so 4,096 of them would hold 4.6 GB of a 150,000-token vocabulary's ids)
UNKNOWN = -1  # (`JsonVocab.sweep`'s table: a pair not yet stepped)
# what finding a state's allowed ids may cost (`JsonVocab.sweep`): a step of a (state, byte) pair is STEP_WORK
# and the state's `Grammar.weight` (a regex's automaton nodes, a schema's alternatives / 16); more fails that
# request alone, so that no guide holds the step loop of every request for long. A 150,000-token vocabulary
# on one core (benchmarks/json_mode_cost.py's): JSON states 700-7,500; common expressions up to 6,000, a
# 200-word alternation 68,000; `anyOf` 1,000 constants 750,000 in 0.22 s; `(.*[a-m].{10}){4}` past the bound
STEP_WORK = 4
MAX_SWEEP_WORK = 1 << 21
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
    states are in this module's layout (frames, mode, aux, whitespace run), whose run `JsonVocab.allowed`
    takes a short cut through (`regex_grammar`'s are not)."""

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

    def weight(self, state: State) -> int:
        """What stepping `state` a byte costs beyond `STEP_WORK` (a regex: its automaton nodes)."""
        return 0

    def cache_key(self, state: State, reach: int) -> object:
        """What `state`'s allowed ids are remembered under: one key for states whose ids are the same
        for every token of at most `reach` bytes (a schema's counted strings), else the state."""
        return state

    def walk(self, state: State | None, raw: bytes) -> State | None:
        for b in raw:
            if state is None:
                return None
            state = self.step(state, b)
        return state


OBJECT = Grammar("object", step)  # JSON mode: any object


class JsonVocab:
    """A tokenizer's vocabulary laid out for `sweep` (its bytes by position, the longest tokens
    first), and the ids each grammar state allows (remembered)."""

    def __init__(self, vocab: VocabBytes) -> None:
        # `sweep`'s layout: the ids longest first, and at each depth the bytes there of the tokens that long
        by_length = sorted(((raw, t) for t, raw in enumerate(vocab.of) if raw), key=lambda p: -len(p[0]))
        self.by_length = torch.tensor([t for _, t in by_length], dtype=torch.long)
        lengths = torch.tensor([len(raw) for raw, _ in by_length], dtype=torch.long)
        blob = torch.frombuffer(bytearray(b"".join(raw for raw, _ in by_length) or b"\0"), dtype=torch.uint8)
        starts = torch.cumsum(lengths, 0) - lengths
        self.columns = [blob[starts[: int((lengths > j).sum())] + j].to(torch.int32)
                        for j in range(int(lengths[0]) if by_length else 0)]
        # each token's leading whitespace bytes: a state's allowed ids depend on its whitespace run only
        # through them, so a state is searched once for every run length
        self.lead = torch.tensor([len(raw) - len(raw.lstrip(bytes(SPACE))) for raw in vocab.of], dtype=torch.long)
        self.cache: collections.OrderedDict = collections.OrderedDict()
        self.remembered = 0  # ids in the cache
        self.refused: collections.OrderedDict = collections.OrderedDict()  # states whose sweep failed: why

    def allowed(self, state: State, grammar: Grammar = OBJECT) -> TokenSet:
        """The ids that may come next in `state` (empty where none may), remembered."""
        key = (grammar.key, grammar.cache_key(state, len(self.columns)))
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            return hit
        if grammar.json_states and state[3]:  # a whitespace run of state[3] bytes: the run-free state's ids with room
            ids = self.allowed((*state[:3], 0), grammar).ids
            ids = ids[self.lead[ids] <= MAX_SPACE - state[3]]
        elif key in self.refused:  # (a state too costly to sweep fails every request that reaches it at once)
            raise UserError(self.refused[key])
        else:
            try:
                ids = torch.sort(self.sweep(state, grammar)).values
            except UserError as exc:
                self.refused[key] = str(exc)
                if len(self.refused) > MAX_STATES:
                    self.refused.popitem(last=False)
                raise
        out = self.cache[key] = TokenSet(ids)
        self.remembered += len(ids)
        while len(self.cache) > MAX_STATES or self.remembered > MAX_REMEMBERED_IDS:
            self.remembered -= len(self.cache.popitem(last=False)[1].ids)
        return out

    def sweep(self, state: State, grammar: Grammar) -> torch.Tensor:
        """The tokens whose every byte `grammar` takes from `state`, all walked at once a byte position
        at a time: each live token's state is an index into the states met so far, and one gather
        through their table of (state, byte) -> state (0: refused) moves them all a byte on; a token
        refused leaves the walk, one whose bytes are all taken is allowed. Only the pairs the table
        lacks are stepped (each once a sweep), so the Python work is the distinct (state, byte) pairs at
        each depth, not the vocabulary's prefixes. Each costs `STEP_WORK` and the state's
        `Grammar.weight`; more than `MAX_SWEEP_WORK` in all is an error of the request (the same on
        every rank: it depends on the state alone)."""
        states, index = [None, state], {state: 1}
        table = torch.full((64 * 256,), UNKNOWN, dtype=torch.int32)  # [state * 256 + byte] -> state
        alive = torch.arange(len(self.by_length))  # live tokens' places in `by_length` (longest first)
        at = torch.ones(len(self.by_length), dtype=torch.int32)  # and their states
        allowed, work = [], 0
        for depth, column in enumerate(self.columns):  # the bytes at this depth of the tokens that long or longer
            longer = int(torch.searchsorted(alive, column.shape[0])) if depth else len(alive)
            allowed.append(alive[longer:])  # (all their bytes taken)
            alive, at = alive[:longer], at[:longer]
            flat = at * 256 + (column[alive] if depth else column)
            nxt = table[flat]
            unknown = nxt == UNKNOWN
            if bool(unknown.any()):
                seen = torch.zeros(table.shape[0], dtype=torch.bool)
                seen[flat[unknown]] = True
                keys = seen.nonzero().flatten()
                outs = []
                for key in keys.tolist():
                    work += STEP_WORK + grammar.weight(states[key >> 8])
                    if work > MAX_SWEEP_WORK:
                        raise UserError(f"its guide is too costly to follow: finding the tokens that may come next "
                                        f"takes more than {MAX_SWEEP_WORK:,} automaton steps")
                    out = grammar.step(states[key >> 8], key & 255)
                    k = 0 if out is None else index.setdefault(out, len(states))
                    if k == len(states):
                        states.append(out)
                    outs.append(k)
                if len(states) * 256 > table.shape[0]:
                    grow = max(len(states) * 256, 2 * table.shape[0]) - table.shape[0]
                    table = torch.cat([table, torch.full((grow,), UNKNOWN, dtype=torch.int32)])
                table[keys] = torch.tensor(outs, dtype=torch.int32)
                nxt = table[flat]
            live = nxt > 0
            alive, at = alive[live], nxt[live]
            if not len(alive):
                break
        allowed.append(alive)
        return self.by_length[torch.cat(allowed)]


def json_vocab(vocab: VocabBytes) -> JsonVocab:
    """The vocabulary's `JsonVocab`, built once (for the tokenizer's `VocabBytes`)."""
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

    def allowed(self, vocab: VocabBytes, output_ids: list[int], end_ids: set[int]) -> TokenSet:
        """The ids that may come next (empty: none; the end ids once the value is complete)."""
        for t in output_ids[self.seen:]:
            raw = vocab.of[t] if t < len(vocab.of) else b""
            self.state = self.grammar.walk(self.state, raw) if raw else None
        self.seen = len(output_ids)
        none = TokenSet(torch.zeros(0, dtype=torch.long))
        if self.state is None:
            return none
        ids = json_vocab(vocab).allowed(self.state, self.grammar) if self.grammar.open(self.state) else none
        ids = ids.without(end_ids)  # (a stop id that is an ordinary token ends only a complete answer)
        return ids.with_ids(end_ids) if self.grammar.can_end(self.state) else ids
