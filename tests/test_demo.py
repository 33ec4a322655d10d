"""The shipped demo model: recites the Zen of Python, through the API and the CLI; stop strings
and EOS on a real tokenizer."""

from __future__ import annotations

import codecs
import json
import this

import pytest

from epinfer import LLM, SamplingParams
from epinfer.cli import main

ZEN = codecs.decode(this.s, "rot13")


@pytest.fixture(scope="module")
def demo():
    return LLM()  # the shipped demo model is the default


def test_recites_the_next_lines(demo):
    out = demo.generate("Beautiful is better than", SamplingParams(max_tokens=40))[0]
    assert out.text.startswith(" ugly.\nExplicit is better than implicit.\nSimple is better than complex.")
    assert out.finish_reason == "length"


def test_stops_at_eos_after_the_last_line(demo):
    out = demo.generate("Namespaces are one", SamplingParams(max_tokens=40))[0]
    assert out.text == " honking great idea -- let's do more of those!"
    assert out.finish_reason == "stop" and out.token_ids[-1] in demo.engine.eos_ids


def test_stop_string_cuts_the_text(demo):
    out = demo.generate("Beautiful is better than", SamplingParams(max_tokens=40, stop=["\n"]))[0]
    assert out.text == " ugly." and out.finish_reason == "stop"


def test_generation_config_makes_greedy_the_default(demo):
    # no temperature given: the demo's generation_config.json (do_sample false) applies
    runs = [demo.generate("Flat is better", SamplingParams(max_tokens=12))[0].text for _ in range(2)]
    assert runs[0] == runs[1]
    assert ZEN.split("Flat is better", 1)[1].startswith(runs[0])


def test_cli_demo(tmp_path, capsys):
    out = tmp_path / "o.json"
    assert main(["generate", "--prompt", "Errors should never", "--max-tokens", "8",
                 "--output", str(out)]) == 0
    record = json.loads(out.read_text())[0]
    assert record["text"].startswith(" pass silently.")
    assert record["finish_reason"] == "length" and len(record["token_ids"]) == 8
