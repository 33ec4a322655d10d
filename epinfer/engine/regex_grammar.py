"""Guided regex (`SamplingParams.regex`, vLLM's `guided_regex` / `structured_outputs: {"regex": ...}`):
the whole answer matches a regular expression (as Python's `re.fullmatch` would), then the end of the
sequence.

The expression (the common subset of Python's and JSON Schema's syntax: literals and escapes, `.`,
classes `[...]` with ranges and `\\d \\w \\s` and their negations, groups `(...)`, `(?:...)`,
`(?P<name>...)`, alternation, the quantifiers `* + ? {m} {m,} {m,n}` and their lazy forms, `^` at
its start and `$` at its end) compiles to a Thompson automaton over characters; anything else
(lookarounds, back-references, flags, anchors inside) is refused in one line naming it. Its state is
the set of automaton nodes after the answer's bytes, with the bytes of a character not yet complete
(UTF-8); a byte is refused where no node's class holds a character that begins with those bytes, so
every state can still reach a match and a token cannot stop half way into a character no class
takes. `json_mode.JsonVocab` sweeps the vocabulary from a state, as for JSON; ASCII bytes that every
class holds alike step once (a class of bytes).

In `.` and the negated classes, a character is anything but a newline / the listed ones; the classes
hold code points, matched against the UTF-8 bytes of the answer (`\\d`, `\\w`, `\\s` are their ASCII
sets: re.ASCII semantics).
"""

from __future__ import annotations

import bisect

from epinfer.core.errors import UserError
from epinfer.engine.json_mode import Grammar

MAX_PATTERN = 4096  # characters of an expression
MAX_NODES = 20_000  # automaton nodes (counted repetition copies its operand)
MAX_REPEAT = 1000  # the largest m and n of {m,n}
MAX_GROUPS = 64  # groups inside groups (the parser and the construction recurse into them)
MAX_MEMO = 1 << 17  # (state, byte) steps a grammar remembers (grammars are shared: `restrict`)
MAX_STATE_NODES = 512  # automaton nodes alive at once: more is a request error (a 200-word alternation: 401)
MAX_MEMO_NODES = 1 << 21  # and the automaton nodes their states hold, in all (a nested counted repetition,
# `(.{0,1000}){4}`, keeps thousands of nodes a state: a count of steps alone let it hold gigabytes)
TOP = 0x10FFFF
DIGIT = ((0x30, 0x39),)
WORD = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
SPACES = ((0x09, 0x0D), (0x20, 0x20))
ESCAPED = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}
CLASSES = {"d": (DIGIT, False), "D": (DIGIT, True), "w": (WORD, False), "W": (WORD, True),
           "s": (SPACES, False), "S": (SPACES, True)}


def normalize(ranges) -> tuple:
    """Sorted, merged (lo, hi) code point ranges."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def complement(ranges) -> tuple:
    out, at = [], 0
    for lo, hi in normalize(ranges):
        if lo > at:
            out.append((at, lo - 1))
        at = hi + 1
    if at <= TOP:
        out.append((at, TOP))
    return tuple(out)


def overlaps(ranges: tuple, highs: tuple, lo: int, hi: int) -> bool:
    """Whether sorted, disjoint `ranges` (their upper ends `highs`) meet [lo, hi]: the first range
    ending at lo or later starts at hi or before (a class may hold thousands of ranges)."""
    i = bisect.bisect_left(highs, lo)
    return i < len(ranges) and ranges[i][0] <= hi


class Parser:
    """Recursive descent over the expression: an AST of ("set", ranges), ("cat", [..]), ("alt", [..]),
    ("rep", node, m, n or None)."""

    def __init__(self, pattern: str) -> None:
        self.p, self.i = pattern, 0
        self.depth = 0  # groups open here

    def fail(self, what: str) -> UserError:
        return UserError(f"regex: {what} (at position {self.i})")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        c = self.p[self.i]
        self.i += 1
        return c

    def parse(self):
        if self.peek() == "^":
            self.i += 1
        node = self.alternation()
        if self.peek() == "$":
            self.i += 1
        if self.i != len(self.p):
            what = "an unmatched ')' is not valid" if self.peek() == ")" else f"'{self.peek()}' is not expected"
            raise self.fail(what)
        return node

    def alternation(self):
        options = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else ("alt", options)

    def sequence(self):
        items = []
        while self.peek() is not None and self.peek() not in "|)":
            if self.peek() == "$" and self.i == len(self.p) - 1:
                break
            items.append(self.quantified())
        return ("cat", items)

    def quantified(self):
        atom = self.atom()
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                self.i += 1
                atom = ("rep", atom, 1 if c == "+" else 0, 1 if c == "?" else None)
            elif c == "{" and self.counted() is not None:
                m, n = self.counted(consume=True)
                atom = ("rep", atom, m, n)
            else:
                return atom
            if self.peek() == "?":  # (lazy: the same language)
                self.i += 1
            if self.peek() in ("*", "+") or (self.peek() == "{" and self.counted() is not None):
                raise self.fail("a quantifier after a quantifier is not valid")

    def counted(self, consume: bool = False):
        """(m, n or None) of a `{m}`, `{m,}`, `{,n}`, `{,}` or `{m,n}` here, else None (a literal brace)."""
        end = self.p.find("}", self.i)
        body = self.p[self.i + 1:end] if end > 0 else ""
        parts = body.split(",")
        digits = [p.isascii() and p.isdigit() for p in parts]  # (not "²": int() takes ASCII digits here)
        whole = digits[0] if len(parts) == 1 else len(parts) == 2 and all(
            d or p == "" for d, p in zip(digits, parts, strict=True))
        if end < 0 or not whole:
            return None
        m = int(parts[0] or 0)
        n = m if len(parts) == 1 else (int(parts[1]) if parts[1] else None)
        if m > MAX_REPEAT or (n is not None and (n > MAX_REPEAT or n < m)):
            raise self.fail(f"a repetition {{{body}}} (at most {MAX_REPEAT}, m <= n) is not valid")
        if consume:
            self.i = end + 1
        return m, n

    def atom(self):
        c = self.take()
        if c == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?P<", self.i):
                end = self.p.find(">", self.i)
                if end < 0:
                    raise self.fail("an unterminated group name is not valid")
                self.i = end + 1
            elif self.peek() == "?":
                raise self.fail("'(?' groups other than (?: and (?P<name> (lookarounds, flags) are not supported")
            if self.depth >= MAX_GROUPS:
                raise self.fail(f"groups nested more than {MAX_GROUPS} deep are not supported")
            self.depth += 1
            node = self.alternation()
            self.depth -= 1
            if self.peek() != ")":
                raise self.fail("a missing ')' is not valid")
            self.i += 1
            return node
        if c == "[":
            return ("set", self.bracket())
        if c == ".":
            return ("set", complement([(10, 10)]))
        if c == "\\":
            return ("set", self.escape(in_class=False))
        if c in "*+?":
            raise self.fail(f"'{c}' with nothing to repeat is not valid")
        if c in "^$":
            raise self.fail(f"'{c}' is supported only at the expression's start / end")
        return ("set", ((ord(c), ord(c)),))

    def escape(self, in_class: bool) -> tuple:
        if self.peek() is None:
            raise self.fail("a trailing backslash is not valid")
        c = self.take()
        if c in CLASSES:
            ranges, negated = CLASSES[c]
            return complement(ranges) if negated else ranges
        ahead = self.p[self.i:self.i + 2]
        octal = ahead[:next((k for k, d in enumerate(ahead) if d not in "01234567"), len(ahead))]  # (up to 2 more)
        if c in "01234567" and (c == "0" or in_class or len(octal) == 2):  # Python's octal escapes: \0, \0oo,
            self.i += len(octal)  # \ooo, and in a class any \o to \ooo
            v = int(c + octal, 8)
            if v > 0o377:
                raise self.fail(f"the octal escape \\{c + octal} is outside 0 to 0o377")
        elif c in ESCAPED:
            v = ord(ESCAPED[c])
        elif c in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[c]
            digits = self.p[self.i:self.i + width]
            if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.fail(f"a \\{c} escape without {width} hex digits is not valid")
            self.i += width
            v = int(digits, 16)
            if v > 0x10FFFF:
                raise self.fail(f"the escape \\U{digits} is past the last code point U+10FFFF")
        elif c.isalnum():
            raise self.fail(f"the escape \\{c} is not supported (back-references, anchors \\b \\A \\Z, ...)")
        else:
            v = ord(c)
        return ((v, v),)

    def bracket(self) -> tuple:
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        ranges: list = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise self.fail("an unterminated '[' is not valid")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            if c == "[" and self.p.startswith("[:", self.i):
                raise self.fail("POSIX classes [: :] are not supported")
            lo = self.class_item()
            if self.peek() == "-" and self.p[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self.class_item()
                if len(lo) != 1 or len(hi) != 1 or lo[0][0] != lo[0][1] or hi[0][0] != hi[0][1]:
                    raise self.fail("a class range of classes is not valid")
                if hi[0][0] < lo[0][0]:
                    raise self.fail("a class range out of order is not valid")
                ranges.append((lo[0][0], hi[0][0]))
            else:
                ranges.extend(lo)
        return complement(ranges) if negated else normalize(ranges)

    def class_item(self) -> tuple:
        c = self.take()
        if c == "\\":
            return self.escape(in_class=True)
        return ((ord(c), ord(c)),)


class Automaton:
    """Thompson's construction: node i has `edges[i]` = [(ranges, their upper ends, target)] and
    `eps[i]` = [targets]."""

    def __init__(self, ast) -> None:
        self.edges: list[list] = []
        self.eps: list[list] = []
        self.sets: dict = {}  # id of a class of the AST -> (its ranges normalised, their upper ends)
        self.start, self.accept = self.build(ast)
        self.sets.clear()

    def node(self) -> int:
        if len(self.edges) >= MAX_NODES:
            raise UserError(f"regex: more than {MAX_NODES} automaton nodes (counted repetitions copy their "
                            "operand)")
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def build(self, ast) -> tuple[int, int]:
        kind = ast[0]
        if kind == "set":
            a, b = self.node(), self.node()
            if id(ast[1]) not in self.sets:  # (a counted repetition builds its operand's classes again)
                ranges = normalize(ast[1])
                self.sets[id(ast[1])] = (ranges, tuple(hi for _, hi in ranges))
            self.edges[a].append((*self.sets[id(ast[1])], b))
            return a, b
        if kind == "cat":
            a = b = self.node()
            for item in ast[1]:
                s, e = self.build(item)
                self.eps[b].append(s)
                b = e
            return a, b
        if kind == "alt":
            a, b = self.node(), self.node()
            for option in ast[1]:
                s, e = self.build(option)
                self.eps[a].append(s)
                self.eps[e].append(b)
            return a, b
        _, inner, m, n = ast  # rep
        a = b = self.node()
        for _ in range(m):
            s, e = self.build(inner)
            self.eps[b].append(s)
            b = e
        if n is None:  # a loop
            s, e = self.build(inner)
            self.eps[b].append(s)
            self.eps[e].append(s)
            end = self.node()
            self.eps[b].append(end)
            self.eps[e].append(end)
            return a, end
        end = self.node()
        for _ in range(n - m):  # optional copies, each may end the repetition
            self.eps[b].append(end)
            s, e = self.build(inner)
            self.eps[b].append(s)
            b = e
        self.eps[b].append(end)
        return a, end

    def reaches_accept(self, usable) -> bool:
        """Whether some string reaches the accepting node through edges whose ranges hold a character
        that `usable(lo, hi)` takes (for a range [lo, hi])."""
        seen, todo = {self.start}, [self.start]
        while todo:
            i = todo.pop()
            if i == self.accept:
                return True
            nxt = self.eps[i] + [t for ranges, _, t in self.edges[i] if any(usable(lo, hi) for lo, hi in ranges)]
            todo += [t for t in nxt if t not in seen]
            seen.update(nxt)
        return False

    def closure(self, nodes) -> frozenset:
        seen, todo = set(nodes), list(nodes)
        while todo:
            for t in self.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)


def utf8_span(pending: tuple) -> tuple[int, int, int] | None:
    """(lowest, highest code point, bytes in all) of the characters whose UTF-8 form starts with the
    bytes `pending` (a lead byte, then continuation bytes), or None where none does."""
    lead = pending[0]
    if 0xC2 <= lead <= 0xDF:
        size, lo, hi = 2, (lead & 0x1F) << 6, ((lead & 0x1F) << 6) | 0x3F
    elif 0xE0 <= lead <= 0xEF:
        size, lo, hi = 3, (lead & 0x0F) << 12, ((lead & 0x0F) << 12) | 0xFFF
    elif 0xF0 <= lead <= 0xF4:
        size, lo, hi = 4, (lead & 0x07) << 18, ((lead & 0x07) << 18) | 0x3FFFF
    else:
        return None
    for k, b in enumerate(pending[1:], 1):
        if b & 0xC0 != 0x80:
            return None
        shift = 6 * (size - 1 - k)
        lo |= (b & 0x3F) << shift
        hi = (hi & ~(0x3F << shift)) | ((b & 0x3F) << shift)
    lo = max(lo, (0x80, 0x800, 0x10000)[size - 2])  # (overlong forms are not UTF-8)
    hi = min(hi, TOP)
    if size == 3 and lo >= 0xD800 and hi <= 0xDFFF:  # (surrogates are not characters)
        return None
    return (lo, hi, size) if lo <= hi else None


class RegexGrammar(Grammar):
    """A compiled expression as a byte grammar: states (automaton nodes, pending bytes), each step
    remembered (the sweeps of successive states meet the same (state, byte) pairs again and again)."""

    json_states = False

    def __init__(self, pattern: str) -> None:
        if not isinstance(pattern, str) or not pattern:
            raise UserError("regex must be a non-empty string")
        if len(pattern) > MAX_PATTERN:
            raise UserError(f"regex: at most {MAX_PATTERN} characters, got {len(pattern)}")
        self.auto = Automaton(Parser(pattern).parse())
        super().__init__("regex:" + pattern, self.step_regex)
        self.start = (self.auto.closure([self.auto.start]), ())
        self.memo: dict = {}
        self.memo_nodes = 0
        # each ASCII byte's class: the first byte of its run of bytes that every edge's ranges hold
        # alike (from a state without pending bytes they lead to one state: remembered once a class)
        cuts, classes = {0}, {id(ranges): ranges for edges in self.auto.edges for ranges, _, _ in edges}
        for ranges in classes.values():
            for lo, hi in ranges:
                if lo >= 0x80:
                    break
                cuts |= {lo, hi + 1}
        self.ascii_class = [max(c for c in cuts if c <= b) for b in range(0x80)]

    def can_end(self, state) -> bool:
        return not state[1] and self.auto.accept in state[0]

    def open(self, state) -> bool:
        return any(self.auto.edges[i] for i in state[0])

    def weight(self, state) -> int:
        return len(state[0])

    def step_regex(self, state, b: int):
        key = (state, self.ascii_class[b] if b < 0x80 and not state[1] else b)
        if key in self.memo:
            return self.memo[key]
        out = self._step(state, b)
        held = len(state[0]) + (len(out[0]) if out is not None else 0)
        if len(self.memo) < MAX_MEMO and self.memo_nodes + held <= MAX_MEMO_NODES:
            self.memo[key] = out
            self.memo_nodes += held
        return out

    def _step(self, state, b: int):
        nodes, pending = state
        pending = (*pending, b)
        if b < 0x80:
            if len(pending) > 1:
                return None
            lo = hi = b
            size = 1
        else:
            span = utf8_span(pending)
            if span is None:
                return None
            lo, hi, size = span
        edges = [t for i in nodes for ranges, highs, t in self.auto.edges[i] if overlaps(ranges, highs, lo, hi)]
        if not edges:
            return None
        if len(pending) < size:
            return nodes, pending  # (some class takes a character that starts so)
        nodes = self.auto.closure(edges)
        if len(nodes) > MAX_STATE_NODES:  # (each step of each state goes through them all)
            raise UserError(f"regex: more than {MAX_STATE_NODES} automaton nodes alive at once after this text "
                            "(counted repetitions nested in one another): too costly to follow")
        return nodes, ()
