"""The server's text units (no processes): stop-string hold-back (`StopTail`), streamed deltas,
the chat template's rendering and its time limit, and the bytes of chat logprobs."""

from __future__ import annotations

import sys
import time

import pytest

from epinfer import LLM
from epinfer.server.protocol import chat_prompt_ids
from epinfer.server.text import StopTail, TextStream, token_bytes, token_text


@pytest.fixture(scope="module")
def demo_llm():
    return LLM()


def test_stop_tail_matches_the_plain_definition():
    """`StopTail`, fed a growing text piece by piece, against the definition (the longest suffix of
    the text that is a proper prefix of the stop string), on random texts over a small alphabet
    (borders, repeats and whole matches are common there)."""
    import random

    rng = random.Random(5)
    for _ in range(400):
        stop = "".join(rng.choice("ab") for _ in range(rng.randint(1, 7)))
        text, tail = "", StopTail(stop)
        for _ in range(rng.randint(1, 6)):
            text += "".join(rng.choice("abc") for _ in range(rng.randint(0, 5)))
            want = max((n for n in range(len(stop)) if text.endswith(stop[:n])), default=0)
            assert tail.feed(text) == want, (stop, text)


def test_stream_holds_back_stop_prefixes(demo_llm):
    tok = demo_llm.tokenizer
    ids = tok("Beautiful is better than ugly.\nExplicit is", add_special_tokens=False)["input_ids"]
    stop = "ugly.\nEx"
    stream, snapshots = TextStream(tok, [stop]), []
    for i, t in enumerate(ids):  # token by token, stopping where the engine would
        stream.add([t])
        so_far = tok.decode(ids[: i + 1], skip_special_tokens=True)
        if stop in so_far:
            final = so_far[: so_far.find(stop)]
            snapshots.append(snapshots[-1] + stream.delta(final=True, stop_end=so_far.find(stop)))
            break
        snapshots.append((snapshots[-1] if snapshots else "") + stream.delta(final=False))
    assert snapshots[-1] == final == "Beautiful is better than "
    assert all(final.startswith(s) for s in snapshots)  # nothing sent is ever taken back
    assert any(len(s) < len(final) and final.startswith(s + "u") for s in snapshots)  # "u" was held back


def test_stream_deltas_concatenate_to_the_full_text(demo_llm):
    """Incremental detokenization: random token sequences (byte tokens too, so split and invalid
    UTF-8 sequences) streamed a token at a time give exactly the full decode, and each sent text
    is a prefix of the final one."""
    import random

    tok = demo_llm.tokenizer
    rng = random.Random(7)
    for n in (1, 5, 40, 200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(n)]
        stream, text = TextStream(tok, ["\n\n"]), ""
        for i, t in enumerate(ids):
            stream.add([t])
            text += stream.delta(final=i == len(ids) - 1)
        assert text == tok.decode(ids, skip_special_tokens=True)


def test_chat_template_renders_chatml(demo_llm):
    tok = demo_llm.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = chat_prompt_ids(tok, text)
    assert tok.convert_ids_to_tokens(ids[0]) == "<|im_start|>" and tok.decode(ids) == text


def test_token_bytes_join_into_split_characters(demo_llm):
    """Chat logprobs' `bytes`: a character split over tokens (each decodes to U+FFFD alone) comes
    back whole from the tokens' bytes joined, as OpenAI's field means."""
    tok = demo_llm.tokenizer
    text = "é ڃ 😀 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert "\ufffd" in token_text(tok, ids[0])  # (split: the test means something)
    assert bytes(b for t in ids for b in token_bytes(tok, t, token_text(tok, t))).decode() == text


def test_a_looping_chat_template_is_cut_off(demo_llm, monkeypatch):
    """A template's render is bounded (its compiled Python traced): a loop that would run for hours
    is a 500 for that request, and a start-up warning, after TEMPLATE_SECONDS."""
    import copy

    from epinfer.server import protocol

    monkeypatch.setattr(protocol, "TEMPLATE_SECONDS", 1)
    tok = copy.deepcopy(demo_llm.tokenizer)
    tok.chat_template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}hi"
    t0, tracing = time.time(), sys.gettrace()
    assert "did not render within 1 s" in protocol.chat_template_problem(tok)
    with pytest.raises(protocol.APIError) as err:
        protocol._chat_ids({"messages": [{"role": "user", "content": "hi"}]}, tok)
    assert err.value.status == 500 and "did not render these messages within 1 s" in str(err.value)
    assert time.time() - t0 < 10 and sys.gettrace() is tracing  # (the trace is gone after the render)
    assert protocol.chat_template_problem(demo_llm.tokenizer) is None


def test_stream_of_replacement_characters_is_not_held_back(demo_llm):
    """Text that itself ends in U+FFFD (the model writes the character, or bytes that are no UTF-8)
    streams as it comes, each update decoding a short window: it used to wait for the end, every
    update decoding the whole output again (O(n^2) on the server's event loop)."""
    tok = demo_llm.tokenizer
    decoded = []

    class Counting:
        def decode(self, ids, **kwargs):
            decoded.append(len(ids))
            return tok.decode(ids, **kwargs)

    for text in ("a" + "\ufffd" * 400, "\ufffd" * 300 + "b", "x\ufffd" * 150):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        stream, sent, early = TextStream(Counting(), []), "", 0
        decoded.clear()
        for i, t in enumerate(ids):
            stream.add([t])
            sent += stream.delta(final=i == len(ids) - 1)
            early = early or (len(sent) > len(text) // 2 and i < len(ids) - 1)
        assert sent == tok.decode(ids, skip_special_tokens=True) == text
        assert early  # most of the text went out before the last token
        assert sum(decoded) < 60 * len(ids), sum(decoded)  # O(n), not O(n^2)


def test_chat_template_flag(tmp_path):
    """serve --chat-template: a file or the template itself replaces the tokenizer's; chat requests
    (and /tokenize) render with it."""
    from epinfer.engine.engine import DEMO_MODEL
    from epinfer.engine.generation_files import load_tokenizer
    from epinfer.server.main import set_chat_template
    from epinfer.server.protocol import ModelInfo, parse_tokenize

    tok = load_tokenizer(DEMO_MODEL)
    info = ModelInfo("m", 1024, tok.vocab_size, {})
    messages = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    for given in (template, str(tmp_path / "t.jinja")):
        set_chat_template(tok, given)
        ids = parse_tokenize({**messages, "add_generation_prompt": False}, tok, info)["tokens"]
        assert tok.decode(ids) == "<user>hi<assistant>yo"


def test_a_long_prompt_leaves_no_tokenizer_warning(capfd):
    """A prompt longer than the tokenizer's model_max_length is the engine's to refuse (one request
    error); transformers' own warning about it would land in the server's log for every such prompt."""
    from epinfer.engine.engine import DEMO_MODEL
    from epinfer.engine.generation_files import load_tokenizer

    capfd.readouterr()
    ids = load_tokenizer(DEMO_MODEL)("hello " * 3000)["input_ids"]
    assert len(ids) > 2048
    assert "Token indices sequence length" not in "".join(capfd.readouterr()), "transformers warned"
