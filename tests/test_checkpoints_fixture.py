"""Self-checks of tests/checkpoints.py: the tiny checkpoints have the layouts the engine tests rely
on, and the transformers reference is deterministic, not degenerate, and layout independent.

Does not test epinfer itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.checkpoints import FAMILIES, HYBRIDS, hf_generate, make_checkpoint, tiny_config

E, INTER, H = 8, 32, 64  # experts, expert intermediate size, hidden size of tiny_config
ARCH = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen3_next": "Qwen3NextForCausalLM",
        "qwen3_5_moe": "Qwen3_5MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
        "olmoe": "OlmoeForCausalLM", "mixtral": "MixtralForCausalLM"}
MODEL_TYPE = {**{f: f for f in FAMILIES}, "qwen3_5_moe": "qwen3_5_moe_text"}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def prompt(n: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_builds(family, ckpt_dir):
    path = ckpt_dir(family)
    cfg = read_config(path)
    assert cfg["vocab_size"] == 256 and cfg["hidden_size"] == H and cfg["num_hidden_layers"] == 4
    assert cfg["eos_token_id"] is None and cfg["tie_word_embeddings"] is False
    assert cfg["architectures"] == [ARCH[family]] and cfg["model_type"] == MODEL_TYPE[family]
    tensors = read_tensors(path)
    assert tensors["model.embed_tokens.weight"].shape == (256, H)
    assert tensors["lm_head.weight"].shape == (256, H)
    assert all(t.dtype == torch.float32 and t.isfinite().all() for t in tensors.values())
    assert not (path / "generation_config.json").exists()
    if family in HYBRIDS:  # both layer kinds are present
        assert "model.layers.0.linear_attn.A_log" in tensors
        assert "model.layers.1.self_attn.q_proj.weight" in tensors
        assert tensors["model.layers.1.self_attn.q_proj.weight"].shape == (2 * 4 * 16, H)  # + gate


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_layouts(family, ckpt_dir):
    per = read_tensors(ckpt_dir(family))
    fused = read_tensors(ckpt_dir(family, expert_layout="fused"))
    moe, (g, u, d) = "mlp", ("gate_proj", "up_proj", "down_proj")
    if family == "mixtral":
        moe, (g, u, d) = "block_sparse_moe", ("w1", "w3", "w2")
    for layer in range(4):
        p = f"model.layers.{layer}.{moe}"
        assert per[f"{p}.gate.weight"].shape == (E, H)
        gate_up = fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = fused[f"model.layers.{layer}.mlp.experts.down_proj"]
        assert gate_up.shape == (E, 2 * INTER, H) and down.shape == (E, H, INTER)
        for e in range(E):
            assert torch.equal(per[f"{p}.experts.{e}.{g}.weight"], gate_up[e, :INTER])
            assert torch.equal(per[f"{p}.experts.{e}.{u}.weight"], gate_up[e, INTER:])
            assert torch.equal(per[f"{p}.experts.{e}.{d}.weight"], down[e])
    assert not any(".experts.gate_up_proj" in k for k in per)
    assert not any("block_sparse_moe" in k for k in fused)
    assert not any(".experts.0." in k for k in fused)
    assert len(per) - len(fused) == 4 * (3 * E - 2)


def test_sharded_has_index(ckpt_dir):
    path = ckpt_dir("qwen3_5_moe", sharded=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2 and files == sorted(p.name for p in path.glob("*.safetensors"))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    tensors = read_tensors(path)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    single = read_tensors(ckpt_dir("qwen3_5_moe"))
    assert single.keys() == tensors.keys()
    assert all(torch.equal(single[k], tensors[k]) for k in single)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_styles(family, ckpt_dir):
    tf5, hub = read_config(ckpt_dir(family)), read_config(ckpt_dir(family, config_style="hub"))
    assert "rope_parameters" in tf5 and "rope_theta" not in tf5 and tf5["dtype"] == "float32"
    assert hub["torch_dtype"] == "float32" and "dtype" not in hub
    if family == "qwen3_5_moe":  # like the real Qwen3.5 config: rope_parameters stays a dict
        assert hub["rope_parameters"] == tf5["rope_parameters"]
    else:
        assert "rope_parameters" not in hub
        assert hub["rope_theta"] == tf5["rope_parameters"]["rope_theta"]
    if family in HYBRIDS:
        assert tf5["layer_types"] == ["linear_attention", "full_attention"] * 2
        assert "layer_types" not in hub and hub["full_attention_interval"] == 2
        assert tf5["rope_parameters"]["partial_rotary_factor"] == 0.25
    if family == "qwen3_next":
        assert hub["partial_rotary_factor"] == 0.25
    if family == "mixtral":
        assert tf5["num_local_experts"] == hub["num_local_experts"] == E
    elif family == "qwen3_moe":  # transformers 5 writes the attribute-mapped name
        assert tf5["num_local_experts"] == hub["num_experts"] == E and "num_experts" not in tf5
    else:
        assert tf5["num_experts"] == hub["num_experts"] == E


def test_multimodal_layout(ckpt_dir):
    text = read_tensors(ckpt_dir("qwen3_5_moe"))
    path = ckpt_dir("qwen3_5_moe", multimodal=True)
    cfg = read_config(path)
    assert cfg["architectures"] == ["Qwen3_5MoeForConditionalGeneration"]
    assert cfg["model_type"] == "qwen3_5_moe" and "vision_config" in cfg
    assert cfg["text_config"]["model_type"] == "qwen3_5_moe_text"
    assert cfg["text_config"]["hidden_size"] == H and "hidden_size" not in cfg
    tensors = read_tensors(path)
    lm = {k: v for k, v in tensors.items() if k.startswith("model.language_model.")}
    renamed = {k.replace("model.language_model.", "model."): v for k, v in lm.items()}
    assert set(renamed) | {"lm_head.weight"} == set(text)
    assert all(torch.equal(v, text[k]) for k, v in renamed.items())
    assert torch.equal(tensors["lm_head.weight"], text["lm_head.weight"])
    rest = set(tensors) - set(lm) - {"lm_head.weight"}
    assert any(k.startswith("model.visual.") for k in rest)
    assert any(k.startswith("mtp.") for k in rest)
    assert all(k.startswith(("model.visual.", "mtp.")) for k in rest)


def test_extra_tensors_generation_config_and_overrides(tmp_path):
    path = make_checkpoint("qwen3_moe", tmp_path / "x", extra_tensors={
        "model.layers.0.foo": torch.ones(3, 3)}, generation_config={"eos_token_id": 5},
        num_experts=6, num_hidden_layers=2)
    tensors = read_tensors(path)
    assert torch.equal(tensors["model.layers.0.foo"], torch.ones(3, 3))
    assert "model.layers.2.mlp.gate.weight" not in tensors
    assert tensors["model.layers.1.mlp.gate.weight"].shape == (6, H)
    assert json.loads((path / "generation_config.json").read_text()) == {"eos_token_id": 5}
    cfg = tiny_config("qwen3_5_moe", num_hidden_layers=3, rope_theta=5e5)
    assert cfg.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    assert cfg.rope_parameters["rope_theta"] == 5e5
    with pytest.raises(ValueError):
        make_checkpoint("llama", tmp_path / "y")
    with pytest.raises(ValueError):
        make_checkpoint("mixtral", tmp_path / "y", multimodal=True)
    with pytest.raises(ValueError):
        make_checkpoint("mixtral", tmp_path / "y", expert_layout="stacked")


def test_seed_changes_weights(tmp_path):
    a = read_tensors(make_checkpoint("olmoe", tmp_path / "a", seed=0))
    b = read_tensors(make_checkpoint("olmoe", tmp_path / "b", seed=0))
    c = read_tensors(make_checkpoint("olmoe", tmp_path / "c", seed=1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    # constant-initialised 1-D tensors got noise (see the module docstring of tests/checkpoints.py)
    assert a["model.layers.0.self_attn.q_norm.weight"].std() > 0.01


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_generate_deterministic_and_not_degenerate(family, ckpt_dir):
    path = ckpt_dir(family)
    tokens, logits = hf_generate(path, prompt(7), 32)
    again, logits2 = hf_generate(path, prompt(7), 32)
    assert tokens == again and torch.equal(logits, logits2)
    assert len(tokens) == 32 and all(0 <= t < 256 for t in tokens)
    assert logits.shape == (256,) and logits.dtype == torch.float32
    assert int(logits.argmax()) == tokens[-1]
    assert len(set(tokens)) >= 10, tokens  # ~20-30 seen
    assert logits.std() > 1.0  # well separated, not a flat distribution


@pytest.mark.parametrize("family", HYBRIDS)
def test_hf_generate_long_prompt_crosses_gdn_chunks(family, ckpt_dir):
    tokens, logits = hf_generate(ckpt_dir(family), prompt(140), 4)
    assert len(tokens) == 4 and logits.isfinite().all()
    shorter, _ = hf_generate(ckpt_dir(family), prompt(140)[:-1], 4)
    assert shorter != tokens  # the prompt is actually read


def test_reference_does_not_depend_on_layout(ckpt_dir):
    base = ckpt_dir("qwen3_5_moe")
    variants = [ckpt_dir("qwen3_5_moe", multimodal=True),
                ckpt_dir("qwen3_5_moe", expert_layout="fused", sharded=True, config_style="hub")]
    ref = hf_generate(base, prompt(70), 6)
    for path in variants:
        out = hf_generate(path, prompt(70), 6)
        assert out[0] == ref[0] and torch.equal(out[1], ref[1]), path
    mixtral = hf_generate(ckpt_dir("mixtral"), prompt(9), 6)
    other = ckpt_dir("mixtral", expert_layout="fused", config_style="hub")
    fused = hf_generate(other, prompt(9), 6)
    assert mixtral[0] == fused[0] and torch.equal(mixtral[1], fused[1])


def test_hf_generate_ignores_eos_of_generation_config(ckpt_dir, tmp_path):
    ref = hf_generate(ckpt_dir("qwen3_moe"), prompt(7), 12)
    with_eos = make_checkpoint("qwen3_moe", tmp_path / "eos",
                               generation_config={"eos_token_id": ref[0][3], "do_sample": False})
    out = hf_generate(with_eos, prompt(7), 12)
    assert out[0] == ref[0] and torch.equal(out[1], ref[1])
