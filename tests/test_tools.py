"""Tool calls in chat completions (`server.tools`): the calls Qwen's models write in both forms
parsed, text that only looks like one left as text, a stream's text held back from a call's start
and the calls in its last chunk (the same message as the whole answer's), the tools rendered by the
chat template with earlier calls and their results, and the refusals as one-line 400s."""

from __future__ import annotations

import json
import signal
import types

import pytest

from epinfer import SamplingParams
from epinfer.server.client import Update
from epinfer.server.protocol import GenerateRequest
from epinfer.server.reply import Choice
from epinfer.server.tools import ToolError, check_tools, forced_tool, held_back, parse_calls
from tests.serving import Served, post, sse_events

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
HERMES = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
XML = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
       "</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=now>\n</function>\n</tool_call>")


def test_calls_parsed_in_both_forms():
    content, calls = parse_calls(HERMES)
    assert content == "Let me look.\n" and len(calls) == 1 and calls[0]["type"] == "function"
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert calls[0]["id"].startswith("call_")
    content, calls = parse_calls(XML)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather", "now"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 3}
    assert json.loads(calls[1]["function"]["arguments"]) == {}
    string_args = '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
    assert json.loads(parse_calls(string_args)[1][0]["function"]["arguments"]) == {"x": 1}
    for text in ("no calls here", "<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
                 "<tool_call>\n<function=f>\nunclosed", '<tool_call>{"name": "f"}'):
        assert parse_calls(text) is None, text
    assert held_back("abc<tool_call>{") == 3 and held_back("abc<tool") == 3 and held_back("abc<") == 3
    assert held_back("abc") == 3 and held_back("a < b") == 5


def test_tools_checked():
    assert check_tools({}) == (None, False) and check_tools({"tools": [], "tool_choice": "none"}) == (None, False)
    assert check_tools({"tools": [WEATHER]}) == ([WEATHER], True)
    assert check_tools({"tools": [WEATHER], "tool_choice": "none"}) == ([WEATHER], False)
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert check_tools({"tools": [WEATHER], "tool_choice": named}) == ([WEATHER], False)
    assert forced_tool({"tools": [WEATHER], "tool_choice": named}) == ("get_weather",
                                                                       WEATHER["function"]["parameters"])
    assert check_tools({"tools": [WEATHER], "tool_choice": "required"}) == ([WEATHER], False)
    assert forced_tool({"tools": [WEATHER], "tool_choice": "required"}) == ("", {"anyOf": [{
        "type": "object", "properties": {"name": {"const": "get_weather"},
                                         "arguments": WEATHER["function"]["parameters"]}}]})
    for body, fragment in (({"tools": [WEATHER], "tool_choice": "always"}, "'tool_choice' must be"),
                           ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
                            "names 'x', which is not among the tools"),
                           ({"tool_choice": "required"}, "'tool_choice' needs 'tools'"),
                           ({"tools": [{"type": "function"}]}, "tools[0] must be"),
                           ({"tools": [{"type": "function", "function": {"name": 3}}]}, "tools[0] must be"),
                           ({"tools": "x"}, "'tools' must be an array")):
        with pytest.raises(ToolError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            check_tools(body)


class CharTokenizer:
    """One character a token (id = code point): enough for the reply's text handling."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def replies(text: str, pieces: int, think_open: bool | None = None) -> tuple[list[dict], dict]:
    """The stream's chunks for `text` arriving in `pieces` updates, and the whole answer's choice (a
    chat request that looks for tool calls; `think_open`: and splits reasoning off)."""
    req = GenerateRequest(True, [1], SamplingParams(max_tokens=999).resolved({}), tool_calls=True,
                          think_open=think_open)
    state = types.SimpleNamespace(req=req)
    stream, whole = Choice(0, state, CharTokenizer()), Choice(0, state, CharTokenizer())
    ids = [ord(c) for c in text]
    cut = [len(ids) * k // pieces for k in range(pieces + 1)]
    chunks = []
    for k in range(pieces):
        update = Update(ids[cut[k]:cut[k + 1]], finish_reason="stop" if k == pieces - 1 else None)
        stream.add(update)
        whole.add(update)
        part = stream.delta(update)
        if part is not None:
            chunks.append(part)
    return chunks, whole.whole(None)


@pytest.mark.parametrize("pieces", [1, 3, len(HERMES)])
def test_stream_holds_back_the_call_and_ends_with_it(pieces):
    chunks, whole = replies(HERMES, pieces)
    sent = "".join(c["delta"].get("content", "") for c in chunks)
    assert sent == whole["message"]["content"] == "Let me look.\n"
    assert whole["finish_reason"] == chunks[-1]["finish_reason"] == "tool_calls"
    streamed = chunks[-1]["delta"]["tool_calls"]
    assert [c["index"] for c in streamed] == [0]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in streamed] == \
        [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["message"]["tool_calls"]]
    # text that only starts like a call goes out whole, at the end at the latest
    chunks, whole = replies("a <tool_ca b", pieces)
    assert "".join(c["delta"].get("content", "") for c in chunks) == whole["message"]["content"] == "a <tool_ca b"
    assert whole["finish_reason"] == "stop" and "tool_calls" not in whole["message"]


TEMPLATE = """{%- if tools %}<|im_start|>system
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools><|im_end|>
{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}
{% if m.role == 'tool' %}<tool_response>{{ m.content }}</tool_response>{% else %}{{ m.content }}{% endif %}
{%- for c in m.tool_calls or [] %}
<tool_call>{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}</tool_call>
{%- endfor %}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_tools_through_the_server(tmp_path):
    template = tmp_path / "tools.jinja"
    template.write_text(TEMPLATE)
    server = Served(["--chat-template", str(template), "--max-num-seqs", "4"], tmp_path / "serve.log")
    try:
        messages = [{"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
        plain = post(server.url, "/tokenize", {"messages": messages[:1]}).json()["count"]
        rendered = post(server.url, "/tokenize", {"messages": messages, "tools": [WEATHER]}).json()
        text = post(server.url, "/detokenize", {"tokens": rendered["tokens"]}).json()["prompt"]
        assert rendered["count"] > plain and '"name": "get_weather"' in text and "<tools>" in text
        assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
        assert "<tool_response>sunny</tool_response>" in text
        body = {"messages": messages, "tools": [WEATHER], "max_tokens": 6, "temperature": 0}
        answer = post(server.url, "/v1/chat/completions", body).json()
        assert answer["choices"][0]["finish_reason"] == "length" and "tool_calls" not in answer["choices"][0]["message"]
        chunks = list(sse_events(post(server.url, "/v1/chat/completions", {**body, "stream": True})))
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == \
            answer["choices"][0]["message"]["content"]
        units = {"type": "function", "function": {"name": "units", "parameters": {
            "type": "object", "properties": {"metric": {"type": "boolean"}, "scale": {"enum": ["C", "F"]}}}}}
        forced = {**body, "tools": [WEATHER, units], "tool_choice": {"type": "function", "function": {"name": "units"}},
                  "max_tokens": 300, "temperature": 1.0, "seed": 2}
        answer = post(server.url, "/v1/chat/completions", forced).json()["choices"][0]
        call = answer["message"]["tool_calls"][0]
        assert answer["message"]["content"] is None and call["function"]["name"] == "units"
        assert answer["finish_reason"] == "stop"
        assert list(json.loads(call["function"]["arguments"])) == ["metric", "scale"]
        chunks = list(sse_events(post(server.url, "/v1/chat/completions", {**forced, "stream": True})))
        calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
                 if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
        assert calls[0]["function"]["name"] == "units" and calls[0]["id"].startswith("call_")
        assert "".join(c["function"]["arguments"] for c in calls) == call["function"]["arguments"]
        now = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
        required = {**forced, "tools": [units, now], "tool_choice": "required", "max_tokens": 600}  # (bounded calls)
        answer = post(server.url, "/v1/chat/completions", required).json()["choices"][0]
        assert "tool_calls" in answer["message"], answer
        call = answer["message"]["tool_calls"][0]
        assert answer["finish_reason"] == "tool_calls" and answer["message"]["content"] is None
        arguments = json.loads(call["function"]["arguments"])
        assert (call["function"]["name"], list(arguments)) in (("now", []), ("units", ["metric", "scale"]))
        chunks = list(sse_events(post(server.url, "/v1/chat/completions", {**required, "stream": True})))
        calls = [c["choices"][0]["delta"]["tool_calls"] for c in chunks
                 if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
        assert len(calls) == 1 and calls[0][0]["function"] == call["function"]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
        for bad, fragment in (({"tool_choice": "always"}, "'tool_choice' must be"),
                              ({"tools": [{"type": "function", "function": {}}]}, "tools[0] must be"),
                              ({"messages": [{"role": "assistant", "content": "", "tool_calls": [
                                  {"type": "function", "function": {"name": "f", "arguments": "{x"}}]}]},
                               "arguments is not JSON text")):
            r = post(server.url, "/v1/chat/completions", {**body, **bad})
            assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0, server.output()
