"""Stop strings, searched incrementally (`Engine._check_stop`).

Each token's check decodes a short window of the newest ids (the ids since the last settled cut
as context, so leading-space and multi-byte rules see what they need) and searches only the text
where a new match could end, so a request costs O(its length) in all. A full decode and search of
the whole output at every token cost O(length) a token on the host between steps, which delayed the
step of every request in the batch (O(length^2) a request). The engine decodes the whole output
once, when a match is found, to place its end exactly as before.

It does not: decide when min_tokens is reached (the caller searches only past it, handing over those
ids, whose text no match may end in) or undo text already settled (a decoder that rewrites earlier
text is searched whole every token).
"""

from __future__ import annotations

from epinfer.engine.detokenize import WindowDecode


def first_match(text: str, stops: list[str], held_chars: int, through: bool = False) -> int | None:
    """Where the first stop string that ends past `held_chars` begins in `text` (`through`: where it
    ends; of two beginning there, the shorter), or None."""
    hits = [(i, i + len(s)) for i, s in ((text.find(s, max(0, held_chars - len(s) + 1)), s) for s in stops)
            if i >= 0]
    return min(hits)[through] if hits else None


class StopSearch:
    """`held`: the first min_tokens output ids; a stop string must end past their text. `skip`: the
    text without special tokens (the request's `skip_special_tokens`)."""

    def __init__(self, tokenizer, stops: list[str], held: list[int], skip: bool = True) -> None:
        self.stops = stops
        self.keep = max(len(s) for s in stops) - 1  # a match ending in new text starts at most this far back
        self.recent = ""  # the last `keep` characters of the settled text
        self.settled = 0  # the length of the settled text (the text of the ids before the window's cut)
        self.window = WindowDecode(lambda part: tokenizer.decode(part, skip_special_tokens=skip))
        try:
            self.held_chars = len(self.window.decode(held))
        except Exception:  # (found() then says True, and the caller's whole decode fails the request)
            self.held_chars = -1

    def found(self, ids: list[int]) -> bool:
        """Whether a stop string occurs in the text of `ids` at or past
        `held_chars - len(stop) + 1`, given that the calls before saw a prefix of `ids` and found
        none (so every match ending inside the settled text is ruled out). True as well when the
        tokenizer fails: the caller's whole decode then fails the request with its message."""
        try:
            return self.held_chars < 0 or self._found(ids)
        except Exception:  # tokenizers raise many kinds
            return True

    def _found(self, ids: list[int]) -> bool:
        held_chars, step = self.held_chars, self.window.step(ids)
        if step is None:  # the decoder rewrote earlier text: the whole output, searched whole
            return first_match(self.window.decode(ids), self.stops, held_chars) is not None
        settled, new = step
        base = self.settled - len(self.recent)
        local = self.recent + new  # the text from offset `base` on
        hit = any(local.find(s, max(0, held_chars - len(s) + 1, self.settled - len(s) + 1) - base) >= 0
                  for s in self.stops)
        self.settled += len(settled)
        joined = self.recent + settled
        self.recent = joined[max(0, len(joined) - self.keep):]
        return hit


def text_before_last(tokenizer, ids: list[int], skip_special_tokens: bool) -> int | None:
    """The length of the text of `ids` without the last one's, where that one has text of its own (an
    end-of-sequence token skipped as special has none: None)."""
    try:
        if tokenizer.decode(ids[-1:], skip_special_tokens=skip_special_tokens):
            return len(tokenizer.decode(ids[:-1], skip_special_tokens=skip_special_tokens))
    except Exception:  # (tokenizers raise many kinds: the request's own decode fails it where it matters)
        pass
    return None
