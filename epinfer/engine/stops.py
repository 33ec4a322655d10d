"""Stop strings, searched incrementally (`Engine._check_stop`).

Each token's check decodes a short window of the newest ids (the ids since the last settled cut
as context, so leading-space and multi-byte rules see what they need) and searches only the text
where a new match could end, so a request costs O(its length) in all. A full decode and search of
the whole output at every token cost O(length) a token on the host between steps, which delayed the
step of every request in the batch (O(length^2) a request). The engine decodes the whole output
once, when a match is found, to place its end exactly as before.

It does not: decide anything about min_tokens (the caller passes where matches may start) or
undo text already settled (a decoder that rewrites earlier text is searched whole every token).
"""

from __future__ import annotations

from collections.abc import Callable

SETTLED_IDS = 16  # ids after which a trailing U+FFFD is text, not a character in the making (<= 4 bytes)


def first_match(text: str, stops: list[str], held_chars: int) -> int | None:
    """Where the first stop string that ends past `held_chars` begins in `text`, or None."""
    hits = [i for i in (text.find(s, max(0, held_chars - len(s) + 1)) for s in stops) if i >= 0]
    return min(hits) if hits else None


class StopSearch:
    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.keep = max(len(s) for s in stops) - 1  # a match ending in new text starts at most this far back
        self.recent = ""  # the last `keep` characters of the settled text
        self.settled = 0  # the length of the text of ids[:read], decoded a window at a time
        self.prefix = self.read = 0  # ids[prefix:read] are decoded again as context for the next ones

    def found(self, tokenizer, ids: list[int], held_chars: int) -> bool:
        """Whether a stop string occurs in the text of `ids` at or past
        `held_chars - len(stop) + 1`, given that the calls before saw a prefix of `ids` and found
        none (so every match ending inside the settled text is ruled out). True as well when the
        tokenizer fails: the caller's whole decode then fails the request with its message."""
        try:
            return self._found(lambda part: tokenizer.decode(part, skip_special_tokens=True), ids, held_chars)
        except Exception:  # tokenizers raise many kinds
            return True

    def _found(self, decode: Callable[[list[int]], str], ids: list[int], held_chars: int) -> bool:
        context = decode(ids[self.prefix:self.read])
        window = decode(ids[self.prefix:])
        if not window.startswith(context):  # the decoder rewrote earlier text: no window to trust
            return first_match(decode(ids), self.stops, held_chars) is not None
        base = self.settled - len(self.recent)
        local = self.recent + window[len(context):]  # the text from offset `base` on
        hit = any(local.find(s, max(0, held_chars - len(s) + 1, self.settled - len(s) + 1) - base) >= 0
                  for s in self.stops)
        self._settle(decode, ids, context, window)
        return hit

    def _settle(self, decode, ids: list[int], context: str, window: str) -> None:
        """Takes the window's text as settled where it can no longer change: not while it ends in
        U+FFFD (a character may be arriving) unless more than SETTLED_IDS ids came since the last
        cut; then up to the last SETTLED_IDS of them, if the window begins with that text."""
        end = len(ids)
        if window.endswith("\ufffd"):
            if end - self.read <= SETTLED_IDS:
                return
            end -= SETTLED_IDS
            cut = decode(ids[self.prefix:end])
            if not window.startswith(cut):
                return
            window = cut
        if len(window) > len(context) and window.startswith(context):
            new = window[len(context):]
            self.settled += len(new)
            joined = self.recent + new
            self.recent = joined[max(0, len(joined) - self.keep):]
            self.prefix, self.read = self.read, end
