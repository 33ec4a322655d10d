"""A request body's structured output, as OpenAI and vLLM spell it: guided choice (`guided_choice`,
`structured_outputs.choice`), a regular expression (`guided_regex`, `structured_outputs.regex`), JSON
mode (`response_format: {"type": "json_object"}`) or a JSON schema (`response_format` json_schema,
`guided_json`, `structured_outputs.json`), as `SamplingParams` fields; what they hold is checked with
the sampling parameters (one of them at most, a schema or an expression this mode takes)."""

from __future__ import annotations


class OutputsError(ValueError):
    """A malformed structured-output field: the message and the field it names (a 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def structured_outputs(body: dict) -> dict:
    """The `SamplingParams` fields `choices`, `regex`, `json_object` and `json_schema` of `body`."""
    json_object, json_schema = _json_mode(body)
    return {"choices": _guided(body, "choice"), "regex": _guided(body, "regex"), "json_object": json_object,
            "json_schema": json_schema}


def _guided(body: dict, kind: str):
    """vLLM's `guided_<kind>`, or `structured_outputs` holding `kind` (`json` is `_json_mode`'s);
    other structured outputs are refused."""
    outputs = body.get("structured_outputs")
    if outputs is not None and not (isinstance(outputs, dict) and len(outputs) == 1
                                    and set(outputs) <= {"choice", "json", "regex"}):
        raise OutputsError("'structured_outputs' is supported with one of 'choice', 'json' or 'regex'",
                           "structured_outputs")
    if outputs is not None and any(body.get(f"guided_{k}") is not None for k in ("choice", "json", "regex")):
        raise OutputsError("give 'guided_choice' / 'guided_json' / 'guided_regex' or 'structured_outputs', "
                           "not both", "structured_outputs")
    return outputs.get(kind) if outputs is not None else body.get(f"guided_{kind}")


def _json_mode(body: dict) -> tuple[bool, dict | None]:
    """(JSON mode, a JSON schema): OpenAI's `response_format` (text, json_object, or json_schema with
    its `json_schema.schema`), or vLLM's `guided_json` / `structured_outputs.json` (a schema)."""
    kind = body.get("response_format")
    if kind is None or kind == {"type": "text"}:
        return False, _schema(body)
    if kind == {"type": "json_object"}:
        return True, _schema(body)
    spec = kind.get("json_schema") if isinstance(kind, dict) and kind.get("type") == "json_schema" else None
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise OutputsError("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                           "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                           "response_format")
    return False, spec["schema"]


def _schema(body: dict) -> dict | None:
    outputs = body.get("structured_outputs")
    schema = outputs.get("json") if isinstance(outputs, dict) else None
    return schema if schema is not None else body.get("guided_json")


# the request fields of the SamplingParams fields a guide sets (vLLM's names), for an error's `param`
API_FIELDS = {"regex": "guided_regex", "choices": "guided_choice", "json_schema": "guided_json",
              "json_object": "response_format"}


def guide_field(params) -> str:
    """The request field of `params`' guide."""
    return next((API_FIELDS[f] for f in ("regex", "choices", "json_schema") if getattr(params, f) is not None),
                "response_format")
