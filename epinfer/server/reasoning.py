"""A chat answer's reasoning apart from its content (`epinfer serve --reasoning-parser qwen3`, as
vLLM's and SGLang's): Qwen3, Qwen3-Next and Qwen3.5 think between `<think>` and `</think>` before
they answer. The message's `reasoning_content` is the text up to `</think>` (without a `<think>`
the model wrote itself), its `content` what follows, newlines after the tag dropped. A model that
did not think has no `</think>` in its text: all of it is content, unless the text starts with
`<think>` or the prompt left one open (templates that open the block themselves, e.g. Qwen3.5's
with thinking on), when all of it is reasoning (the answer ended before its thinking did). A stream
sends reasoning deltas, then content deltas, holding back a text end that may begin `</think>`.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def prompt_leaves_open(rendered: str) -> bool:
    """The rendered prompt ends inside a think block (the template opened it)."""
    return rendered.rfind(OPEN) > rendered.rfind(CLOSE)


def split(text: str, open_: bool) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole answer, None for a part it does not have."""
    if not (open_ or text.startswith(OPEN)):
        return None, text or None
    reasoning, closed, content = text.partition(CLOSE)
    reasoning = reasoning if open_ else reasoning[len(OPEN):]
    return reasoning or None, (content.lstrip("\n") or None) if closed else None


class ReasoningStream:
    """A stream's text split as `split` splits the whole: `add(delta, final)` returns the new
    (reasoning, content) pieces that can be sent; their concatenations equal `split`'s parts."""

    def __init__(self, open_: bool) -> None:
        self.open = open_
        self.text = ""
        self.sent = [0, 0]  # characters of the reasoning and of the content sent

    def add(self, delta: str, final: bool) -> tuple[str, str]:
        self.text += delta
        text = self.text
        if not final and not self.open and OPEN.startswith(text):
            return "", ""  # (the start of "<think>", or of content that only looks like it)
        reasoning, content = (part or "" for part in split(text, self.open))
        if not final and CLOSE not in text and reasoning:  # a text end that may begin "</think>"
            hold = next((k for k in range(min(len(CLOSE) - 1, len(reasoning)), 0, -1)
                         if reasoning.endswith(CLOSE[:k])), 0)
            reasoning = reasoning[:len(reasoning) - hold]
        out = reasoning[self.sent[0]:], content[self.sent[1]:]
        self.sent = [max(self.sent[0], len(reasoning)), max(self.sent[1], len(content))]
        return out
