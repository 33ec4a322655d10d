"""Tiny random Hugging Face MoE checkpoints and transformers reference generations, for tests.

What it does:
  * ``tiny_config`` builds a small float32 transformers config for each family in ``FAMILIES``.
  * ``make_checkpoint`` instantiates the transformers model from that config with a fixed seed and
    writes it to a folder with safetensors, in the on-disk layouts an engine meets in practice:
    per-expert or fused expert tensors, one file or several shards with an index, the transformers 5
    ``config.json`` or the older hub one, and (qwen3_5_moe) the multimodal wrapper layout.
  * ``hf_generate`` loads such a folder with transformers and returns its greedy tokens and the
    logits of the last generation step: the reference an engine is compared against.

What it does not: no tokenizer is written, no network is used (``from_pretrained`` is only called on
local folders written here), nothing runs off CPU, and the weights are random, so the outputs mean
nothing beyond "the engine computes the same function as transformers".

Two changes to the seeded transformers init (both deterministic, both in ``_build_model``):
  * every 1-D parameter (norm weights, biases, ``dt_bias``; not ``A_log``) gets a little Gaussian
    noise. transformers initialises those to constants (ones, zeros), so without it an engine that
    swaps q_norm/k_norm, mixes up the two layer norms or drops a bias could still match.
  * embed_tokens x4, q_proj/k_proj x3, routed experts (gate_up x2, down x4), lm_head x4
    (``_SCALES``). With the plain std-0.05 init the attention of the families without q/k norm
    is nearly uniform, the routed experts add almost nothing to the residual stream, and greedy
    decoding falls into one or two repeated tokens (qwen2_moe / mixtral: 1-5 distinct tokens out
    of 32); the logits (std ~0.4) also have tiny top-2 gaps. After the scaling every family gives
    ~20-30 distinct tokens out of 32 for prompts of 1-133 tokens, the continuation depends on the
    prompt and on the experts / shared expert, and the logit std is ~1.6.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("EPINFER_TEST_HIDE_FLA"):  # before transformers looks for it: its torch path
    sys.modules["fla"] = None  # type: ignore[assignment]

import torch
import transformers
from safetensors.torch import save_file

FAMILIES = ("qwen3_moe", "qwen3_next", "qwen3_5_moe", "qwen2_moe", "olmoe", "mixtral")
HYBRIDS = ("qwen3_next", "qwen3_5_moe")

# family -> (config class, causal LM class), both looked up on `transformers`
_CLASSES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
}

# rope_theta of the real hub checkpoints (Qwen3-30B-A3B, Qwen3-Next-80B-A3B, Qwen3.5-35B-A3B,
# Qwen1.5-MoE-A2.7B, OLMoE-1B-7B, Mixtral-8x7B), so a loader that ignores it gets caught
_ROPE_THETA = {"qwen3_moe": 1e6, "qwen3_next": 1e7, "qwen3_5_moe": 1e7, "qwen2_moe": 1e6,
               "olmoe": 1e4, "mixtral": 1e6}
FULL_ATTENTION_INTERVAL = 2  # hybrids: layers 1, 3, ... are full attention, the others GDN
NOISE_1D = 0.1  # std of the noise added to 1-D parameters, see the module docstring
_SCALES = {"embed_tokens.weight": 4.0, "self_attn.q_proj.weight": 3.0,
           "self_attn.k_proj.weight": 3.0, "mlp.experts.gate_up_proj": 2.0,
           "mlp.experts.down_proj": 4.0, "lm_head.weight": 4.0}  # by name suffix, fused names
SHARD_BYTES = 256 * 1024  # sharded=True: max bytes per shard (the tiny models are ~1.2 MB)


def tiny_config(family: str, **overrides) -> transformers.PretrainedConfig:
    """A tiny float32 config of `family`; `overrides` are applied last.

    `rope_theta` / `partial_rotary_factor` overrides are folded into `rope_parameters`; for the
    hybrids `layer_types` follows `num_hidden_layers` unless it is overridden too."""
    _check_family(family)
    kw: dict = dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts_per_tok=2, initializer_range=0.05,
        rms_norm_eps=1e-6, max_position_embeddings=512, eos_token_id=None, bos_token_id=None,
        pad_token_id=None, tie_word_embeddings=False, dtype="float32",
    )
    rope: dict = {"rope_type": "default", "rope_theta": _ROPE_THETA[family]}
    if family == "mixtral":
        kw.update(num_local_experts=8, intermediate_size=32)
    elif family == "olmoe":
        kw.update(num_experts=8, intermediate_size=32)
    else:
        kw.update(num_experts=8, moe_intermediate_size=32)
        if family != "qwen3_5_moe":
            kw.update(intermediate_size=128)  # dense MLP size, unused (every layer is MoE)
    if family == "qwen3_moe":
        kw.update(norm_topk_prob=True)
    if family == "qwen2_moe":
        # qkv_bias=True and norm_topk_prob=False are the config defaults
        kw.update(shared_expert_intermediate_size=32)
    if family in HYBRIDS:
        kw.update(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                  linear_value_head_dim=16, linear_conv_kernel_dim=4,
                  shared_expert_intermediate_size=32)
        rope["partial_rotary_factor"] = 0.25
    if family == "qwen3_5_moe":
        # multimodal rope sections as in the real config, scaled to the 2 rotary frequencies of
        # head_dim 16 * 0.25; with text-only positions (t == h == w) they change nothing
        rope.update(mrope_section=[1, 1, 0], mrope_interleaved=True)
    overrides = dict(overrides)
    for name in ("rope_theta", "partial_rotary_factor"):
        if name in overrides:
            rope[name] = overrides.pop(name)
    kw["rope_parameters"] = rope
    kw.update(overrides)
    if family in HYBRIDS and "layer_types" not in overrides:
        kw["layer_types"] = _hybrid_layer_types(kw["num_hidden_layers"])
    config_cls = getattr(transformers, _CLASSES[family][0])
    config = config_cls(**kw)
    config.architectures = [_CLASSES[family][1]]
    return config


def make_checkpoint(family: str, path, *, seed: int = 0, expert_layout: str = "per_expert",
                    sharded: bool = False, config_style: str = "tf5", multimodal: bool = False,
                    extra_tensors: dict | None = None, generation_config: dict | None = None,
                    fp8_block: tuple[int, int] | None = None, **config_overrides) -> Path:
    """Build the seeded random transformers model of `family` and write it to folder `path`.

    expert_layout: "per_expert" (hub: ``mlp.experts.{e}.gate_proj.weight``; mixtral
    ``block_sparse_moe.experts.{e}.w1.weight``) or "fused" (transformers 5 in-memory:
    ``mlp.experts.gate_up_proj`` [E, 2I, H] and ``mlp.experts.down_proj`` [E, H, I]).
    sharded: several ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
    config_style: "tf5" (config.json as transformers 5 writes it) or "hub" (the older hub style).
    multimodal (qwen3_5_moe only): the Qwen3_5MoeForConditionalGeneration layout, with dummy
    ``model.visual.*`` and ``mtp.*`` tensors that an engine must skip.
    extra_tensors: added to the saved tensors under their given names.
    generation_config: written as generation_config.json when given.
    fp8_block: an FP8 checkpoint as Qwen publishes them (projection and expert weights float8_e4m3fn
    with float32 ``<name>_scale_inv`` per block of this size, quantization_config in config.json);
    the same weights dequantised go to ``dequantized/`` inside the folder (transformers' reference).
    Returns the folder as a Path."""
    _check_family(family)
    if expert_layout not in ("per_expert", "fused"):
        raise ValueError(f"expert_layout must be 'per_expert' or 'fused', not {expert_layout!r}")
    if config_style not in ("tf5", "hub"):
        raise ValueError(f"config_style must be 'tf5' or 'hub', not {config_style!r}")
    if multimodal and family != "qwen3_5_moe":
        raise ValueError("multimodal=True is only for qwen3_5_moe")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(family, **config_overrides)
    model = _build_model(family, config, seed)
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if expert_layout == "per_expert":
        tensors = _unfuse_experts(tensors, mixtral=family == "mixtral")
    config_dict = _config_dict(config)
    if config_style == "hub":
        config_dict = _hub_config(family, config_dict)
    if multimodal:
        tensors, config_dict = _wrap_multimodal(tensors, config_dict, seed)
    for name, tensor in (extra_tensors or {}).items():
        tensors[name] = tensor.detach().clone().contiguous()
    if fp8_block is not None:
        tensors, plain = quantize_fp8(tensors, fp8_block)
        ref = path / "dequantized"
        ref.mkdir(exist_ok=True)
        _write_json(ref / "config.json", config_dict)
        _write_safetensors(ref, plain, False)
        config_dict = {**config_dict, "quantization_config": {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": list(fp8_block), "modules_to_not_convert": ["lm_head"]}}
    _write_json(path / "config.json", config_dict)
    if generation_config is not None:
        _write_json(path / "generation_config.json", generation_config)
    _write_safetensors(path, tensors, sharded)
    return path


_FP8_WEIGHT = re.compile(r"(proj\.weight|experts\.(gate_up_proj|down_proj)|\.w[123]\.weight)$")
FP8_MAX = 448.0  # largest float8_e4m3fn value


def quantize_fp8(tensors: dict[str, torch.Tensor], block: tuple[int, int]):
    """(FP8 tensors with their block scales, the same weights dequantised) — scale = block amax / 448,
    edge blocks partial; dequantised exactly as the format defines: fp8 x scale, in float32."""
    quantized, plain = {}, {}
    for name, t in tensors.items():
        if t.dim() < 2 or not _FP8_WEIGHT.search(name):
            quantized[name] = plain[name] = t
            continue
        rows, cols = t.shape[-2:]
        br, bc = block
        pr, pc = -(-rows // br) * br, -(-cols // bc) * bc
        padded = torch.nn.functional.pad(t.float(), (0, pc - cols, 0, pr - rows))
        blocks = padded.reshape(*t.shape[:-2], pr // br, br, pc // bc, bc)
        scale = (blocks.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp(min=1e-12)  # [..., rows/br, cols/bc]
        full = scale.repeat_interleave(br, -2)[..., :rows, :].repeat_interleave(bc, -1)[..., :cols]
        q = (t.float() / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        quantized[name], quantized[name + "_scale_inv"] = q.contiguous(), scale.contiguous()
        plain[name] = (q.float() * full).to(t.dtype).contiguous()
    return quantized, plain


_MODELS: dict[str, torch.nn.Module] = {}


def hf_generate(path, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy transformers generation for one prompt (batch 1, no padding, never stops early).

    Returns (the generated ids only, the raw logits of the last generation step as a float32 1-D
    tensor of size vocab). The loaded model is cached per folder. Where fla is installed (GPU
    machines), transformers would run its gated-delta-rule layers through fla's Triton kernels,
    which take no CPU tensors: the generation then runs in a child process without fla."""
    return hf_generate_all(path, [prompt_ids], max_new_tokens)[0]


def hf_generate_all(path, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[list[int], torch.Tensor]]:
    """`hf_generate` for each prompt (one child process for all of them where fla is installed)."""
    if importlib.util.find_spec("fla") is not None:
        return _generate_without_fla(path, prompts, max_new_tokens)
    model = _load(path)
    return [_generate(model, p, max_new_tokens) for p in prompts]


def _generate(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    gen = transformers.GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
        eos_token_id=None, bos_token_id=None, pad_token_id=None,
        temperature=None, top_p=None, top_k=None, return_dict_in_generate=True, output_logits=True,
    )
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    if len(tokens) != max_new_tokens:
        raise RuntimeError(f"transformers generated {len(tokens)} tokens, not {max_new_tokens}")
    return tokens, out.logits[-1][0].detach().float().clone()


def _generate_without_fla(path, prompts: list[list[int]], max_new_tokens: int) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.pt"
        code = ("import sys, torch; from tests.checkpoints import hf_generate_all; "
                f"torch.save(hf_generate_all(sys.argv[1], {[list(p) for p in prompts]!r}, {max_new_tokens}), "
                "sys.argv[2])")
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "EPINFER_TEST_HIDE_FLA": "1", "CUDA_VISIBLE_DEVICES": "",
               "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, "-c", code, str(path), str(out)], check=True, env=env, cwd=root,
                       timeout=900)
        return torch.load(out)


def _load(path) -> torch.nn.Module:
    key = str(Path(path).resolve())
    if key not in _MODELS:
        # for the multimodal layout AutoModelForCausalLM picks Qwen3_5MoeForCausalLM, reads
        # text_config and strips `model.language_model.`; model.visual.* / mtp.* are ignored
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            key, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
        if bad:  # transformers would run with random weights there: the reference would be wrong
            raise RuntimeError(f"transformers could not load {key} fully: {bad}")
        with torch.no_grad():  # own, aligned memory: mmapped safetensors views sit at offsets
            for t in [*model.parameters(), *model.buffers()]:  # that vary with the file layout,
                t.data = t.data.clone()  # and CPU matmuls round differently (~1e-6) by alignment
        # forget generation_config.json: an eos id there would be merged into every generate
        # call, and min_new_tokens would then mask it, changing the greedy tokens
        model.generation_config = transformers.GenerationConfig()
        _MODELS[key] = model.float().eval()
    return _MODELS[key]


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _hybrid_layer_types(num_layers: int) -> list[str]:
    return ["full_attention" if (i + 1) % FULL_ATTENTION_INTERVAL == 0 else "linear_attention"
            for i in range(num_layers)]


def _build_model(family: str, config, seed: int) -> torch.nn.Module:
    model_cls = getattr(transformers, _CLASSES[family][1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).float().eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() == 1 and not name.endswith("A_log"):
                    param.add_(torch.randn_like(param) * NOISE_1D)
                for suffix, factor in _SCALES.items():
                    if name.endswith(suffix):
                        param.mul_(factor)
    return model


def _unfuse_experts(tensors: dict[str, torch.Tensor], *, mixtral: bool) -> dict[str, torch.Tensor]:
    """transformers 5 fused experts -> the per-expert hub layout (as save_original_format=True)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if mixtral:
            name = name.replace(".mlp.", ".block_sparse_moe.")
        m = re.fullmatch(r"(.*\.experts)\.(gate_up_proj|down_proj)", name)
        if m is None:
            out[name] = t
            continue
        prefix, kind = m.groups()
        for e in range(t.shape[0]):
            if kind == "down_proj":
                out[f"{prefix}.{e}.{'w2' if mixtral else 'down_proj'}.weight"] = t[e].clone()
            else:
                gate, up = t[e].chunk(2, dim=0)  # rows [0, I) gate, [I, 2I) up
                out[f"{prefix}.{e}.{'w1' if mixtral else 'gate_proj'}.weight"] = gate.clone()
                out[f"{prefix}.{e}.{'w3' if mixtral else 'up_proj'}.weight"] = up.clone()
    return out


def _config_dict(config) -> dict:
    """config.json exactly as transformers 5 writes it (save_pretrained)."""
    return json.loads(config.to_json_string(use_diff=True))


def _hub_config(family: str, cfg: dict) -> dict:
    """transformers 5 config.json -> the style of the real hub config.json of the family."""
    cfg = dict(cfg)
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    cfg["transformers_version"] = "4.57.1"
    rope = dict(cfg.pop("rope_parameters"))
    if family == "qwen3_5_moe":
        cfg["rope_parameters"] = rope  # the real Qwen3.5 config keeps the dict (with mrope keys)
    else:
        cfg["rope_theta"] = rope.pop("rope_theta")
        if "partial_rotary_factor" in rope:
            cfg["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
        if family == "olmoe":
            cfg["rope_scaling"] = None
    if family in HYBRIDS:
        layer_types = cfg.pop("layer_types")
        if layer_types != _hybrid_layer_types(len(layer_types)):
            raise ValueError("config_style='hub' needs layer_types that follow "
                             "full_attention_interval")
        cfg["full_attention_interval"] = FULL_ATTENTION_INTERVAL
    if family == "qwen3_moe":  # transformers 5 writes the attribute-mapped name
        cfg["num_experts"] = cfg.pop("num_local_experts", cfg.get("num_experts"))
    if family == "qwen2_moe":  # Qwen1.5-MoE has neither; the bias is implied (qkv_bias=True)
        cfg.pop("layer_types", None)
        if cfg.get("qkv_bias", True):
            cfg.pop("qkv_bias", None)
    if family in ("qwen2_moe", "olmoe", "mixtral") and cfg.get("head_dim") == (
            cfg["hidden_size"] // cfg["num_attention_heads"]):
        cfg.pop("head_dim")  # their hub configs have no head_dim
    return dict(sorted(cfg.items()))


def _wrap_multimodal(tensors: dict[str, torch.Tensor], text_cfg: dict,
                     seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Text model -> the Qwen3_5MoeForConditionalGeneration layout (config and tensor names)."""
    vision_kw = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                     temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
                     num_position_embeddings=16)
    drop = ("architectures", "transformers_version")
    text_cfg = {k: v for k, v in text_cfg.items() if k not in drop}
    text_cfg["mtp_num_hidden_layers"] = 1
    wrapper = transformers.Qwen3_5MoeConfig(text_config=dict(text_cfg), vision_config=vision_kw)
    wrapper.architectures = ["Qwen3_5MoeForConditionalGeneration"]
    cfg = _config_dict(wrapper)
    cfg.pop("dtype", None)
    cfg["torch_dtype" if "torch_dtype" in text_cfg else "dtype"] = "float32"
    cfg["text_config"] = dict(sorted(text_cfg.items()))  # keep the chosen style verbatim
    cfg = dict(sorted(cfg.items()))
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        lm = name.startswith("lm_head.")
        out[name if lm else "model.language_model." + name.removeprefix("model.")] = t
    gen = torch.Generator().manual_seed(seed + 1)
    hidden, vis = text_cfg["hidden_size"], vision_kw["hidden_size"]
    dummies = {
        "model.visual.patch_embed.proj.weight": (vis, 3, 2, 4, 4),  # Conv3d, kernel (2, 4, 4)
        "model.visual.blocks.0.norm1.weight": (vis,),
        "model.visual.merger.linear_fc2.weight": (vision_kw["out_hidden_size"], vis * 4),
        "mtp.fc.weight": (hidden, 2 * hidden),
        "mtp.norm.weight": (hidden,),
        "mtp.layers.0.mlp.experts.gate_up_proj": (
            text_cfg["num_experts"], 2 * text_cfg["moe_intermediate_size"], hidden),
    }
    for name, shape in dummies.items():
        out[name] = torch.randn(shape, generator=gen) * 0.02
    return out, cfg


def _write_json(file: Path, obj: dict) -> None:
    file.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], sharded: bool) -> None:
    for old in [*path.glob("model*.safetensors"), *path.glob("model.safetensors.index.json")]:
        old.unlink()
    meta = {"format": "pt"}
    if not sharded:
        save_file(tensors, str(path / "model.safetensors"), metadata=meta)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():  # module order, so a layer may straddle two shards
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) < 2:
        raise ValueError("sharded=True but everything fits in one shard; lower SHARD_BYTES")
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(path / "model.safetensors.index.json", index)

