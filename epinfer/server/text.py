"""Text for responses: incremental detokenization of a stream and OpenAI logprob records.

`TextStream` decodes a request's new ids incrementally (a short window of earlier ids as context,
so a stream costs O(n) in all, not O(n^2)) and emits only text that can no longer change: an
incomplete UTF-8 sequence split over tokens (U+FFFD) is not taken until it completes, and any
suffix that is the start of a stop string is held back. The final update decodes the whole
output once. The engine cuts the final text at the first stop string it sees, and that match can never
begin inside text already emitted (it would have been held back), so the concatenated deltas
equal the non-streaming text exactly.
"""

from __future__ import annotations

from epinfer.engine.detokenize import WindowDecode, token_bytes


class StopTail:
    """How much of a growing text's end is a proper prefix of `stop`: a KMP automaton fed only the
    characters added since the last call, so a stream with long stop strings costs O(its length x
    the number of stop strings) in all, not O(stop length^2) an update."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.fail = [0] * len(stop)  # fail[i]: the longest proper border of stop[:i + 1]
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fail[i] = k
        self.state = 0  # the longest suffix of the text fed so far that is a prefix of stop
        self.fed = 0

    def feed(self, text: str) -> int:
        """`text` extends what was fed before; returns the length of its longest suffix that is a
        proper prefix of the stop string."""
        stop, fail, k = self.stop, self.fail, self.state
        for ch in text[self.fed:]:
            while k and ch != stop[k]:
                k = fail[k - 1]
            if ch == stop[k]:
                k += 1
            if k == len(stop):  # the whole string (it does not count before min_tokens): its border
                k = fail[k - 1]
        self.state, self.fed = k, len(text)
        return k


class TextStream:
    def __init__(self, tokenizer, stops: list[str], skip: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip  # skip: special tokens left out (skip_special_tokens)
        self.tails = [StopTail(stop) for stop in stops]
        self.ids: list[int] = []
        self.sent = ""  # text emitted so far
        self.text = ""  # the settled text, decoded a window at a time
        self.window = WindowDecode(lambda part: tokenizer.decode(part, skip_special_tokens=skip))

    def add(self, new_ids: list[int]) -> None:
        self.ids.extend(new_ids)

    def full_text(self, stop_end: int | None = None) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        return text if stop_end is None else text[:stop_end]

    def _advance(self) -> None:
        """Extends `self.text` by the new ids' settled text (`WindowDecode`: O(window), and a U+FFFD
        the text itself holds does not hold the stream back to its end)."""
        step = self.window.step(self.ids)
        if step is not None:  # (a decoder that rewrites earlier text: the final update's whole decode)
            self.text += step[0]

    def delta(self, final: bool, stop_end: int | None = None) -> str:
        """New text since the last call; `final`: the request finished (nothing held back)."""
        if self.tokenizer is None:
            return ""
        if final:  # once per request: the whole text, cut where the engine saw a stop string
            text = self.full_text(stop_end)
        else:
            self._advance()
            text = self.text
            text = text[:len(text) - max((tail.feed(text) for tail in self.tails), default=0)]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""  # nothing new (a decoder that rewrites earlier text can't be un-sent)
        out, self.sent = text[len(self.sent):], text
        return out


def token_text(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer, ids: list[int], records: list[tuple], offset: int) -> dict:
    """The /v1/completions `logprobs` object; `records[i]` = (logprob, [(id, logprob), ...]); each
    `top_logprobs` entry holds the sampled token too (up to logprobs + 1 entries, as OpenAI's legacy
    API and vLLM give); `offset`: the text offset of ids[0] (the lengths of the tokens before it)."""
    tokens = [token_text(tokenizer, t) for t in ids]
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    top = [{token_text(tokenizer, t): lp for t, lp in rec[1]} for rec in records]
    for entry, tok, rec in zip(top, tokens, records, strict=True):
        entry.setdefault(tok, rec[0])
    return {"tokens": tokens, "token_logprobs": [rec[0] for rec in records], "top_logprobs": top,
            "text_offset": offsets}


def echoed_logprobs(tokenizer, prompt_ids: list[int], prompt_records: list, top: int) -> dict:
    """`completion_logprobs` of an echoed prompt: its first token has no logprob (None, as in
    OpenAI's legacy API and vLLM), each later one its `Sequence.prompt_logprobs` record's, with the
    top `top`."""
    first = token_text(tokenizer, prompt_ids[0])
    rest = completion_logprobs(tokenizer, prompt_ids[1:], [(r[0], r[2][:top]) for r in prompt_records[1:]],
                               len(first))
    return {"tokens": [first, *rest["tokens"]], "token_logprobs": [None, *rest["token_logprobs"]],
            "top_logprobs": [None, *rest["top_logprobs"]], "text_offset": [0, *rest["text_offset"]]}


def joined_logprobs(a: dict, b: dict) -> dict:
    """Two `completion_logprobs` objects one after the other (b's offsets already after a's text)."""
    return {key: a[key] + b[key] for key in a}


def prompt_logprobs(tokenizer, prompt_ids: list[int], records: list, top: int) -> list:
    """vLLM's `prompt_logprobs`: None for the first token, then per token {token id: {logprob, rank,
    decoded_token}} for the prompt's token and the `top` most likely."""
    out: list = [None]
    for token, (logprob, rank, best) in zip(prompt_ids[1:], records[1:], strict=True):
        entry = {str(t): {"logprob": lp, "rank": i + 1, "decoded_token": token_text(tokenizer, t)}
                 for i, (t, lp) in enumerate(best[:top])}
        entry[str(token)] = {"logprob": logprob, "rank": rank, "decoded_token": token_text(tokenizer, token)}
        out.append(entry)
    return out


def chat_logprobs(tokenizer, ids: list[int], records: list[tuple]) -> dict:
    """The chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""
    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": token_bytes(tokenizer, token_id, text)}

    return {"content": [{**entry(t, rec[0]), "top_logprobs": [entry(i, lp) for i, lp in rec[1]]}
                        for t, rec in zip(ids, records, strict=True)]}
