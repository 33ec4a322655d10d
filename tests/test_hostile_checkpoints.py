"""Hostile checkpoint folders: each gets exactly one `epinfer: error: ...` line naming the file and the
field, and exit code 2, from `epinfer generate` — never a traceback, a hang or an unbounded allocation.

Every folder is a copy of a valid tiny checkpoint (tests/checkpoints.py) with one thing broken:
config.json (types, values, relations, size, encoding, file kind), the shard index (types, names
outside the folder), the weight files (FIFO, directory, symlink out), generation_config.json and the
tokenizer files. Two seeded fuzz tests then mutate config.json and generation_config.json at random:
parsing either succeeds or raises a one-line `UserError`, nothing else.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epinfer.cli import main
from epinfer.core.checkpoint_files import MAX_JSON_BYTES
from epinfer.core.config import ModelConfig
from epinfer.core.errors import UserError
from epinfer.engine.engine import DEMO_MODEL
from epinfer.engine.generation_files import load_generation_defaults

NAN, INF = math.nan, math.inf
DROP = object()  # config_set value: remove the field
SHARD = "model-00002-of-00005.safetensors"  # one shard of the sharded tiny checkpoint
INDEX = "model.safetensors.index.json"


def edit_json(folder: Path, name: str, changes: dict) -> None:
    """Apply `changes` ({"a.b": value}, dotted keys reach into nested objects) to folder/name."""
    path = folder / name
    data = json.loads(path.read_text()) if path.exists() else {}
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        target = data
        for parent in parents:
            target = target[parent]
        if value is DROP:
            target.pop(key, None)
        else:
            target[key] = value
    path.write_text(json.dumps(data, allow_nan=True))


def config_set(changes: dict):
    return lambda folder: edit_json(folder, "config.json", changes)


def generation_set(changes: dict):
    return lambda folder: edit_json(folder, "generation_config.json", {"do_sample": True, **changes})


def write(name: str, data: bytes | str):
    def mutate(folder: Path) -> None:
        path = folder / name
        path.unlink()
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return mutate


def replace_with(name: str, kind: str):
    """folder/name becomes a FIFO, a directory, a symlink to a copy outside the folder, or a broken link."""
    def mutate(folder: Path) -> None:
        path = folder / name
        outside = folder.parent / f"outside-{folder.name}"
        outside.mkdir()
        if path.exists():
            shutil.copy(path, outside / name)
            path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "dir":
            path.mkdir()
        elif kind == "link-out":
            path.symlink_to(outside / name)
        else:
            path.symlink_to(folder / "no-such-file")
    return mutate


def index_set(weight_map):
    def mutate(folder: Path) -> None:
        (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return mutate


def index_naming(name: str):
    def mutate(folder: Path) -> None:
        index = json.loads((folder / INDEX).read_text())
        index["weight_map"]["lm_head.weight"] = name
        (folder / INDEX).write_text(json.dumps(index))
    return mutate


def tokenizer_config(content: dict | None):
    def mutate(folder: Path) -> None:
        if content is None:  # the demo model's, without its tokenizer.json
            shutil.copy(DEMO_MODEL / "tokenizer_config.json", folder)
        else:
            (folder / "tokenizer_config.json").write_text(json.dumps(content))
    return mutate


def weight_as(dtype):
    """model.safetensors with the embedding stored as `dtype` (an integer or unsupported float8 type)."""
    def mutate(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].to(dtype)
        save_file(tensors, folder / "model.safetensors")
    return mutate


def tensors_edit(edit, name: str = "model.safetensors"):
    """One safetensors file of the folder, its tensors changed by `edit(tensors)` in place."""
    def mutate(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / name)
        edit(tensors)
        save_file(tensors, folder / name)
    return mutate


def copy_as(source: str, name: str, shape=None):
    """`edit` for `tensors_edit`: tensor `name` added, a (zeroed, reshaped) copy of `source`."""
    def edit(tensors: dict) -> None:
        t = torch.zeros_like(tensors[source])
        tensors[name] = t if shape is None else t.flatten()[:math.prod(shape)].reshape(shape)
    return edit


def oversize(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["padding"] = "x" * MAX_JSON_BYTES
    (folder / "config.json").write_text(json.dumps(cfg))


M, H, S = "moe", "hybrid", "sharded"  # source checkpoints: qwen3_moe, qwen3_5_moe, qwen3_moe sharded
C, G, I = "config.json", "generation_config.json", INDEX  # noqa: E741 - file names the message must carry
LAYERS = ["linear_attention", "full_attention"] * 2
EX, GDN = "model.layers.0.mlp.experts", "model.layers.0.linear_attn"

# (id, source, mutation, strings the error line must contain)
CASES = [
    # config.json: sizes of the wrong type or out of range
    ("hidden-negative", M, config_set({"hidden_size": -4}), [C, "hidden_size"]),
    ("hidden-float", M, config_set({"hidden_size": 2.5}), [C, "hidden_size"]),
    ("hidden-string", M, config_set({"hidden_size": "64"}), [C, "hidden_size"]),
    ("hidden-bool", M, config_set({"hidden_size": True}), [C, "hidden_size"]),
    ("hidden-huge", M, config_set({"hidden_size": 10**9}), [C, "hidden_size"]),
    ("hidden-missing", M, config_set({"hidden_size": DROP}), [C, "hidden_size"]),
    ("layers-1e9", M, config_set({"num_hidden_layers": 10**9}), [C, "num_hidden_layers"]),
    ("layers-1e9-hybrid", H, config_set({"num_hidden_layers": 10**9, "layer_types": DROP}),
     [C, "num_hidden_layers"]),
    ("layers-zero", M, config_set({"num_hidden_layers": 0}), [C, "num_hidden_layers"]),
    ("heads-zero", M, config_set({"num_attention_heads": 0}), [C, "num_attention_heads"]),
    ("kv-heads-zero", M, config_set({"num_key_value_heads": 0}), [C, "num_key_value_heads"]),
    ("kv-heads-not-divisor", M, config_set({"num_key_value_heads": 3}), [C, "num_key_value_heads"]),
    ("kv-heads-above-heads", M, config_set({"num_key_value_heads": 8}), [C, "num_key_value_heads"]),
    ("vocab-huge", M, config_set({"vocab_size": 10**12}), [C, "vocab_size"]),
    ("vocab-null", M, config_set({"vocab_size": None}), [C, "vocab_size"]),
    ("head-dim-zero", M, config_set({"head_dim": 0}), [C, "head_dim"]),
    ("head-dim-odd", M, config_set({"head_dim": 15}), [C, "head_dim"]),
    ("hidden-not-multiple-of-heads", M, config_set({"head_dim": DROP, "hidden_size": 66}),
     [C, "hidden_size", "num_attention_heads"]),
    ("positions-negative", M, config_set({"max_position_embeddings": -1}), [C, "max_position_embeddings"]),
    # floats: NaN, Infinity, negative, strings
    ("eps-nan", M, config_set({"rms_norm_eps": NAN}), [C, "rms_norm_eps"]),
    ("eps-infinity", M, config_set({"rms_norm_eps": INF}), [C, "rms_norm_eps"]),
    ("eps-negative", M, config_set({"rms_norm_eps": -1e-6}), [C, "rms_norm_eps"]),
    ("eps-string", M, config_set({"rms_norm_eps": "1e-6"}), [C, "rms_norm_eps"]),
    ("theta-nan", M, config_set({"rope_parameters.rope_theta": NAN}), [C, "rope_parameters.rope_theta"]),
    ("theta-infinity", M, config_set({"rope_parameters.rope_theta": -INF}), [C, "rope_parameters.rope_theta"]),
    ("theta-zero", M, config_set({"rope_parameters.rope_theta": 0}), [C, "rope_parameters.rope_theta"]),
    ("rope-list", M, config_set({"rope_parameters": [1]}), [C, "rope_parameters"]),
    ("rope-yarn", M, config_set({"rope_parameters.rope_type": "yarn"}), [C, "rope_type", "yarn"]),
    ("rope-scaling-yarn-beside-parameters", M, config_set({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
     [C, "rope_scaling.rope_type", "yarn"]),
    ("partial-rotary-zero", H, config_set({"rope_parameters.partial_rotary_factor": 0}),
     [C, "partial_rotary_factor"]),
    ("partial-rotary-above-one", H, config_set({"rope_parameters.partial_rotary_factor": 1.5}),
     [C, "partial_rotary_factor"]),
    ("clip-negative", M, config_set({"clip_qkv": -1}), [C, "clip_qkv"]),
    # flags, strings and lists
    ("tie-string", M, config_set({"tie_word_embeddings": "yes"}), [C, "tie_word_embeddings"]),
    ("sliding-string", M, config_set({"use_sliding_window": "no"}), [C, "use_sliding_window"]),
    ("norm-topk-int", M, config_set({"norm_topk_prob": 1}), [C, "norm_topk_prob"]),
    ("dtype-int", M, config_set({"dtype": 5}), [C, "dtype"]),
    ("architectures-string", M, config_set({"architectures": "Qwen3MoeForCausalLM"}), [C, "architectures"]),
    ("text-config-int", M, config_set({"text_config": 5}), [C, "text_config"]),
    ("eos-string", M, config_set({"eos_token_id": "2"}), [C, "eos_token_id"]),
    ("eos-list-mixed", M, config_set({"eos_token_id": [1, "2"]}), [C, "eos_token_id"]),
    ("eos-negative", M, config_set({"eos_token_id": -1}), [C, "eos_token_id"]),
    ("mlp-only-string", M, config_set({"mlp_only_layers": "0"}), [C, "mlp_only_layers"]),
    ("mlp-only-floats", M, config_set({"mlp_only_layers": [0.5]}), [C, "mlp_only_layers"]),
    ("mlp-only-negative", M, config_set({"mlp_only_layers": [-1]}), [C, "mlp_only_layers"]),
    ("sparse-step-zero", M, config_set({"decoder_sparse_step": 0}), [C, "decoder_sparse_step"]),
    # experts
    ("top-k-zero", M, config_set({"num_experts_per_tok": 0}), [C, "num_experts_per_tok"]),
    ("top-k-above-experts", M, config_set({"num_experts_per_tok": 9}), [C, "num_experts_per_tok"]),
    ("top-k-string", M, config_set({"num_experts_per_tok": "2"}), [C, "num_experts_per_tok"]),
    ("experts-negative", M, config_set({"num_experts": -1}), [C, "num_experts"]),
    ("experts-huge", M, config_set({"num_local_experts": 10**6}), [C, "num_local_experts"]),
    ("expert-width-zero", M, config_set({"moe_intermediate_size": 0}), [C, "moe_intermediate_size"]),
    # hybrid layer kinds and linear attention
    ("layer-types-int", H, config_set({"layer_types": 5}), [C, "layer_types"]),
    ("layer-types-not-strings", H, config_set({"layer_types": ["linear_attention", 3, "x", "y"]}),
     [C, "layer_types"]),
    ("layer-types-length", H, config_set({"layer_types": LAYERS[:3]}), [C, "layer_types"]),
    ("layer-types-unknown", H, config_set({"layer_types": ["sliding_attention"] * 4}),
     [C, "layer_types", "sliding_attention"]),
    ("attention-interval-zero", H, config_set({"layer_types": DROP, "full_attention_interval": 0}),
     [C, "full_attention_interval"]),
    ("linear-key-heads-zero", H, config_set({"linear_num_key_heads": 0}), [C, "linear_num_key_heads"]),
    ("linear-key-heads-missing", H, config_set({"linear_num_key_heads": DROP}), [C, "linear_num_key_heads"]),
    ("linear-value-heads-not-multiple", H, config_set({"linear_num_value_heads": 3}),
     [C, "linear_num_value_heads", "linear_num_key_heads"]),
    ("linear-key-dim-negative", H, config_set({"linear_key_head_dim": -16}), [C, "linear_key_head_dim"]),
    ("linear-value-dim-string", H, config_set({"linear_value_head_dim": "16"}), [C, "linear_value_head_dim"]),
    ("conv-kernel-zero", H, config_set({"linear_conv_kernel_dim": 0}), [C, "linear_conv_kernel_dim"]),
    # the file itself
    ("config-top-level-list", M, write(C, "[1, 2]"), [C, "JSON object"]),
    ("config-not-utf8", M, write(C, b'{"hidden_size": "\xff\xfe"}'), [C, "UTF-8"]),
    ("config-not-json", M, write(C, '{"hidden_size": 64'), [C, "invalid JSON"]),
    ("config-nested-deep", M, write(C, "[" * 200_000 + "]" * 200_000), [C, "invalid JSON"]),
    ("config-oversize", M, oversize, [C, "16 MiB"]),
    ("config-fifo", M, replace_with(C, "fifo"), [C, "FIFO"]),
    ("config-directory", M, replace_with(C, "dir"), [C, "directory"]),
    ("config-link-out", M, replace_with(C, "link-out"), [C, "outside the model folder"]),
    # weight files and the shard index
    ("weights-fifo", M, replace_with("model.safetensors", "fifo"), ["model.safetensors", "FIFO"]),
    ("weights-directory", M, replace_with("model.safetensors", "dir"), ["model.safetensors", "directory"]),
    ("weights-link-out", M, replace_with("model.safetensors", "link-out"),
     ["model.safetensors", "outside the model folder"]),
    ("weights-broken-link", M, replace_with("model.safetensors", "broken"), ["model.safetensors", "broken"]),
    ("weights-int32", M, weight_as(torch.int32), ["model.embed_tokens.weight", "int32", "not a floating-point"]),
    ("weights-e5m2", M, weight_as(torch.float8_e5m2), ["model.embed_tokens.weight", "F8_E5M2", "not supported"]),
    # a weight twice (the later copy would silently win), a weight missing, tensors of special layouts
    # with the wrong rank
    ("duplicate-across-shards", S, tensors_edit(lambda t: t.update({"model.norm.weight": torch.ones(64)}), SHARD),
     ["model.norm.weight", "is in", SHARD]),
    ("duplicate-alias", M, tensors_edit(copy_as("model.embed_tokens.weight", "model.language_model.embed_tokens"
                                                ".weight")), ["both hold", "model.embed_tokens.weight"]),
    ("duplicate-expert-index", M, tensors_edit(copy_as(f"{EX}.1.down_proj.weight", f"{EX}.01.down_proj.weight")),
     ["both hold", f"{EX}.1.down_proj.weight"]),
    ("duplicate-fused-experts", M, tensors_edit(lambda t: t.update({f"{EX}.gate_up_proj": torch.zeros(8, 64, 64)})),
     ["both hold", f"{EX}.0.gate_proj.weight"]),
    ("missing-expert", M, tensors_edit(lambda t: t.pop(f"{EX}.3.up_proj.weight")),
     ["missing tensors", f"{EX}.3.up_proj.weight"]),
    ("gdn-tensor-without-gdn", M, tensors_edit(copy_as("model.norm.weight", f"{GDN}.in_proj_ba.weight", (4, 16))),
     ["unexpected tensor", "in_proj_ba"]),
    ("gdn-grouped-1d", H, tensors_edit(copy_as("model.norm.weight", f"{GDN}.in_proj_qkvz.weight")),
     ["in_proj_qkvz", "is not a matrix"]),
    ("weights-nan", M, tensors_edit(lambda t: t["model.layers.1.post_attention_layernorm.weight"].__setitem__(3, NAN)),
     ["model.layers.1.post_attention_layernorm.weight", "NaN or infinite"]),
    ("weights-inf-expert", M, tensors_edit(lambda t: t[f"{EX}.5.up_proj.weight"].__setitem__((1, 2), -INF)),
     [f"{EX}.5.up_proj.weight", "NaN or infinite"]),
    ("fused-experts-1d", M, tensors_edit(copy_as("model.norm.weight", f"{EX}.down_proj")),
     [f"{EX}.down_proj", "does not match"]),
    ("shard-fifo", S, replace_with(SHARD, "fifo"), [I, "weight_map", SHARD, "FIFO"]),
    ("shard-directory", S, replace_with(SHARD, "dir"), [I, "weight_map", SHARD, "directory"]),
    ("shard-link-out", S, replace_with(SHARD, "link-out"), [I, "weight_map", SHARD, "outside the model folder"]),
    ("index-names-parent", S, index_naming("../../etc/passwd"), [I, "weight_map", "../../etc/passwd", "outside"]),
    ("index-names-absolute", S, index_naming("/etc/passwd"), [I, "weight_map", "/etc/passwd"]),
    ("index-names-missing", S, index_naming("model-9.safetensors"), [I, "weight_map", "model-9.safetensors"]),
    ("index-map-list", S, index_set(["model-00001-of-00005.safetensors"]), [I, "weight_map"]),
    ("index-map-int-values", S, index_set({"lm_head.weight": 5}), [I, "weight_map"]),
    ("index-map-empty", S, index_set({}), [I, "weight_map"]),
    ("index-not-json", S, write(I, "{"), [I, "invalid JSON"]),
    ("index-not-utf8", S, write(I, b"\xff{}"), [I, "UTF-8"]),
    ("index-top-level-list", S, write(I, "[]"), [I, "JSON object"]),
    ("index-fifo", S, replace_with(I, "fifo"), [I, "FIFO"]),
    # generation_config.json
    ("gen-temperature-negative", M, generation_set({"temperature": -1}), [G, "temperature"]),
    ("gen-temperature-nan", M, generation_set({"temperature": NAN}), [G, "temperature"]),
    ("gen-temperature-string", M, generation_set({"temperature": "0.7"}), [G, "temperature"]),
    ("gen-top-p-zero", M, generation_set({"top_p": 0}), [G, "top_p"]),
    ("gen-top-p-above-one", M, generation_set({"top_p": 1.5}), [G, "top_p"]),
    ("gen-top-k-negative", M, generation_set({"top_k": -1}), [G, "top_k"]),
    ("gen-top-k-float", M, generation_set({"top_k": 2.5}), [G, "top_k"]),
    ("gen-top-k-bool", M, generation_set({"top_k": True}), [G, "top_k"]),
    ("gen-eos-string", M, generation_set({"eos_token_id": "2"}), [G, "eos_token_id"]),
    ("gen-eos-list-mixed", M, generation_set({"eos_token_id": [1, None]}), [G, "eos_token_id"]),
    ("gen-do-sample-string", M, generation_set({"do_sample": "false"}), [G, "do_sample"]),
    ("gen-top-level-list", M, lambda f: (f / G).write_text("[]"), [G, "JSON object"]),
    ("gen-not-utf8", M, lambda f: (f / G).write_bytes(b'{"top_k": "\xff"}'), [G, "UTF-8"]),
    ("gen-fifo", M, replace_with(G, "fifo"), [G, "FIFO"]),
    # tokenizer files
    ("tokenizer-json-missing", M, tokenizer_config(None), ["tokenizer"]),
    ("tokenizer-without-vocabulary", M, tokenizer_config({"tokenizer_class": "Qwen2Tokenizer"}),
     ["tokenizer", "usable"]),
    ("tokenizer-fifo", M, replace_with("tokenizer.json", "fifo"), ["tokenizer.json", "FIFO"]),
]


@pytest.fixture(scope="module")
def sources(ckpt_dir):
    return {M: ckpt_dir("qwen3_moe"), H: ckpt_dir("qwen3_5_moe"), S: ckpt_dir("qwen3_moe", sharded=True)}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text(json.dumps({"prompt_token_ids": [1, 2, 3]}) + "\n")
    return path


def generate(folder: Path, prompts: Path, capsys) -> tuple[int, str]:
    code = main(["generate", "--model", str(folder), "--prompts-file", str(prompts), "--dtype", "float32",
                 "--max-tokens", "2", "--device", "cpu"])
    return code, capsys.readouterr().err


def test_the_sources_are_valid(sources, prompts, capsys):
    """Each case breaks exactly one thing: unbroken, every source generates."""
    for folder in sources.values():
        code, err = generate(folder, prompts, capsys)
        assert code == 0, err


@pytest.mark.timeout(30)  # a FIFO opened for reading would block forever; a huge config would allocate
@pytest.mark.parametrize("source,mutate,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_folder_gets_one_line(source, mutate, needles, sources, prompts, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    shutil.copytree(sources[source], folder)
    mutate(folder)
    code, err = generate(folder, prompts, capsys)
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("epinfer: error: ") and "Traceback" not in err, err
    missing = [n for n in needles if n not in lines[0]]
    assert not missing, (missing, lines[0])


def test_hub_cache_snapshot_links_are_followed(sources, prompts, tmp_path, capsys):
    """The Hugging Face hub cache keeps each file of snapshots/<revision>/ as a link to
    ../../blobs/<hash>: those links leave the folder but stay in the cache, and are allowed."""
    repo = tmp_path / "models--org--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(sources[S].iterdir())):
        shutil.copy(file, blobs / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob{i}")
    code, err = generate(snapshot, prompts, capsys)
    assert code == 0, err


@pytest.mark.timeout(30)
def test_huge_sizes_within_the_caps_stop_at_the_memory_check(sources, prompts, tmp_path, capsys):
    """Every size at its cap: refused from the sizes alone, before any per-layer structure exists."""
    folder = tmp_path / "ckpt"
    shutil.copytree(sources[M], folder)
    config_set({"num_hidden_layers": 1024, "hidden_size": 1 << 16, "num_local_experts": 1 << 14,
                "moe_intermediate_size": 1 << 20})(folder)
    code, err = generate(folder, prompts, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("epinfer: error: the weights need "), err


@pytest.mark.timeout(120)
def test_a_real_process_prints_one_line(sources, prompts, tmp_path):
    """Outside pytest's capture too (library warnings, logging): one line, exit 2."""
    folder = tmp_path / "ckpt"
    shutil.copytree(sources[M], folder)
    tokenizer_config(None)(folder)
    proc = subprocess.run([sys.executable, "-m", "epinfer", "generate", "--model", str(folder), "--prompts-file",
                           str(prompts), "--dtype", "float32", "--device", "cpu"],
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("epinfer: error: cannot load the tokenizer")


FUZZ_VALUES = [None, True, False, 0, 1, 2, 3, 7, -1, -(10**9), 10**9, 2**63, 10**30, 0.0, 0.5, 2.5, -0.5, 1e-300,
               1e300, NAN, INF, -INF, "", "64", "x", [], [1, 2], ["linear_attention"], [None], {}, {"rope_type": "x"}]


def mutated_json(rng: random.Random, base: dict, extra_keys: list[str]) -> bytes:
    """`base` with 1-3 fields (or nested fields) replaced or removed, or its bytes flipped at random."""
    if rng.random() < 0.2:
        data = bytearray(json.dumps(base).encode())
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    data = json.loads(json.dumps(base))
    for _ in range(rng.randint(1, 3)):
        target = data
        nested = [k for k, v in data.items() if isinstance(v, dict)]
        if nested and rng.random() < 0.2:
            target = data[rng.choice(nested)]
        key = rng.choice(sorted(target) + extra_keys)
        if rng.random() < 0.1:
            target.pop(key, None)
        else:
            target[key] = rng.choice(FUZZ_VALUES)
    return json.dumps(data, allow_nan=True).encode()


def check_one_line(call) -> object:
    try:
        return call()
    except UserError as exc:
        message = str(exc)
        assert message and "\n" not in message and len(message) < 1000, message
        return None


@pytest.mark.timeout(120)
def test_fuzzed_config_parses_or_fails_in_one_line(sources, tmp_path):
    rng = random.Random(4321)
    bases = [json.loads((sources[s] / "config.json").read_text()) for s in (M, H)]
    extra = ["head_dim", "layer_types", "mlp_only_layers", "decoder_sparse_step", "full_attention_interval",
             "clip_qkv", "text_config", "rope_scaling", "num_experts", "torch_dtype", "quantization_config"]
    (tmp_path / "config.json").write_text("{}")
    parsed = 0
    for _ in range(150):
        (tmp_path / "config.json").write_bytes(mutated_json(rng, rng.choice(bases), extra))
        cfg = check_one_line(lambda: ModelConfig.from_dir(tmp_path))
        if cfg is None:
            continue
        parsed += 1
        # what the layers rely on holds for every config that parses
        assert len(cfg.layer_types) == len(cfg.mlp_types) == cfg.num_layers <= 1024
        assert cfg.num_heads % cfg.num_kv_heads == 0 and cfg.rotary_dim >= 2 and cfg.rotary_dim % 2 == 0
        assert "moe" not in cfg.mlp_types or 1 <= cfg.top_k <= cfg.num_experts
        assert math.isfinite(cfg.rms_norm_eps) and math.isfinite(cfg.rope_theta)
        assert 0 <= cfg.weight_count_floor() < 2**62  # the size check's input: cheap and bounded
    assert 10 < parsed < 150  # both outcomes happen


@pytest.mark.timeout(60)
def test_fuzzed_generation_config_loads_or_fails_in_one_line(tmp_path):
    from epinfer.core.sampling_params import SamplingParams

    rng = random.Random(4321)
    base = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "eos_token_id": [1, 2]}
    loaded = 0
    for _ in range(150):
        (tmp_path / "generation_config.json").write_bytes(mutated_json(rng, base, []))
        result = check_one_line(lambda: load_generation_defaults(tmp_path))
        if result is None:
            continue
        loaded += 1
        defaults, eos = result
        SamplingParams().resolved(defaults)  # defaults that load are valid sampling parameters
        assert eos is None or all(isinstance(t, int) and t >= 0 for t in eos)
    assert 10 < loaded < 150
