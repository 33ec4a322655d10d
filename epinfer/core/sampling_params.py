"""Per-request sampling and stopping parameters, and the one validation every entry point shares.

`SamplingParams.validate` is what the Python API, `epinfer generate` (flags and JSONL lines) and the
HTTP server all call, so a value that one of them accepts the others accept too. Rules:
  max_tokens       an integer >= 1
  temperature      a finite number >= 0 (0 = greedy); any finite positive value is safe: the
                   sampler subtracts the row maximum before dividing
  top_p            a finite number in (0, 1]
  top_k            an integer >= -1 (0 and -1: off), below 2**31
  min_p            a finite number in [0, 1] (0: off): after the temperature, tokens less likely than
                   min_p times the likeliest are dropped (before top-k / top-p, as in vLLM)
  seed             an integer in [0, 2**64 - 1] (the width of the generator's seed): range-checked,
                   never reduced
  stop             at most MAX_STOP_STRINGS non-empty strings of at most MAX_STOP_CHARS characters,
                   encodable as UTF-8
  stop_token_ids   at most MAX_STOP_STRINGS non-negative integers
  min_tokens       an integer in [0, max_tokens]: until that many tokens are out, the end-of-sequence
                   and stop token ids are never sampled, and a stop string must end past their text
                   (vLLM's rule)
  presence_penalty, frequency_penalty   finite numbers in [-2, 2] (OpenAI's): subtracted from the
                   logit of each token the request has generated, once / once per time it was
  repetition_penalty  a finite number > 0 (transformers' and vLLM's): the logit of each token of the
                   prompt or the output divided by it where positive, multiplied where negative
  include_stop_str_in_output  a boolean (vLLM's): the text keeps the stop string that ended it
  truncate_prompt_tokens  None, an integer >= 1 or -1 (vLLM's): only the prompt's last that many
                   tokens are used (-1: as many as leave room for one generated token)
  skip_special_tokens  a boolean (vLLM's; default true): special tokens (end of sequence, ...) are
                   left out of the text
  bad_words        at most MAX_BAD_WORDS non-empty strings of at most MAX_STOP_CHARS characters (vLLM's):
                   the answer never holds one (`engine.bad_words`)
  regex            a non-empty string: the whole answer matches it (`engine.regex_grammar`'s subset,
                   checked when the request is made)
  logit_bias       at most MAX_LOGIT_BIAS token ids, each with a finite number in [-100, 100] added to
                   its logit before sampling (OpenAI's; the ids are checked against the vocabulary by
                   the engine)
Booleans are not numbers here (`True` is no temperature). A failed check is a `UserError` with one
line naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from epinfer.core.errors import UserError

SEED_MAX = 2**64 - 1
TOP_K_MAX = 2**31 - 1
MAX_STOP_STRINGS = 32  # every generated token is checked against each of them
MAX_STOP_CHARS = 1024
MAX_LOGIT_BIAS = 1024
MAX_BAD_WORDS = 128
MAX_LOGPROBS = 20  # top logprobs a token at most (prompt or generated)
MAX_CHOICES, MAX_CHOICE_BYTES = 64, 4096  # guided choice: strings, and bytes a string


@dataclasses.dataclass
class SamplingParams:
    """`None` means "the model's generation_config.json default, else the built-in default"."""

    max_tokens: int | None = None  # default 64
    temperature: float | None = None  # default 1.0; 0 = greedy
    top_p: float | None = None  # default 1.0
    top_k: int | None = None  # default 0 (off); -1 also means off
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float | None = None  # default 0 (off)
    frequency_penalty: float | None = None  # default 0 (off)
    repetition_penalty: float | None = None  # default 1 (off)
    min_p: float | None = None  # default 0 (off)
    logit_bias: dict[int, float] | None = None
    include_stop_str_in_output: bool = False  # a matched stop string stays in the text (vLLM's)
    # each prompt token's logprob given the tokens before it, its rank, and the top N (vLLM's);
    # None: off. Such a request reuses no cached prefix (its tokens' logits are computed)
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] | None = None  # only these may be sampled (vLLM's); None: any
    choices: list[str] | None = None  # the answer is exactly one of these (vLLM's guided_choice)
    json_object: bool = False  # the answer is one JSON object (OpenAI's response_format json_object)
    json_schema: dict | None = None  # the answer is one JSON value of this schema (engine.json_schema's subset)
    truncate_prompt_tokens: int | None = None  # the prompt's last N tokens only (`truncate_prompt`)
    regex: str | None = None  # the whole answer matches this expression (vLLM's guided_regex: engine.regex_grammar)
    skip_special_tokens: bool = True  # special tokens left out of the text (vLLM's)
    bad_words: list[str] | None = None  # never in the answer (vLLM's: `engine.bad_words`)

    def resolved(self, defaults: dict) -> SamplingParams:
        """A copy with every None replaced by `defaults` or the built-in default, validated
        before anything is converted (int("3") or float(True) must not pass)."""
        def pick(name: str, builtin):
            value = getattr(self, name)
            if value is None:
                value = defaults.get(name)
            return builtin if value is None else value

        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens(defaults, self.min_tokens)
        merged = SamplingParams(max_tokens, pick("temperature", 1.0), pick("top_p", 1.0),
                                pick("top_k", 0), self.seed, stop, self.stop_token_ids, self.ignore_eos,
                                self.min_tokens, pick("presence_penalty", 0.0), pick("frequency_penalty", 0.0),
                                pick("repetition_penalty", 1.0), pick("min_p", 0.0), self.logit_bias,
                                self.include_stop_str_in_output, self.prompt_logprobs, self.allowed_token_ids,
                                self.choices, self.json_object, self.json_schema, self.truncate_prompt_tokens,
                                self.regex, self.skip_special_tokens, self.bad_words)
        merged.validate()
        return SamplingParams(
            max_tokens=int(merged.max_tokens),
            temperature=float(merged.temperature),
            top_p=float(merged.top_p),
            top_k=int(merged.top_k),
            min_p=float(merged.min_p),
            logit_bias={int(t): float(b) for t, b in (self.logit_bias or {}).items()} or None,
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            prompt_logprobs=None if self.prompt_logprobs is None else int(self.prompt_logprobs),
            allowed_token_ids=None if self.allowed_token_ids is None else sorted({int(t)
                                                                                 for t in self.allowed_token_ids}),
            choices=None if self.choices is None else list(self.choices),
            json_object=bool(self.json_object),
            json_schema=self.json_schema,
            truncate_prompt_tokens=None if self.truncate_prompt_tokens is None else int(self.truncate_prompt_tokens),
            skip_special_tokens=self.skip_special_tokens,
            regex=self.regex,
            bad_words=None if not self.bad_words else list(self.bad_words),
            seed=None if self.seed is None else int(self.seed),
            stop=list(stop or []),
            stop_token_ids=[int(t) for t in self.stop_token_ids or []],
            ignore_eos=bool(self.ignore_eos),
            min_tokens=int(self.min_tokens),
            presence_penalty=float(merged.presence_penalty),
            frequency_penalty=float(merged.frequency_penalty),
            repetition_penalty=float(merged.repetition_penalty),
        )

    def validate(self) -> None:
        _integer("max_tokens", self.max_tokens, 1, None)
        _number("temperature", self.temperature, 0.0, None)
        if self.top_p is not None:
            _number("top_p", self.top_p, None, None)
            if not 0 < self.top_p <= 1:
                raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        _integer("top_k", self.top_k, -1, TOP_K_MAX, "top_k must be -1, 0 (off) or positive")
        _number("min_p", self.min_p, 0.0, 1.0)
        _integer("seed", self.seed, 0, SEED_MAX)
        _integer("truncate_prompt_tokens", self.truncate_prompt_tokens, -1, None,
                 "truncate_prompt_tokens must be -1 or at least 1")
        if self.truncate_prompt_tokens == 0:
            raise UserError("truncate_prompt_tokens must be -1 or at least 1, got 0")
        words = self.bad_words
        if words is not None and not (isinstance(words, (list, tuple)) and len(words) <= MAX_BAD_WORDS and all(
                isinstance(w, str) and w.strip() and len(w) <= MAX_STOP_CHARS for w in words)):
            raise UserError(f"bad_words must be a list of at most {MAX_BAD_WORDS} non-blank strings of at most "
                            f"{MAX_STOP_CHARS} characters")
        for w in words or ():
            check_text("bad_words", w)
        if not isinstance(self.skip_special_tokens, bool):
            raise UserError(f"skip_special_tokens must be a boolean, got {type(self.skip_special_tokens).__name__}")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if stops is not None:
            if not isinstance(stops, (list, tuple)) or len(stops) > MAX_STOP_STRINGS:
                raise UserError(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings")
            for s in stops:
                if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
                    raise UserError(f"stop strings must be non-empty strings of at most {MAX_STOP_CHARS} "
                                    "characters")
                check_text("stop", s)
        ids = self.stop_token_ids
        if ids is not None:
            if not isinstance(ids, (list, tuple)) or len(ids) > MAX_STOP_STRINGS:
                raise UserError(f"stop_token_ids must be a list of at most {MAX_STOP_STRINGS} token ids")
            for t in ids:
                _integer("stop_token_ids", t, 0, None)
        _integer("min_tokens", self.min_tokens, 0, None)
        _integer("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        allowed = self.allowed_token_ids
        if allowed is not None:
            if not isinstance(allowed, (list, tuple)) or not allowed:
                raise UserError("allowed_token_ids must be a non-empty list of token ids")
            for t in allowed:
                _integer("allowed_token_ids", t, 0, None)
        choices = self.choices
        if choices is not None:
            if not isinstance(choices, (list, tuple)) or not 0 < len(choices) <= MAX_CHOICES or not all(
                    isinstance(c, str) and c and len(c.encode("utf-8", "surrogatepass")) <= MAX_CHOICE_BYTES
                    for c in choices):
                raise UserError(f"choices must be a list of 1 to {MAX_CHOICES} non-empty strings of at most "
                                f"{MAX_CHOICE_BYTES} bytes")
            for c in choices:
                check_text("choices", c)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise UserError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise UserError(f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to numbers")
            for t, b in self.logit_bias.items():
                _integer("logit_bias token id", t, 0, None)
                _number("logit_bias value", b, -100.0, 100.0)
        for name in ("presence_penalty", "frequency_penalty"):
            _number(name, getattr(self, name), -2.0, 2.0)
        _number("repetition_penalty", self.repetition_penalty, None, None)
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise UserError(f"repetition_penalty must be > 0 (1: off), got {self.repetition_penalty}")
        if sum((self.json_object is True, self.choices is not None, self.json_schema is not None,
                self.regex is not None)) > 1:
            raise UserError("json_object, json_schema, regex and choices: give one of them")
        if self.regex is not None and not (isinstance(self.regex, str) and self.regex):
            raise UserError("regex must be a non-empty string")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise UserError("json_schema must be a JSON schema (an object)")
        for name in ("ignore_eos", "include_stop_str_in_output", "json_object"):
            value = getattr(self, name)
            kind = type(value)
            if not isinstance(value, bool) and not (kind.__module__ == "numpy" and "bool" in kind.__name__):
                raise UserError(f"{name} must be a boolean, got {kind.__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Any penalty set (a resolved copy: each field is a number)."""
        return bool(self.presence_penalty or self.frequency_penalty) or self.repetition_penalty not in (None, 1.0)


DEFAULT_MAX_TOKENS = 64  # where neither the request nor generation_config.json's max_new_tokens sets it


def default_max_tokens(defaults: dict, min_tokens) -> int:
    """An unset max_tokens: the checkpoint's default (max_new_tokens) or DEFAULT_MAX_TOKENS, and at
    least `min_tokens` (when that is a valid count; a bad one is refused by `validate`)."""
    value = defaults.get("max_tokens") or DEFAULT_MAX_TOKENS
    whole = isinstance(min_tokens, numbers.Integral) and not isinstance(min_tokens, bool)
    return max(value, min_tokens) if whole else value


def logit_bias_from_json(value) -> dict[int, float] | None:
    """OpenAI's `logit_bias` as JSON has it (token ids as decimal strings) to {id: bias}; the values
    are checked by `validate`."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise UserError("logit_bias must be an object mapping token ids to numbers")
    if len(value) > MAX_LOGIT_BIAS:
        raise UserError(f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to numbers")
    bad = next((k for k in value if not (isinstance(k, str) and k.isascii() and k.isdigit() and len(k) <= 12)), None)
    if bad is not None:
        raise UserError(f"logit_bias keys must be token ids, got {bad!r:.40}")
    return {int(k): v for k, v in value.items()}


def _integer(name: str, value, low: int | None, high: int | None, what: str | None = None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy ints too
        raise UserError(f"{name} must be an integer, got {type(value).__name__} {value!r:.40}")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise UserError(f"{what or f'{name} must be an integer {span}'}, got {value}")


def _number(name: str, value, low: float | None, high: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{name} must be a number, got {type(value).__name__} {value!r:.40}")
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f">= {low:g}" if high is None else f"<= {high:g}" if low is None else f"in [{low:g}, {high:g}]"
        raise UserError(f"{name} must be {span}, got {value}")


def check_text(name: str, text: str) -> None:
    """Text the tokenizer will see must be valid Unicode: JSON can carry lone UTF-16 surrogates
    (`"\\ud800"`), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(f"{name} is not valid Unicode (a lone surrogate at character {exc.start})") from None


def truncate_prompt(ids: list[int], keep: int | None, max_model_len: int) -> list[int]:
    """`truncate_prompt_tokens`: the last `keep` tokens of a prompt (-1: the last max_model_len - 1,
    room for one generated token); None: the whole prompt."""
    if keep is None:
        return ids
    limit = max_model_len - 1 if keep == -1 else keep
    return ids[-limit:] if len(ids) > limit else ids
