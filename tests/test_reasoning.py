"""A chat answer's reasoning apart from its content (`serve --reasoning-parser qwen3`): the whole
answer split at `</think>`, a stream's deltas split the same way at every cut of its text (a text
end that may begin the tag held back), tool calls looked for in the content only, and the server's
messages with the flag and without it."""

from __future__ import annotations

import json
import signal

import pytest

from epinfer.server.reasoning import ReasoningStream, prompt_leaves_open, split
from tests.serving import Served, post, sse_events
from tests.test_tools import replies

CASES = [("<think>\nabc\n</think>\n\nAnswer", False, ("\nabc\n", "Answer")),
         ("abc\n</think>\n\nAns", True, ("abc\n", "Ans")),
         ("plain answer", False, (None, "plain answer")),
         ("<think>unfinished", False, ("unfinished", None)),
         ("unfinished", True, ("unfinished", None)),
         ("<thin", False, (None, "<thin")),
         ("<this is", False, (None, "<this is")),
         ("", True, (None, None)),
         ("<think></think>\n\nx", False, (None, "x")),
         ("ab</thi", True, ("ab</thi", None)),
         ("a</think>b</think>c", True, ("a", "b</think>c"))]


@pytest.mark.parametrize("text,open_,want", CASES)
def test_split_and_stream_agree(text, open_, want):
    assert split(text, open_) == want
    for step in (1, 2, 3, 7, len(text) or 1):
        stream, got = ReasoningStream(open_), ["", ""]
        pieces = [text[i:i + step] for i in range(0, len(text), step)] or [""]
        for k, piece in enumerate(pieces):
            for j, part in enumerate(stream.add(piece, k == len(pieces) - 1)):
                got[j] += part
        assert (got[0] or None, got[1] or None) == want, step
    assert prompt_leaves_open("<|im_start|>assistant\n<think>\n") and not prompt_leaves_open("x<think>a</think>\n")


def test_reasoning_then_tool_calls_in_a_choice():
    text = ('<think>\nI should call it.\n</think>\n\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n'
            '</tool_call>')
    for pieces in (1, 5, len(text)):
        chunks, whole = replies(text, pieces, think_open=False)
        message = whole["message"]
        assert message["reasoning_content"] == "\nI should call it.\n" and message["content"] is None
        assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [{"x": 1}]
        deltas = [c["delta"] for c in chunks]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
        assert "".join(d.get("content", "") for d in deltas) == ""
        assert deltas[-1]["tool_calls"][0]["function"]["name"] == "f"


TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


def test_reasoning_through_the_server(tmp_path):
    """The template opens the think block (as Qwen3.5's does with thinking on): the demo model's
    answer, which never closes it, is all reasoning with the flag, all content without it."""
    template = tmp_path / "think.jinja"
    template.write_text(TEMPLATE)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
    texts = {}
    for flags in ([], ["--reasoning-parser", "qwen3"]):
        server = Served(["--chat-template", str(template), "--max-num-seqs", "4", *flags], tmp_path / "serve.log")
        try:
            message = post(server.url, "/v1/chat/completions", body).json()["choices"][0]["message"]
            chunks = list(sse_events(post(server.url, "/v1/chat/completions", {**body, "stream": True})))
            deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
            streamed = ("".join(d.get("reasoning_content", "") for d in deltas),
                        "".join(d.get("content", "") for d in deltas))
            texts[bool(flags)] = (message, streamed)
        finally:
            server.proc.send_signal(signal.SIGTERM)
            assert server.wait(60) == 0, server.output()
    plain, parsed = texts[False][0], texts[True][0]
    assert "reasoning_content" not in plain and plain["content"]
    assert parsed["reasoning_content"] == plain["content"] and parsed["content"] is None
    assert texts[True][1] == (plain["content"], "") and texts[False][1] == ("", plain["content"])
