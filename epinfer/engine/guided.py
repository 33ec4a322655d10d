"""Guided choice (`SamplingParams.choices`, vLLM's `guided_choice`): the answer is one of the given
strings, exactly. At each step only the tokens whose bytes continue the answer so far along some
choice may be sampled, and the end-of-sequence ids once the answer is a whole choice (a choice that
is a prefix of another may end there or go on).

The work is on the host, a dictionary lookup for each prefix of each choice's remaining bytes: a
vocabulary's bytes are indexed once per tokenizer (`VocabBytes`: a byte-level BPE token's own
bytes, so tokens that split a character still join into it; special tokens never match). A step
that samples such a request needs its previous token on the host first, so with async scheduling
those steps run synchronously (as logprob requests do in the server).
"""

from __future__ import annotations

import functools

import torch

from epinfer.engine.detokenize import byte_level, piece_bytes


class VocabBytes:
    """Each token's bytes, and the ids of each byte string (several ids may share one)."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        size = min(vocab_size, len(tokenizer))
        pieces = tokenizer.convert_ids_to_tokens(list(range(size))) if byte_level(tokenizer) else [None] * size
        self.of: list[bytes] = [b""] * size
        self.ids: dict[bytes, list[int]] = {}
        self.json = None  # its layout for the guides (`json_mode.json_vocab`), built at first use
        for t, piece in enumerate(pieces):
            if t in special:
                continue
            raw = piece_bytes(piece)
            if raw is None:
                raw = tokenizer.decode([t]).encode()
            self.of[t] = raw
            if raw:
                self.ids.setdefault(raw, []).append(t)
        self.longest = max(map(len, self.of), default=0)  # bytes of the longest token


class TokenSet:
    """Token ids a row may sample: `ids`, a host tensor, and their bit mask (`bits`: bit t % 8 of
    byte t // 8), made at first use and kept with them. A guide's state allows the same set at
    every step it is in (`json_mode.JsonVocab` remembers it), and a step sends such rows to the
    device as their masks, 8 ids a byte whatever their count (`penalties.allow`)."""

    __slots__ = ("ids", "_bits")

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids
        self._bits: torch.Tensor | None = None

    def bits(self) -> torch.Tensor:
        if self._bits is None:
            self._bits = pack(self.ids)
        return self._bits

    def without(self, ids) -> TokenSet:
        """This set less `ids` (itself where it holds none of them; `self.ids` sorted)."""
        drop = torch.tensor(sorted(ids), dtype=torch.long)
        at = torch.searchsorted(self.ids, drop).clamp(max=max(len(self.ids) - 1, 0))
        if not len(self.ids) or not bool((self.ids[at] == drop).any()):
            return self
        return TokenSet(self.ids[~torch.isin(self.ids, drop)])

    def with_ids(self, more) -> TokenSet:
        """This set and the ids in `more` (its end ids, once an answer may end)."""
        extra = torch.tensor(sorted(more), dtype=torch.long)
        out = TokenSet(torch.cat([self.ids, extra]))
        out._bits = pack(extra, self.bits())
        return out


SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack(ids: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """The bit mask (uint8) of `ids`, or of them and the ids of mask `base`: as many bytes as the
    largest id needs, or `base` has."""
    width = max(len(base) if base is not None else 0, (int(ids.max()) + 8) // 8 if len(ids) else 0)
    flags = torch.zeros(width * 8, dtype=torch.bool)
    flags[ids] = True
    out = (flags.view(width, 8).to(torch.uint8) << SHIFTS).sum(1, dtype=torch.uint8)
    if base is not None:
        out[:len(base)] |= base
    return out


@functools.lru_cache(maxsize=4)
def vocab_bytes(tokenizer, vocab_size: int) -> VocabBytes:
    return VocabBytes(tokenizer, vocab_size)


def allowed_ids(vocab: VocabBytes, choices: list[str], output_ids: list[int], end_ids: set[int]) -> list[int]:
    """The ids that may come next after `output_ids` (empty: the answer left every choice)."""
    said = b"".join(vocab.of[t] if t < len(vocab.of) else b"\0" for t in output_ids)
    out: set[int] = set()
    for choice in choices:
        target = choice.encode()
        if not target.startswith(said):
            continue
        rest = target[len(said):]
        if not rest:
            out |= end_ids
        for k in range(1, min(len(rest), vocab.longest) + 1):  # (no token is longer: a long choice costs no more)
            out.update(t for t in vocab.ids.get(rest[:k], ()) if t not in end_ids)  # (an end id ends only a whole one)
    return sorted(out)
