"""A request body's JSON decoding (pure functions, no I/O): stricter than Python's decoder, and
what it refuses is an `APIError(400)` before any field is checked (`protocol`)."""

from __future__ import annotations

import json
import math

from epinfer.core.untrusted import surrogate_field
from epinfer.server.protocol import APIError

MAX_INT_DIGITS = 40  # no field takes a larger integer: one of thousands of digits is refused as it is read


def _no_constant(name: str):
    raise APIError(400, f"the JSON body holds {name}, which is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise APIError(400, f"the JSON body holds the number {text[:40]}, which overflows a double")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise APIError(400, f"the JSON body holds an integer of {len(text.lstrip('-'))} digits; no field takes "
                       f"one of over {MAX_INT_DIGITS}")
    return int(text)


def decode_json(raw: bytes):
    """The body as JSON (UTF-8/16/32), refusing what Python's decoder would otherwise accept:
    NaN, Infinity, numbers that overflow to infinity and integers of more than MAX_INT_DIGITS digits
    (their messages would not fit a line), and lone UTF-16 surrogates in any of its text. Nesting too
    deep for the decoder is a 400 like any other malformed body."""
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError:
        raise APIError(400, "the JSON body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise APIError(400, f"malformed JSON body: {str(exc)[:200]}") from None
    bad = surrogate_field(raw, body)  # (anywhere in a field: a schema's property name, a regex, a tool)
    if bad is not None:
        name = "a key of the JSON body" if bad is True else f"'{bad}'"
        raise APIError(400, f"{name} is not valid Unicode (it holds a lone surrogate)",
                       param=None if bad is True else bad)
    return body
