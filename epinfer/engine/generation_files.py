"""A checkpoint's text side: its tokenizer and its generation_config.json (sampling defaults and
end-of-sequence ids), each read as untrusted input (bounded regular files; a fault is one line)."""

from __future__ import annotations

from pathlib import Path

from epinfer.core.errors import UserError


def load_tokenizer(folder: Path):
    """The folder's tokenizer, or None when it has no tokenizer files. Every tokenizer file present
    must be a regular file inside the folder of bounded size (transformers would block on a FIFO and
    read any size); a tokenizer that cannot be built, or that encodes text to no tokens (e.g.
    tokenizer_config.json without tokenizer.json or a vocabulary), is a `UserError` here rather than
    an "empty prompt" later."""
    from epinfer.core.checkpoint_files import MAX_TOKENIZER_BYTES, folder_file, one_line

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    others = ("merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
              "chat_template.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.tiktoken")
    present = [n for n in (*names, *others) if folder_file(folder, n, max_bytes=MAX_TOKENIZER_BYTES) is not None]
    if not any(n in present for n in names):
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        # the engine checks a prompt against --max-model-len itself (a request error, not a log line
        # from transformers for every long prompt); nothing here truncates
        tokenizer.model_max_length = 1 << 62
        probe = tokenizer("Hello, world", add_special_tokens=False)["input_ids"]
    except Exception as exc:  # transformers raises many error types for broken tokenizer files
        raise UserError(f"cannot load the tokenizer in {folder}: {one_line(exc)}") from None
    if not probe:
        raise UserError(f"cannot load the tokenizer in {folder}: the tokenizer files present ({', '.join(present)}) "
                        f"do not form a usable tokenizer (it encodes text to no tokens; is tokenizer.json missing?)")
    return tokenizer


def load_generation_defaults(folder: Path) -> tuple[dict, tuple[int, ...] | None]:
    """Sampling defaults and eos ids of the folder's generation_config.json ({}, None without one).
    Each field used is checked: a wrong type or value is a `UserError` naming the file and the field."""
    from epinfer.core.checkpoint_files import JsonFields, folder_file, read_json_object, shown_path

    path = folder_file(folder, "generation_config.json")
    if path is None:
        return {}, None
    fields = JsonFields(read_json_object(path), shown_path(path))
    values = {"temperature": fields.number("temperature", None, lo=0.0), "top_k": fields.integer("top_k", None, lo=0),
              "top_p": fields.number("top_p", None, lo=0.0, hi=1.0, lo_open=True),
              "min_p": fields.number("min_p", None, lo=0.0, hi=1.0),
              "max_tokens": fields.integer("max_new_tokens", None, lo=1),  # (vLLM's default max_tokens too)
              "repetition_penalty": fields.number("repetition_penalty", None, lo=0.0, lo_open=True)}
    defaults = {k: v for k, v in values.items() if v is not None}
    if fields.flag("do_sample", None) is False:
        defaults["temperature"] = 0.0
    return defaults, fields.token_ids("eos_token_id")
