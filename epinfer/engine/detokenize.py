"""Token ids to text a short window at a time, for whatever reads a growing output as it grows (the
engine's stop-string search, the server's streamed text).

Decoding the whole output at every token costs O(its length) a token, O(length^2) a request. A
`WindowDecode` decodes only the ids since its last cut, with the ids before that cut's previous one as
context (so a tokenizer's leading-space and multi-byte rules see what they need), and moves the cut
only past text that can no longer change: a window ending in U+FFFD may end in a character still
arriving and waits, unless more than SETTLED_IDS ids came since the last cut (the text itself holds
U+FFFD: the model wrote the character, or bytes that are no UTF-8); then the text up to the last
SETTLED_IDS ids is settled if the whole window begins with it.

It does not: own the ids (the caller passes the growing list each time) or recover from a decoder
that rewrites text before the window (it says so, and the caller decodes the whole output).

Also a token's own bytes (`token_bytes`): a byte-level BPE token's raw bytes, so that the tokens
that split one character join into it.
"""

from __future__ import annotations

from collections.abc import Callable

SETTLED_IDS = 16  # ids after which a U+FFFD is no longer a character in the making (one spans <= 4 bytes)


class WindowDecode:
    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.prefix = self.read = 0  # ids[prefix:read] are decoded again as context for the next ones

    def step(self, ids: list[int]) -> tuple[str, str] | None:
        """The text `ids` adds since the last cut, as (settled, new): `new` is all of it, `settled`
        the part of it that can no longer change (the cut moves past it; it may be empty). None when
        the decoder rewrote text before the window: then no window can be trusted."""
        decode = self.decode
        context = decode(ids[self.prefix:self.read])
        window = decode(ids[self.prefix:])
        if not window.startswith(context):
            return None
        new, end, done = window[len(context):], len(ids), window
        if window.endswith("\ufffd"):
            if end - self.read <= SETTLED_IDS:
                return "", new
            end -= SETTLED_IDS
            done = decode(ids[self.prefix:end])
            if not window.startswith(done):
                return "", new
        if len(done) <= len(context):
            return "", new
        self.prefix, self.read = self.read, end
        return done[len(context):], new


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE vocabulary writes for
    each byte value, mapped back to that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_DECODER = _byte_decoder()


def token_bytes(tokenizer, token_id: int, text: str) -> list[int]:
    """A token's own bytes: for a byte-level BPE vocabulary (Qwen's) its raw bytes, so the bytes of
    the tokens that split one character join into it (its text alone is U+FFFD); otherwise its text's."""
    raw = piece_bytes(tokenizer.convert_ids_to_tokens(token_id)) if byte_level(tokenizer) else None
    return list(raw if raw is not None else text.encode())


def piece_bytes(piece) -> bytes | None:
    """The bytes a byte-level BPE token string spells (`BYTE_DECODER`), None where it is not one."""
    if isinstance(piece, str) and piece and all(c in BYTE_DECODER for c in piece):
        return bytes(BYTE_DECODER[c] for c in piece)
    return None


def byte_level(tokenizer) -> bool:
    """A byte-level BPE vocabulary (Qwen's): its token strings spell bytes (`BYTE_DECODER`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"
