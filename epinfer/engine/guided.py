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
        for k in range(1, len(rest) + 1):
            out.update(vocab.ids.get(rest[:k], ()))
    return sorted(out)
