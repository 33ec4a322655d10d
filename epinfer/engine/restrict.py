"""The tokens a step may sample for each request restricted to some: its `allowed_token_ids`, or
the next tokens of a guided choice (`guided`), of JSON mode (`json_mode`), of a JSON schema
(`json_schema`) or of a regular expression (`regex_grammar`)."""

from __future__ import annotations

import functools
import json

import torch

from epinfer.core.errors import UserError
from epinfer.engine import guided, json_mode, json_schema, penalties, regex_grammar
from epinfer.engine.guided import TokenSet


def allowed_rows(sampled: list, tokenizer, vocab_size: int, end_ids) -> tuple[list[tuple[int, object]], list, list]:
    """([(row, ids: a list, a host tensor or a `guided.TokenSet`)], [(sequence, why) for the requests no token can
    continue], [the requests whose guided answer is complete but whose end ids `min_tokens` still
    holds: they end as stopped]); `end_ids(params)`: the ids that end a request. `allowed_token_ids`
    with a guide narrows the guide's ids."""
    rows, dead, complete = [], [], []
    for row, seq in enumerate(sampled):
        p = seq.params
        if not (guided_request(p) and seq.finish_reason is None):
            if p.allowed_token_ids and len(p.allowed_token_ids) > penalties.BITS_FROM:  # (its mask made once)
                seq.allowed = seq.allowed or TokenSet(torch.tensor(p.allowed_token_ids, dtype=torch.long))
                rows.append((row, seq.allowed))
            elif p.allowed_token_ids:
                rows.append((row, p.allowed_token_ids))
            continue
        vocab = guided.vocab_bytes(tokenizer, vocab_size)
        ends = end_ids(p)
        try:
            if p.choices:
                ids = guided.allowed_ids(vocab, p.choices, seq.output_ids, ends)
            else:  # (`json_guide`'s, made with the request)
                ids = seq.guide.allowed(vocab, seq.output_ids, ends)
        except UserError as exc:  # (a regex whose states grew too costly to follow)
            dead.append((seq, str(exc)))
            rows.append((row, [0]))
            continue
        allowed = ids  # (a guide's `TokenSet`: its mask goes to the device as bits, `penalties.allow`)
        ids = ids.ids if isinstance(ids, TokenSet) else torch.as_tensor(ids, dtype=torch.long)
        if p.allowed_token_ids:
            ids = allowed = ids[torch.isin(ids, torch.tensor(p.allowed_token_ids, dtype=torch.long))]
        if len(ids) and len(seq.output_ids) < p.min_tokens and bool(torch.isin(ids, torch.tensor(sorted(ends))).all()):
            complete.append(seq)  # (nothing but its end may come: `min_tokens` cannot be met along the guide)
        elif not len(ids):
            along = ("any of its choices" if p.choices else "its JSON schema" if p.json_schema is not None
                     else "its regular expression" if p.regex is not None else "a JSON object")
            among = " among its allowed_token_ids" if p.allowed_token_ids else ""
            dead.append((seq, f"no token continues its answer along {along}{among}"))
        rows.append((row, allowed if len(ids) else [0]))
    return rows, dead, complete


def check_request(p, lead: str, tokenizer, ends: set[int]) -> None:
    """A guide needs a tokenizer and an id to end its answer with; allowed ids that only end the
    request while min_tokens holds them back leave no token to sample. `lead` starts each message
    ("request 3: ", or nothing)."""
    if guided_request(p) and (tokenizer is None or not ends):
        what = "guided choice" if p.choices else "a guided regex" if p.regex is not None else "JSON mode"
        raise UserError(f"{lead}{what} needs a tokenizer and an end-of-sequence or stop token id to end "
                        "the answer with (not ignore_eos without stop_token_ids)")
    if p.allowed_token_ids and p.min_tokens and set(p.allowed_token_ids) <= ends:
        raise UserError(f"{lead}allowed_token_ids holds only ids that end the request, which "
                        "min_tokens holds back: no token could be sampled")


def json_guide(p) -> json_mode.JsonGuide | None:
    """A request's guide (JSON mode's, its schema's or its regular expression's, compiled: UserError
    for one this mode does not take), None for other requests. Requests with the same expression or
    schema share its compiled grammar (and the byte steps it remembers)."""
    if p.regex is not None:
        return json_mode.JsonGuide(_regex(p.regex))
    if p.json_schema is not None:
        try:
            text = json.dumps(p.json_schema)
        except (TypeError, ValueError):  # (the Python API: a value JSON cannot hold)
            raise UserError("json_schema: the schema must be JSON values (objects, arrays, strings, numbers, "
                            "booleans, null)") from None
        return json_mode.JsonGuide(_schema(text))
    return json_mode.JsonGuide() if p.json_object else None


@functools.lru_cache(maxsize=16)
def _regex(pattern: str) -> regex_grammar.RegexGrammar:
    return regex_grammar.RegexGrammar(pattern)


@functools.lru_cache(maxsize=16)
def _schema(text: str) -> json_schema.SchemaGrammar:
    """(keyed by the schema's JSON text in its own key order: the properties' order is the schema's)"""
    return json_schema.SchemaGrammar(json.loads(text))


def guided_request(p) -> bool:
    """The request's tokens follow a guide (choices, JSON mode, a schema or a regex): each step needs
    the previous token on the host."""
    return bool(p.choices or p.json_object or p.json_schema is not None or p.regex is not None)
