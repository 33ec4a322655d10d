"""The prompts file of `epinfer generate --prompts-file`: JSON Lines, one request an object with
`prompt` (text) or `prompt_token_ids`, and optional sampling fields; every fault is one line naming
the file and the line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from epinfer.core.errors import UserError
from epinfer.core.sampling_params import SamplingParams, check_text, logit_bias_from_json
from epinfer.core.untrusted import reason, shown_path, stat_regular

PENALTIES = ("presence_penalty", "frequency_penalty", "repetition_penalty")
JSONL_FIELDS = {"prompt", "prompt_token_ids", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                "stop", "stop_token_ids", "ignore_eos", "min_tokens", "logit_bias", "include_stop_str_in_output",
                "prompt_logprobs", "allowed_token_ids", "guided_choice", "json_object", "json_schema",
                "truncate_prompt_tokens", "skip_special_tokens", "guided_regex", "bad_words",
                *PENALTIES}


STDIN = Path("-")  # --prompts-file -: the requests come on standard input


def read_prompts_file(path: Path, stdin=None) -> list[dict]:
    """The file's requests, each with "where" (file:line) for later messages. `-` reads them from
    standard input (`stdin`, sys.stdin by default) to its end; a terminal there is refused (the
    run would wait for typing with no word of it)."""
    requests = []
    name = f"prompts file {shown_path(path)}"
    try:
        if path == STDIN:
            stdin = stdin or sys.stdin
            if stdin is None or stdin.isatty():
                what = "a terminal" if stdin else "closed"
                raise UserError(f"--prompts-file - reads the requests from standard input, and that is {what}: "
                                "pipe or redirect a JSONL file into it")
            path = Path("<stdin>")
            text = stdin.buffer.read().decode("utf-8")
        else:
            stat_regular(path, name)  # (what it is, when not a file: a FIFO would block the read)
            text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{name}: cannot read it ({reason(exc)})") from None
    # JSONL lines end at "\n" alone: str.splitlines would also split inside a JSON string at
    # U+2028, U+2029 or U+0085, which JSON allows there unescaped
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        requests.append(_parse_line(line, lineno, path))
    return requests


def _parse_line(line: str, lineno: int, path: Path) -> dict:
    where = f"{path}:{lineno}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: malformed JSON ({exc.msg})") from None
    except (RecursionError, ValueError) as exc:  # nesting too deep, an integer of too many digits
        raise UserError(f"{where}: malformed JSON ({type(exc).__name__})") from None
    if not isinstance(item, dict):
        raise UserError(f"{where}: expected a JSON object")
    unknown = sorted(set(item) - JSONL_FIELDS)
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}")
    if ("prompt" in item) == ("prompt_token_ids" in item):
        raise UserError(f"{where}: give exactly one of 'prompt' or 'prompt_token_ids'")
    prompt = item.get("prompt", item.get("prompt_token_ids"))
    if "prompt" in item and not isinstance(prompt, str):
        raise UserError(f"{where}: 'prompt' must be a string")
    if isinstance(prompt, str):
        try:
            check_text("prompt", prompt)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    if "prompt_token_ids" in item and not (
        isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        raise UserError(f"{where}: 'prompt_token_ids' must be a list of integers")
    if "logit_bias" in item:  # (JSON's keys are strings: token ids as decimal strings, as OpenAI's)
        try:
            item["logit_bias"] = logit_bias_from_json(item["logit_bias"])
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    types = {"max_tokens": int, "top_k": int, "seed": int, "temperature": (int, float), "min_p": (int, float),
             "prompt_logprobs": int, "truncate_prompt_tokens": int, "skip_special_tokens": bool,
             "include_stop_str_in_output": bool,
             "top_p": (int, float), "ignore_eos": bool, "min_tokens": int, "stop_token_ids": list,
             "allowed_token_ids": list, "guided_choice": list, "json_object": bool,
             "json_schema": dict, "guided_regex": str, "bad_words": list,
             **{key: (int, float) for key in PENALTIES}}
    for key, kind in types.items():
        value = item.get(key)
        if value is not None and (not isinstance(value, kind) or
                                  (kind is not bool and isinstance(value, bool))):
            raise UserError(f"{where}: '{key}' has the wrong type")
    stop = item.get("stop")
    if stop is not None and not (isinstance(stop, str) or
                                 (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise UserError(f"{where}: 'stop' must be a string or a list of strings")
    item["where"] = where
    return item


def line_params(req: dict, args, i: int) -> SamplingParams:
    """A JSONL line's sampling parameters over `epinfer generate`'s flags (`args`; the seed of line i
    is --seed + i), checked with the server's checks; a UserError names the line."""
    seed = req.get("seed", None if args.seed is None else args.seed + i)
    params = SamplingParams(
        max_tokens=req.get("max_tokens", args.max_tokens), temperature=req.get("temperature", args.temperature),
        top_p=req.get("top_p", args.top_p), top_k=req.get("top_k", args.top_k), seed=seed,
        min_p=req.get("min_p", args.min_p), logit_bias=req.get("logit_bias"),
        include_stop_str_in_output=req.get("include_stop_str_in_output", False),
        prompt_logprobs=req.get("prompt_logprobs", args.prompt_logprobs),
        allowed_token_ids=req.get("allowed_token_ids"), choices=req.get("guided_choice"),
        json_object=req.get("json_object", False), json_schema=req.get("json_schema"), regex=req.get("guided_regex"),
        **{k: req[k] for k in ("truncate_prompt_tokens", "skip_special_tokens", "bad_words") if k in req},
        stop=req.get("stop"), stop_token_ids=req.get("stop_token_ids"),
        ignore_eos=req.get("ignore_eos", args.ignore_eos), min_tokens=req.get("min_tokens", 0),
        **{key: req.get(key, getattr(args, key)) for key in PENALTIES})
    try:
        params.validate()
    except UserError as exc:
        raise UserError(f"{req.get('where', f'request {i}')}: {exc}") from None
    return params
