"""Bad words (`SamplingParams.bad_words`, vLLM's): words the answer may not contain, as vLLM rules it.
Each word is tokenized as it is and led by a space (where that gives other tokens of the same count:
the word inside a sentence); a word of one token is never sampled, and the last token of a longer one
is not sampled right after the output's tokens end with the ones before it. The output's own tokens
only count (not the prompt's). A step that checks a longer word needs the previous token on the host,
as a guided one does.
"""

from __future__ import annotations

from epinfer.core.errors import UserError


def bad_word_ids(tokenizer, words: list[str], vocab_size: int) -> list[tuple[int, ...]]:
    """The token sequences of `words` (each as it is, and led by a space), in order, once each."""
    out: list[tuple[int, ...]] = []
    for word in words:
        plain = tuple(tokenizer(word.lstrip(), add_special_tokens=False)["input_ids"])
        spaced = tuple(tokenizer(" " + word.lstrip(), add_special_tokens=False)["input_ids"])
        for ids in (plain, spaced):
            if ids and ids not in out and (ids is plain or (len(ids) == len(plain) and ids[0] != plain[0])):
                if max(ids) >= vocab_size:
                    raise UserError(f"bad word {word!r} has a token id {max(ids)} outside the vocabulary")
                out.append(ids)
    return out


def needs_history(words: list[tuple[int, ...]]) -> bool:
    """Whether a word is longer than one token (its check reads the output's last tokens)."""
    return any(len(w) > 1 for w in words)


def banned(words: list[tuple[int, ...]], output_ids: list[int]) -> list[int]:
    """The ids the next token may not be, after `output_ids`."""
    out = []
    for w in words:
        head = w[:-1]
        if not head or (len(output_ids) >= len(head) and tuple(output_ids[len(output_ids) - len(head):]) == head):
            out.append(w[-1])
    return out
