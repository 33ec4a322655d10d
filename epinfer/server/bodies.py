"""OpenAI response bodies: usage, a choice (whole or a stream's delta), the response around them
(pure functions, no I/O)."""

from __future__ import annotations


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(chat: bool, text: str | None, finish_reason: str | None, logprobs: dict | None, token_ids: list[int],
           delta: bool = False, tool_calls: list[dict] | None = None, thought: str | None = None) -> dict:
    """`tool_calls` (chat): the answer's calls (`tools.parse_calls`), which a delta numbers;
    `thought` (chat): its reasoning (`reasoning`), as `reasoning_content`."""
    out: dict = {"index": 0}
    if chat and delta:
        quiet = finish_reason is not None or tool_calls or thought
        out["delta"] = {"content": text} if text or not quiet else {}
        if thought:
            out["delta"]["reasoning_content"] = thought
        if tool_calls:
            out["delta"]["tool_calls"] = [{"index": i, **call} for i, call in enumerate(tool_calls)]
    elif chat:
        out["message"] = {"role": "assistant", "content": text}
        if thought is not None:
            out["message"]["reasoning_content"] = thought
        if tool_calls:
            out["message"]["tool_calls"] = tool_calls
    else:
        out["text"] = text
    out["logprobs"] = logprobs
    out["finish_reason"] = finish_reason
    out["token_ids"] = token_ids
    return out


def response(chat: bool, request_id: str, created: int, model: str, choices: list[dict],
             usage_: dict | None, chunk: bool = False) -> dict:
    if chat:
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        obj = "text_completion"
    body = {"id": request_id, "object": obj, "created": created, "model": model, "choices": choices}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body
