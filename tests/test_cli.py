"""`epinfer generate`: output format and every bad input → one clear line, exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from epinfer.cli import main


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny(ckpt_dir):
    return ckpt_dir("qwen3_moe")


def test_output_json(tiny, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_token_ids": [1, 2, 3], "max_tokens": 4}) + "\n\n"
                       + json.dumps({"prompt_token_ids": [9, 8], "seed": 3, "temperature": 0.7}) + "\n")
    out_file = tmp_path / "out.json"
    code, _, err = run(["generate", "--model", str(tiny), "--prompts-file", str(prompts),
                        "--max-tokens", "6", "--ignore-eos", "--output", str(out_file),
                        "--dtype", "float32"], capsys)
    assert code == 0, err
    records = json.loads(out_file.read_text())
    assert [len(r["token_ids"]) for r in records] == [4, 6]
    assert records[0]["prompt_token_ids"] == [1, 2, 3]
    assert all(r["finish_reason"] == "length" and r["text"] is None for r in records)
    # penalties: a line's own, else the flags' (as for the other sampling fields)
    from epinfer import LLM, SamplingParams

    prompts.write_text(json.dumps({"prompt_token_ids": [9] * 6, "repetition_penalty": 1.5}) + "\n"
                       + json.dumps({"prompt_token_ids": [9] * 6}) + "\n"
                       + json.dumps({"prompt_token_ids": [9] * 6, "logit_bias": {"7": 100}}) + "\n")
    code, _, err = run(["generate", "--model", str(tiny), "--prompts-file", str(prompts), "--max-tokens", "8",
                        "--temperature", "0", "--ignore-eos", "--presence-penalty", "1.2", "--output", str(out_file),
                        "--dtype", "float32"], capsys)
    assert code == 0, err
    params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, presence_penalty=1.2, **extra)
              for extra in ({"repetition_penalty": 1.5}, {}, {"logit_bias": {7: 100}})]
    want = LLM(str(tiny), dtype="float32", device="cpu").generate([[9] * 6] * 3, params)
    got = [r["token_ids"] for r in json.loads(out_file.read_text())]
    assert got == [w.token_ids for w in want] and got[2][0] == 7
    # prompt logprobs: a line's own count, else the flag's; the engine's records, readable
    prompts.write_text(json.dumps({"prompt_token_ids": [4, 5, 6], "prompt_logprobs": 2}) + "\n"
                       + json.dumps({"prompt_token_ids": [7, 8], "allowed_token_ids": [11, 12]}) + "\n")
    code, _, err = run(["generate", "--model", str(tiny), "--prompts-file", str(prompts), "--max-tokens", "2",
                        "--prompt-logprobs", "0", "--output", str(out_file), "--dtype", "float32"], capsys)
    assert code == 0, err
    want = LLM(str(tiny), dtype="float32", device="cpu").generate(
        [[4, 5, 6], [7, 8]], [SamplingParams(max_tokens=2, prompt_logprobs=2),
                              SamplingParams(max_tokens=2, prompt_logprobs=0, allowed_token_ids=[11, 12])])
    got = [r["prompt_logprobs"] for r in json.loads(out_file.read_text())]
    assert got == [[r and {"logprob": r[0], "rank": r[1], "top": [list(t) for t in r[2]]} for r in w.prompt_logprobs]
                   for w in want]
    assert got[0][0] is None and len(got[0][2]["top"]) == 2 and got[1][1]["top"] == []
    assert set(json.loads(out_file.read_text())[1]["token_ids"]) <= {11, 12}


def corrupt(src, dst, fn):
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return dst


def bad_cases(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    arch = tmp_path / "arch"
    shutil.copytree(tiny, arch)
    cfg = json.loads((arch / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (arch / "config.json").write_text(json.dumps(cfg))
    quant = tmp_path / "quant"
    shutil.copytree(tiny, quant)
    cfg = json.loads((quant / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (quant / "config.json").write_text(json.dumps(cfg))
    unblocked = tmp_path / "fp8-unblocked"
    shutil.copytree(tiny, unblocked)
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (unblocked / "config.json").write_text(json.dumps(cfg))
    binonly = tmp_path / "bin"
    shutil.copytree(tiny, binonly)
    (binonly / "model.safetensors").rename(binonly / "pytorch_model.bin")
    first = "model.layers.0.self_attn.q_proj.weight"
    missing = corrupt(tiny, tmp_path / "missing", lambda t: t.pop(first))
    extra = corrupt(tiny, tmp_path / "extra", lambda t: t.update({"model.layers.0.foo": torch.zeros(2)}))
    shaped = corrupt(tiny, tmp_path / "shaped", lambda t: t.update({first: torch.zeros(3, 3)}))
    return [
        (["--model", str(tmp_path / "nope")], "does not exist"),
        (["--model", str(tmp_path / "empty")], "no config.json"),
        (["--model", str(arch)], "unsupported architecture"),
        (["--model", str(quant)], "quantized checkpoint (gptq) is not supported"),
        (["--model", str(unblocked)], "'quantization_config.weight_block_size' must be [rows, columns]"),
        (["--model", str(binonly)], "safetensors only"),
        (["--model", str(missing)], "missing tensors: " + first),
        (["--model", str(extra)], "unexpected tensor 'model.layers.0.foo'"),
        (["--model", str(shaped)], "shape (3, 3)"),
    ]


def test_bad_checkpoints(tiny, tmp_path, capsys):
    for extra_args, message in bad_cases(tiny, tmp_path):
        code, _, err = run(["generate", "--prompt", "hi", *extra_args], capsys)
        assert code == 2, (extra_args, err)
        assert message in err and err.startswith("epinfer: error: ") and err.count("\n") == 1, err


def test_bad_prompts(tiny, tmp_path, capsys):
    lines = {
        "empty": ('{"prompt_token_ids": []}', "empty"),
        "vocab": ('{"prompt_token_ids": [1, 999]}', "outside the vocabulary"),
        "stop": ('{"prompt_token_ids": [1], "stop_token_ids": [2, 999]}', "stop token id 999 is outside"),
        "penalty": ('{"prompt_token_ids": [1], "frequency_penalty": 2.5}', "frequency_penalty must be in [-2, 2]"),
        "min_p": ('{"prompt_token_ids": [1], "min_p": -0.1}', "min_p must be in [0, 1], got -0.1"),
        "prompt_logprobs": ('{"prompt_token_ids": [1], "prompt_logprobs": 21}', "prompt_logprobs must be an integer"),
        "json_mode": ('{"prompt_token_ids": [1], "json_object": true}', "JSON mode needs a tokenizer"),
        "guided": ('{"prompt_token_ids": [1], "guided_choice": ["a"]}', "guided choice needs a tokenizer"),
        "bad_words": ('{"prompt_token_ids": [1], "bad_words": ["x"]}', "bad_words need a tokenizer"),
        "truncate": ('{"prompt_token_ids": [1], "truncate_prompt_tokens": 0}', "truncate_prompt_tokens must"),
        "bias": ('{"prompt_token_ids": [1], "logit_bias": {"x": 1}}', "p.jsonl:2: logit_bias keys must be token ids"),
        "bias_vocab": ('{"prompt_token_ids": [1], "logit_bias": {"999": 1}}', "logit_bias token id 999 is outside"),
        "json": ('{"prompt_token_ids": [1, 2]', "p.jsonl:2: malformed JSON"),
        "field": ('{"prompt_token_ids": [1], "max_token": 3}', "unknown field(s) max_token"),
        "type": ('{"prompt_token_ids": [1], "max_tokens": "3"}', "'max_tokens' has the wrong type"),
        "both": ('{"prompt": "a", "prompt_token_ids": [1]}', "exactly one of"),
    }
    for name, (line, message) in lines.items():
        path = tmp_path / "p.jsonl"
        path.write_text('{"prompt_token_ids": [3]}\n' + line + "\n")
        code, _, err = run(["generate", "--model", str(tiny), "--prompts-file", str(path)], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (name, err)
    code, _, err = run(["generate", "--model", str(tiny), "--prompt", ""], capsys)
    assert code == 2 and "empty" in err
    code, _, err = run(["generate", "--model", str(tiny), "--prompt", "hi"], capsys)
    assert code == 2 and "no tokenizer" in err
    code, _, err = run(["generate", "--model", str(tiny), "--prompt", "x", "--temperature", "-1"], capsys)
    assert code == 2 and "temperature" in err


def test_no_traceback_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "epinfer", "generate", "--model", str(tmp_path / "x"),
                           "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "does not exist" in proc.stderr


def test_random_weights_need_only_a_config(tiny, tmp_path, capsys):
    shutil.copy(tiny / "config.json", tmp_path / "config.json")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_token_ids": [1, 2, 3]}) + "\n")
    base = ["generate", "--model", str(tmp_path), "--prompts-file", str(prompts), "--max-tokens", "3",
            "--ignore-eos", "--dtype", "float32", "--device", "cpu"]
    code, _, err = run(base, capsys)
    assert code == 2 and "epinfer: error:" in err  # no weights in the folder
    out_file = tmp_path / "out.json"
    code, _, err = run([*base, "--random-weights", "--output", str(out_file)], capsys)
    assert code == 0, err
    assert len(json.loads(out_file.read_text())[0]["token_ids"]) == 3


@pytest.mark.parametrize("argv,fragment", [
    (["generate", "--mamba-ssm-cache-dtype", "fp4"], "argument --mamba-ssm-cache-dtype: invalid choice: 'fp4'"),
    (["generate", "--max-num-batched-tokens", "many"], "argument --max-num-batched-tokens: invalid int value"),
    (["bench", "--shape", "qwen3-30b-a3b", "--quant", "int4"], "argument --quant: invalid choice: 'int4'"),
    (["serve", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),  # (the top parser's)
])
def test_bad_flag_is_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "usage:" not in err, err
    assert err.startswith(("epinfer: error: ", f"epinfer {argv[0]}: error: ")) and fragment in err, err


def test_environment_switches_checked_at_start(tiny, tmp_path, monkeypatch, capsys):
    """A switch that reads neither on nor off, or a number that is none, stops the run with one line
    before anything loads; a variable this version does not read gets one note (a misspelt switch
    would change nothing); every switch `Switches` reads is known, and the module's list names them."""
    import inspect
    import re

    from epinfer import LLM
    from epinfer.core import env
    from epinfer.core.errors import UserError

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_token_ids": [1, 2]}) + "\n")
    base = ["generate", "--model", str(tiny), "--prompts-file", str(prompts), "--max-tokens", "1", "--device", "cpu"]
    for name, value, fragment in (("EPINFER_PDL", "disable", "EPINFER_PDL='disable': give 1 or 0"),
                                  ("EPINFER_SYMM_MEM_BYTES", "1MB", "EPINFER_SYMM_MEM_BYTES='1MB': give a number")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            code, _, err = run(base, capsys)
            assert code == 2 and err.count("\n") == 1 and err.startswith(f"epinfer: error: {fragment}"), err
            with pytest.raises(UserError, match=fragment):
                LLM(str(tiny), device="cpu")
    monkeypatch.setenv("EPINFER_CUDNN_CHUNKS", "yes")
    monkeypatch.setenv("EPINFER_PDL", "")  # (empty: unset)
    monkeypatch.setenv("EPINFER_CUDNN_CHUNK", "1")
    monkeypatch.setattr(env, "_NOTED", set())
    code, _, err = run(base, capsys)
    assert code == 0 and err.count("EPINFER_CUDNN_CHUNK is not a variable this version reads") == 1, err
    read = set(re.findall(r'"(EPINFER_[A-Z0-9_]+)"', inspect.getsource(env.Switches)))
    assert read == set(env.KNOWN) == set(re.findall(r"EPINFER_[A-Z0-9_]+", env.__doc__))
