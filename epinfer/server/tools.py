"""Tool calls in chat completions (OpenAI's `tools`, `tool_choice` "auto", "none" or a named function).

The request's tools go to the chat template (`tools=`), which tells the model how to call them; the
conversation may hold earlier calls (an assistant message's `tool_calls`) and their results (`tool`
messages). With `tool_choice` "auto" the answer's text is searched for the calls Qwen's models
write, each between `<tool_call>` and `</tool_call>`, in either of their two forms:

    {"name": "get_weather", "arguments": {"city": "Paris"}}                 (Qwen2.5, Qwen3, Qwen3-Next)
    <function=get_weather><parameter=city>Paris</parameter></function>      (Qwen3-Coder, Qwen3.5)

When every block parses, the answer's message holds them as `tool_calls` (arguments as a JSON
string), its `content` is the text before the first (null when there is none) and its
finish_reason is "tool_calls"; otherwise the text stays as it is. A stream holds its text back
from the first `<tool_call>` (or a beginning of it at the end) and sends the calls in its last
chunk. A named function (`tool_choice: {"type": "function", "function": {"name": ...}}`) is forced: the
answer is its arguments, generated under its parameters' JSON schema, and the message holds that one
call (finish reason as the answer's, "stop" when it ended). With "required" the answer is one call of
any of the tools, `{"name": ..., "arguments": {...}}` under the schema of each tool's parameters
(`anyOf`), which the message holds as its call (a stream sends it whole at its end; an answer cut
short before it closed is its text).
"""

from __future__ import annotations

import json
import re
import uuid

OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
FUNCTION = re.compile(r"^<function=([^>\n]+)>(.*)</function>$", re.DOTALL)
PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)
MAX_TOOLS = 128


class ToolError(ValueError):
    """A `tools`, `tool_choice` or tool message the server refuses (a 400 naming `param`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_tools(body: dict) -> tuple[list[dict] | None, bool]:
    """(the tools for the template or None, whether the answer is searched for calls)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise ToolError("'tool_choice' needs 'tools'", "tool_choice")
        return None, False
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ToolError(f"'tools' must be an array of at most {MAX_TOOLS} tools", "tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(fn, dict)
                and isinstance(fn.get("name"), str) and fn["name"]
                and isinstance(fn.get("description", ""), str) and isinstance(fn.get("parameters", {}), dict)):
            raise ToolError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                            "\"description\": ..., \"parameters\": {...}}}}", "tools")
    if named(choice) is not None:
        if named(choice) not in [t["function"]["name"] for t in tools]:
            raise ToolError(f"'tool_choice' names {named(choice)!r}, which is not among the tools", "tool_choice")
        return tools, False
    if choice not in (None, "auto", "none"):
        if choice == "required":
            return tools, False
        raise ToolError("'tool_choice' must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                        "\"function\": {\"name\": ...}}", "tool_choice")
    return tools, choice != "none"


def named(choice) -> str | None:
    """The function a `tool_choice` names, if it names one."""
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    return fn.get("name") if isinstance(fn, dict) and isinstance(fn.get("name"), str) else None


def forced_tool(body: dict) -> tuple[str, dict] | None:
    """(name, its parameters' JSON schema) of the function `tool_choice` names: the answer is then
    that call's arguments, generated under the schema (`engine.json_schema`), as OpenAI and vLLM do
    for a named function. "required": ("", the schema of one call of any tool: `any_call`)."""
    if body.get("tool_choice") == "required":
        return "", {"anyOf": [{"type": "object", "properties": {
            "name": {"const": t["function"]["name"]},
            "arguments": t["function"].get("parameters") or {"type": "object", "properties": {}}}}
            for t in body["tools"]]}
    name = named(body.get("tool_choice"))
    if name is None:
        return None
    fn = next(t["function"] for t in body["tools"] if t["function"]["name"] == name)
    return name, fn.get("parameters") or {"type": "object", "properties": {}}


def any_call(text: str, call_id: str) -> dict | None:
    """The call of a "required" answer (`{"name": ..., "arguments": {...}}`), or None where the text is
    not one (cut short)."""
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not (isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments"), dict)):
        return None
    return {"id": call_id, "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


def template_message(i: int, m: dict, content: str) -> dict:
    """A message as the chat template takes it: an assistant's `tool_calls` with their arguments as
    objects (Qwen's templates write them out themselves), a tool result with its `tool_call_id`."""
    out = {"role": m["role"], "content": content}
    calls = m.get("tool_calls")
    if calls is not None:
        if m["role"] != "assistant" or not isinstance(calls, list):
            raise ToolError(f"messages[{i}].tool_calls: an array, in an assistant message only", "messages")
        out["tool_calls"] = [template_call(i, j, call) for j, call in enumerate(calls)]
    if m["role"] == "tool" and isinstance(m.get("tool_call_id"), str):
        out["tool_call_id"] = m["tool_call_id"]
    return out


def template_call(i: int, j: int, call) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments", "{}"), str)):
        raise ToolError(f"messages[{i}].tool_calls[{j}] must be {{\"type\": \"function\", \"function\": "
                        "{\"name\": ..., \"arguments\": \"<JSON text>\"}}", "messages")
    try:
        arguments = json.loads(fn.get("arguments", "{}"))
    except ValueError:
        raise ToolError(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON text", "messages") from None
    return {"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": arguments}}


def parse_calls(text: str) -> tuple[str | None, list[dict]] | None:
    """(content, tool calls) when `text` holds calls that all parse; None when it holds none or one
    that does not (the text is then the answer as it is)."""
    blocks = BLOCK.findall(text)
    if not blocks:
        return None
    calls = []
    for block in blocks:
        call = _call(block.strip())
        if call is None:
            return None
        name, arguments = call
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}})
    content = text[:text.index(OPEN)]  # (as vLLM's: what a stream sent before the call, unstripped)
    return content or None, calls


def _call(block: str) -> tuple[str, object] | None:
    """(name, arguments) of one block in either form, or None."""
    if block.startswith("{"):
        try:
            call = json.loads(block)
        except ValueError:
            return None
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
            return None
        arguments = call.get("arguments", call.get("parameters", {}))
        if isinstance(arguments, str):  # (some models write the arguments as a JSON string)
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        return call["name"], arguments
    match = FUNCTION.match(block)
    if match is None:
        return None
    arguments = {}
    for key, value in PARAMETER.findall(match.group(2)):
        value = value.strip("\n")
        try:
            arguments[key.strip()] = json.loads(value)
        except ValueError:
            arguments[key.strip()] = value
    return match.group(1).strip(), arguments


def held_back(text: str) -> int:
    """Where a stream's sent text must stop: at the first `<tool_call>`, or at a beginning of one
    at the text's end (len(text) when there is neither)."""
    start = text.find(OPEN)
    if start >= 0:
        return start
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:k]):
            return len(text) - k
    return len(text)
