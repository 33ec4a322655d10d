"""OpenAI request validation (pure functions, no I/O; the body's JSON decoding: `json_body`; the
response bodies: `bodies`).

A request body is checked field by field: a known field of the wrong type or out of range, an
empty prompt, `n` other than 1, a prompt that leaves no room for one generated token or
`max_tokens` beyond the model length all raise `APIError(400)` with an OpenAI-style body
(`{"error": {"message", "type", "param", "code"}}`); unknown fields are ignored. A `model` other
than the served one is a 404, as in the OpenAI API.

Defaults: unset sampling fields come from the checkpoint's generation_config.json, then the
engine's built-ins (like offline `generate`); unset `max_tokens` is generation_config.json's
`max_new_tokens` (as in vLLM) or else 64, raised to `min_tokens`, capped at what the model
length leaves after the prompt (a request holds KV blocks for all of it from admission on).
Extensions: `ignore_eos` (bool) in the request; `token_ids` (the generated ids) in each choice.
"""

from __future__ import annotations

import dataclasses

from epinfer.core.errors import UserError
from epinfer.core.sampling_params import (
    MAX_LOGPROBS,
    SamplingParams,
    check_text,
    default_max_tokens,
    logit_bias_from_json,
    truncate_prompt,
)
from epinfer.core.untrusted import TimeLimitExceeded, one_line, time_limit
from epinfer.engine import restrict
from epinfer.server import reasoning
from epinfer.server.structured import API_FIELDS, OutputsError, guide_field, structured_outputs
from epinfer.server.tools import ToolError, check_tools, forced_tool, template_message

MAX_TOP_LOGPROBS = MAX_LOGPROBS
TEMPLATE_SECONDS = 10  # a chat template still rendering after this is stopped (core.untrusted.time_limit): a 500


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about the served model (from rank 0's engine)."""

    name: str
    max_model_len: int
    vocab_size: int
    defaults: dict  # generation_config.json sampling defaults
    reasoning: bool = False  # chat answers' reasoning split off (--reasoning-parser: `reasoning`)


@dataclasses.dataclass
class GenerateRequest:
    chat: bool
    prompt_ids: list[int]
    params: SamplingParams  # resolved: every field set
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    logprobs: int | None = None  # None: none; N: the chosen token's and the top N
    n: int = 1  # choices: one engine request each, choice i seeded with seed + i when a seed is given
    echo: bool = False  # completions: the prompt's text (and with logprobs its tokens') before the answer's
    prompt_logprobs: int | None = None  # vLLM's `prompt_logprobs`: each prompt token's, with the top N
    no_output: bool = False  # echo with max_tokens 0: the engine samples one token, the answer shows none
    tool_calls: bool = False  # chat with tools and tool_choice "auto": the answer is searched for calls (`tools`)
    forced_tool: str | None = None  # tool_choice names this function: the answer is its arguments (`tools`);
    # "": tool_choice "required", the answer is one call of any tool
    think_open: bool | None = None  # reasoning split off (`reasoning`): whether the prompt left a think block open


MAX_CHOICES = 128  # 'n' at most (OpenAI's limit); each choice counts toward the queue as a request
MAX_BATCH = 1024  # prompts in one completions request at most (each n choices, each counted in the queue)


def _text(value: str, key: str) -> str:
    try:
        check_text(key, value)
    except UserError as exc:
        raise APIError(400, f"'{key}' is not valid Unicode ({str(exc).split('(', 1)[-1]}", param=key) from None
    return value


# --- field checks -------------------------------------------------------------------------

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", list: "an array",
               dict: "an object"}


def _field(body: dict, key: str, kind: type, default=None):
    """body[key] if present and not null, checked against `kind` (int is not bool; a number
    may be an int)."""
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise APIError(400, f"'{key}' must be {_TYPE_NAMES[kind]}, got {type(value).__name__}", param=key)
    return value


def check_model(body: dict, info: ModelInfo) -> None:
    model = _field(body, "model", str)
    if model is not None and model != info.name:
        shown = _text(model, "model")[:100] + ("..." if len(model) > 100 else "")
        raise APIError(404, f"The model '{shown}' does not exist; this server serves '{info.name}'",
                       param="model", code="model_not_found")


def _token_list(value, key: str, info: ModelInfo) -> list[int] | None:
    if not isinstance(value, list) or not value or not all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value):
        return None
    bad = [t for t in value if not 0 <= t < info.vocab_size]
    if bad:
        raise APIError(400, f"'{key}': token id {bad[0]} is outside the vocabulary (size {info.vocab_size})",
                       param=key)
    return list(value)


def _prompts(body: dict, tokenizer, info: ModelInfo) -> list[list[int]]:
    """`prompt`'s token ids: one prompt (text or token ids), or a list of them (a batch, as OpenAI's)."""
    if "prompt" not in body or body["prompt"] is None:
        raise APIError(400, "'prompt' is required", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > MAX_BATCH:
            raise APIError(400, f"'prompt' holds {len(prompt)} prompts; at most {MAX_BATCH} a request", param="prompt")
        return [_prompt_ids(p, tokenizer, info, f"prompt[{i}]" if len(prompt) > 1 else "prompt")
                for i, p in enumerate(prompt)]
    return [_prompt_ids(prompt, tokenizer, info, "prompt")]


def _prompt_ids(prompt, tokenizer, info: ModelInfo, name: str) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, f"'{name}' is empty", param="prompt")
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send 'prompt' as a list of token ids", param="prompt")
        ids = list(tokenizer(_text(prompt, "prompt"), add_special_tokens=True)["input_ids"])
        if not ids:
            raise APIError(400, f"'{name}' is empty after tokenization", param="prompt")
        return ids
    if isinstance(prompt, list) and not prompt:
        raise APIError(400, f"'{name}' is empty", param="prompt")
    ids = _token_list(prompt, "prompt", info)
    if ids is None:
        raise APIError(400, f"'{name}' must be a string or a list of token ids", param="prompt")
    return ids


def _chat_ids(body: dict, tokenizer) -> list[int]:
    return chat_prompt_ids(tokenizer, _chat_text(body, tokenizer))


def _chat_text(body: dict, tokenizer) -> str:
    """The chat template's rendering of the request's messages (and tools)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or an array of text parts",
                           param="messages")
        _text(m["role"], "messages")
        try:
            clean.append(template_message(i, m, _text(content, "messages")))
        except ToolError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
    tools, _ = checked_tools(body)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
    extra = _field(body, "chat_template_kwargs", dict, {})  # e.g. {"enable_thinking": false} (Qwen3)
    if not all(isinstance(k, str) and k.isidentifier() and k not in TEMPLATE_OWN for k in extra):
        raise APIError(400, "'chat_template_kwargs' keys must be names the template reads (not "
                       f"{', '.join(sorted(TEMPLATE_OWN))})", param="chat_template_kwargs")
    if tools is not None:
        extra = {**extra, "tools": tools}
    generation_prompt = _field(body, "add_generation_prompt", bool, True)
    continue_final = _field(body, "continue_final_message", bool, False)  # the last message goes on
    if continue_final and generation_prompt:
        raise APIError(400, "'continue_final_message' needs 'add_generation_prompt': false",
                       param="continue_final_message")
    try:
        with time_limit(TEMPLATE_SECONDS):
            text = tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=generation_prompt,
                                                 continue_final_message=continue_final, **extra)
    except TimeLimitExceeded:
        raise APIError(500, f"this model's chat template did not render these messages within {TEMPLATE_SECONDS} s",
                       "server_error") from None
    except Exception as exc:  # jinja raises many kinds: the template rejected these messages, or is broken
        if template_broken(exc):
            raise APIError(500, f"this model's chat template is broken: {one_line(exc)}", "server_error") from None
        raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
    return text


def checked_tools(body: dict) -> tuple[list[dict] | None, bool]:
    """`tools.check_tools` with its refusal as a 400."""
    try:
        return check_tools(body)
    except ToolError as exc:
        raise APIError(400, str(exc), param=exc.param) from None


def template_broken(exc: Exception) -> bool:
    """The chat template itself is at fault (it does not parse), not the messages it was given."""
    return type(exc).__name__ == "TemplateSyntaxError"


def chat_template_problem(tokenizer) -> str | None:
    """At start: why the chat template cannot render a one-message conversation, if it cannot."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    try:
        with time_limit(TEMPLATE_SECONDS):
            tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                          add_generation_prompt=True)
    except TimeLimitExceeded:
        return f"it did not render within {TEMPLATE_SECONDS} s"
    except Exception as exc:
        return one_line(exc)
    return None


def chat_prompt_ids(tokenizer, rendered: str) -> list[int]:
    """The rendered template already holds its special tokens: add none."""
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def _logprobs(body: dict, chat: bool) -> int | None:
    if chat:
        want = _field(body, "logprobs", bool, False)
        top = _field(body, "top_logprobs", int)
        if top is not None and not want:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs")
        return (top or 0) if want else None
    top = _field(body, "logprobs", int)
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"'logprobs' must be in [0, {MAX_TOP_LOGPROBS}]", param="logprobs")
    return top




# fields that would change what a request generates, not applied here: refused unless neutral (a
# request must not get an answer to a question it did not ask); fields that change nothing (user,
# metadata, ...) are ignored like any unknown field
UNSUPPORTED = {"best_of": (1,), "suffix": ("",), "functions": ([],),
               "function_call": ("none", "auto"),
               "guided_grammar": (), "use_beam_search": (False,),
               "chat_template": (), "documents": ([],)}
TEMPLATE_OWN = {"messages", "conversation", "tokenize", "add_generation_prompt", "return_dict", "chat_template",
                "tools", "documents", "continue_final_message"}  # chat_template_kwargs may not set these


def _unsupported(body: dict) -> None:
    for key, neutral in UNSUPPORTED.items():
        value = body.get(key)
        if value is not None and not any(value == n and type(value) is type(n) for n in neutral):
            raise APIError(400, f"'{key}' is not supported by this server", param=key)


def parse_request(body, chat: bool, tokenizer, info: ModelInfo) -> list[GenerateRequest]:
    """Validates an already JSON-decoded body: one request for each prompt (a completions request
    may hold a list of them), in order; raises `APIError`."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    check_model(body, info)
    n = _field(body, "n", int, 1)
    if not 1 <= n <= MAX_CHOICES:
        raise APIError(400, f"'n' must be in [1, {MAX_CHOICES}], got {n}", param="n")
    stream = _field(body, "stream", bool, False)
    options = _field(body, "stream_options", dict, {})
    include_usage = _field(options, "include_usage", bool, False) if stream else False
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, key, int)
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list)
                                                           and all(isinstance(s, str) for s in stop))):
        raise APIError(400, "'stop' must be a string or an array of strings", param="stop")
    if stop and tokenizer is None:
        raise APIError(400, "'stop' strings need a tokenizer and this model has none: use 'stop_token_ids'",
                       param="stop")
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and not (isinstance(stop_ids, list)
                                     and (not stop_ids or _token_list(stop_ids, "stop_token_ids", info))):
        raise APIError(400, "'stop_token_ids' must be an array of token ids", param="stop_token_ids")
    allowed = body.get("allowed_token_ids")
    if allowed is not None and _token_list(allowed, "allowed_token_ids", info) is None:
        raise APIError(400, "'allowed_token_ids' must be a non-empty array of token ids",
                       param="allowed_token_ids")
    fields = dict(temperature=_field(body, "temperature", float), top_p=_field(body, "top_p", float),
                  min_p=_field(body, "min_p", float), allowed_token_ids=allowed, **_structured(body),
                  top_k=_field(body, "top_k", int), seed=_field(body, "seed", int),
                  ignore_eos=_field(body, "ignore_eos", bool, False), min_tokens=_field(body, "min_tokens", int, 0),
                  include_stop_str_in_output=_field(body, "include_stop_str_in_output", bool, False),
                  skip_special_tokens=_field(body, "skip_special_tokens", bool, True), bad_words=_bad_words(body),
                  **{key: _field(body, key, float) for key in ("presence_penalty", "frequency_penalty",
                                                               "repetition_penalty")})
    logprobs = _logprobs(body, chat)
    echo, prompt_logprobs = _echo(body, chat, stream, logprobs)
    _unsupported(body)
    no_output = echo and max_tokens == 0  # (the prompt's logprobs only, as lm-eval asks for them)
    if no_output:
        max_tokens = 1
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"'{key}' must be at least 1 (0 only with 'echo'), got {max_tokens}", param=key)
    rendered = _chat_text(body, tokenizer) if chat else None
    prompts = [chat_prompt_ids(tokenizer, rendered)] if chat else _prompts(body, tokenizer, info)
    if (keep := _field(body, "truncate_prompt_tokens", int)) is not None and keep != -1 and keep < 1:
        raise APIError(400, f"'truncate_prompt_tokens' must be -1 or at least 1, got {keep}",
                       param="truncate_prompt_tokens")
    prompts = [truncate_prompt(ids, keep, info.max_model_len) for ids in prompts]  # (vLLM's: before the length checks)
    think_open = reasoning.prompt_leaves_open(rendered) if chat and info.reasoning else None
    try:
        bias = logit_bias_from_json(body.get("logit_bias"))
    except UserError as exc:
        raise APIError(400, str(exc), param="logit_bias") from None
    engine_top = max((k for k in (prompt_logprobs, logprobs if echo else None) if k is not None), default=None)
    fields["prompt_logprobs"] = engine_top
    tools, look_for_calls = checked_tools(body) if chat else (None, False)
    forced = forced_tool(body) if tools else None
    if forced is not None:
        if fields["json_schema"] is not None or fields["json_object"] or fields["choices"] is not None or fields[
                "regex"] is not None:
            raise APIError(400, "a forced 'tool_choice' (named or required) and a structured output: give one of them",
                           param="tool_choice")
        fields["json_schema"] = forced[1]
    return [GenerateRequest(chat, ids, _params(ids, i if len(prompts) > 1 else None, info, key, max_tokens, stop,
                                               stop_ids, bias, fields), stream, include_usage, logprobs, n, echo,
                            prompt_logprobs, no_output, look_for_calls,
                            forced[0] if forced else None, think_open)
            for i, ids in enumerate(prompts)]


def _bad_words(body: dict) -> list[str] | None:
    words = _field(body, "bad_words", list)
    if words is not None and not all(isinstance(w, str) for w in words):
        raise APIError(400, "'bad_words' must be an array of strings", param="bad_words")
    return words or None


def _structured(body: dict) -> dict:
    try:
        return structured_outputs(body)
    except OutputsError as exc:
        raise APIError(400, str(exc), param=exc.param) from None


def _echo(body: dict, chat: bool, stream: bool, logprobs: int | None) -> tuple[bool, int | None]:
    """(`echo`, `prompt_logprobs`), checked: echo for completions only; the prompt's logprobs (asked
    for directly, or by echo with logprobs) only in a whole answer, as in vLLM."""
    echo = _field(body, "echo", bool, False)
    if echo and chat:
        raise APIError(400, "'echo' is not supported for chat completions", param="echo")
    top = _field(body, "prompt_logprobs", int)
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"'prompt_logprobs' must be in [0, {MAX_TOP_LOGPROBS}]", param="prompt_logprobs")
    if stream and (top is not None or (echo and logprobs is not None)):
        raise APIError(400, "the prompt's logprobs ('prompt_logprobs', or 'echo' with 'logprobs') are not "
                       "available with 'stream': true", param="stream")
    return echo, top


def _params(ids: list[int], index: int | None, info: ModelInfo, key: str, max_tokens: int | None, stop, stop_ids,
            bias, fields: dict) -> SamplingParams:
    """One prompt's sampling parameters: the lengths checked against the model's, `max_tokens`
    defaulted within them; `index`: the prompt's place in a batch (None: the only one)."""
    prompt = "the prompt" if index is None else f"prompt {index}"
    room = info.max_model_len - len(ids)
    if room < 1:
        raise APIError(400, f"{prompt} has {len(ids)} tokens; this model's maximum context length is "
                       f"{info.max_model_len} (prompt + at least one generated token)", param="prompt")
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"this model's maximum context length is {info.max_model_len} tokens; you "
                       f"requested {len(ids) + max_tokens} ({len(ids)} in {prompt}, {max_tokens} in the "
                       f"completion)", param=key)
    if fields["min_tokens"] > room:
        raise APIError(400, f"this model's maximum context length is {info.max_model_len} tokens; 'min_tokens' "
                       f"asks for {fields['min_tokens']} after {prompt}'s {len(ids)}", param="min_tokens")
    if max_tokens is None:  # generation_config.json's max_new_tokens, or 64, and at least min_tokens
        max_tokens = min(default_max_tokens(info.defaults, fields["min_tokens"]), room)
    try:
        params = SamplingParams(max_tokens=max_tokens, stop=stop, stop_token_ids=stop_ids, logit_bias=bias,
                                **fields).resolved(info.defaults)
    except UserError as exc:  # the shared checks: ranges, finite numbers, seed width, stop strings
        word = str(exc).split(" ", 1)[0].rstrip(",:")  # (the message names its field first)
        raise APIError(400, str(exc), param=API_FIELDS.get(word, word)) from None
    if params.logit_bias:
        _token_list(sorted(params.logit_bias), "logit_bias", info)  # (the vocabulary)
    try:
        restrict.json_guide(params)  # (a schema or an expression this mode does not take: refused here)
    except UserError as exc:
        raise APIError(400, str(exc), param=guide_field(params)) from None
    return params


def parse_tokenize(body, tokenizer, info: ModelInfo) -> dict:
    """POST /tokenize (as vLLM's): `prompt` (text, with the tokenizer's special tokens unless
    `add_special_tokens` is false) or chat `messages` (the template rendered as for a chat request)
    to token ids, their count and the max model length."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    check_model(body, info)
    if ("prompt" in body) == ("messages" in body):
        raise APIError(400, "give exactly one of 'prompt' or 'messages'")
    if "messages" in body:
        ids = _chat_ids(body, tokenizer)
    elif _field(body, "add_special_tokens", bool, True):
        ids = _prompts(body, tokenizer, info)
        if len(ids) > 1:
            raise APIError(400, "/tokenize takes one prompt", param="prompt")
        ids = ids[0]
    else:
        if tokenizer is None or not isinstance(body["prompt"], str) or not body["prompt"]:
            raise APIError(400, "'add_special_tokens': false needs a non-empty text 'prompt' and a tokenizer",
                           param="prompt")
        ids = list(tokenizer(_text(body["prompt"], "prompt"), add_special_tokens=False)["input_ids"])
    return {"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids}


def parse_detokenize(body, tokenizer, info: ModelInfo) -> dict:
    """POST /detokenize (as vLLM's): `tokens` to their text."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    check_model(body, info)
    ids = _token_list(body.get("tokens"), "tokens", info)
    if ids is None:
        raise APIError(400, "'tokens' must be a non-empty array of token ids", param="tokens")
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer: nothing to detokenize with", param="tokens")
    return {"prompt": tokenizer.decode(ids)}
