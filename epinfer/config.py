"""Frozen configuration records.

`ModelConfig.from_hf` reads a Hugging Face `config.json` (hub style or transformers-5 style, text-only
or the multimodal wrapper with `text_config`) of every supported family into one normalised record,
so that layers never look at raw config keys. It does not load weights or tokenizers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from epinfer.errors import UserError

# architecture name in config.json -> family
ARCHITECTURES = {
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen3NextForCausalLM": "qwen3_next",
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe",
    "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "OlmoeForCausalLM": "olmoe",
    "MixtralForCausalLM": "mixtral",
}
HYBRID_FAMILIES = ("qwen3_next", "qwen3_5_moe")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    partial_rotary_factor: float
    max_position_embeddings: int
    layer_types: tuple[str, ...]  # "attention" | "linear_attention", one per layer
    mlp_types: tuple[str, ...]  # "moe" | "dense", one per layer
    intermediate_size: int  # dense MLP layers
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    shared_expert_intermediate_size: int  # 0: no shared expert
    attention_bias: bool  # bias on q/k/v projections
    qk_norm: str  # "none" | "head" (per head, Qwen3) | "full" (over all heads, OLMoE)
    attn_output_gate: bool  # Qwen3-Next / Qwen3.5 gated attention
    zero_centered_norm: bool  # RMSNorm weight applied as (1 + w)
    clip_qkv: float | None
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    dtype: str  # checkpoint dtype name, e.g. "bfloat16"
    weight_prefix: str  # "model." or "model.language_model."

    @property
    def is_hybrid(self) -> bool:
        return "linear_attention" in self.layer_types

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise UserError(f"no config.json in {path}")
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{config_path}: invalid JSON ({exc})") from None
        return cls.from_hf(raw)

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if family is None:
            known = ", ".join(sorted(ARCHITECTURES))
            raise UserError(f"unsupported architecture {archs or '(none given)'}; supported: {known}")
        quant = raw.get("quantization_config") or raw.get("text_config", {}).get("quantization_config")
        if quant:
            method = quant.get("quant_method", "unknown")
            raise UserError(f"quantized checkpoint ({method}) is not supported; use a bf16/fp16/fp32 one")
        weight_prefix = "model."
        top = raw
        if "text_config" in raw:
            raw = {**raw["text_config"]}
            weight_prefix = "model.language_model."
        return cls._parse(family, raw, top, weight_prefix)

    @classmethod
    def _parse(cls, family: str, raw: dict, top: dict, weight_prefix: str) -> ModelConfig:
        def get(key: str, default: Any = None) -> Any:
            return raw[key] if raw.get(key) is not None else default

        try:
            hidden = int(raw["hidden_size"])
            num_layers = int(raw["num_hidden_layers"])
            num_heads = int(raw["num_attention_heads"])
            vocab = int(raw["vocab_size"])
        except KeyError as exc:
            raise UserError(f"config.json lacks required field {exc.args[0]!r}") from None
        rope = get("rope_parameters") or get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise UserError(f"rope type {rope_type!r} is not supported")
        if get("use_sliding_window", False) or (
            family == "mixtral" and get("sliding_window") is not None
        ):
            raise UserError("sliding-window attention is not supported")
        hybrid = family in HYBRID_FAMILIES
        layer_types = cls._layer_types(raw, num_layers, hybrid)
        num_experts = int(get("num_experts", get("num_local_experts", 0)))
        mlp_only = set(get("mlp_only_layers", []) or [])
        sparse_step = int(get("decoder_sparse_step", 1))
        mlp_types = tuple(
            "moe" if (i not in mlp_only and num_experts > 0 and (i + 1) % sparse_step == 0)
            else "dense"
            for i in range(num_layers)
        )
        norm_topk = {"mixtral": True, "qwen3_5_moe": True}.get(family, get("norm_topk_prob", False))
        eos = top.get("eos_token_id", get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        moe_inter = get("moe_intermediate_size", get("intermediate_size", 0))
        if family == "mixtral":
            moe_inter = get("intermediate_size")
        return cls(
            family=family,
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(get("num_key_value_heads", num_heads)),
            head_dim=int(get("head_dim", hidden // num_heads)),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", get("rope_theta", 10000.0))),
            partial_rotary_factor=float(
                rope.get("partial_rotary_factor", get("partial_rotary_factor", 0.25 if hybrid else 1.0))
            ),
            max_position_embeddings=int(get("max_position_embeddings", 4096)),
            layer_types=layer_types,
            mlp_types=mlp_types,
            intermediate_size=int(get("intermediate_size", 0)),
            moe_intermediate_size=int(moe_inter),
            num_experts=num_experts,
            top_k=int(get("num_experts_per_tok", 0)),
            norm_topk_prob=bool(norm_topk),
            shared_expert_intermediate_size=int(get("shared_expert_intermediate_size", 0))
            if family in ("qwen2_moe", *HYBRID_FAMILIES) else 0,
            attention_bias=bool(get("qkv_bias", True) if family == "qwen2_moe"
                                else get("attention_bias", False)),
            qk_norm={"qwen3_moe": "head", "olmoe": "full", "qwen3_next": "head",
                     "qwen3_5_moe": "head"}.get(family, "none"),
            attn_output_gate=hybrid,
            zero_centered_norm=hybrid,
            clip_qkv=get("clip_qkv"),
            linear_num_key_heads=int(get("linear_num_key_heads", 0)),
            linear_num_value_heads=int(get("linear_num_value_heads", 0)),
            linear_key_head_dim=int(get("linear_key_head_dim", 0)),
            linear_value_head_dim=int(get("linear_value_head_dim", 0)),
            linear_conv_kernel=int(get("linear_conv_kernel_dim", 4)),
            tie_word_embeddings=bool(top.get("tie_word_embeddings", get("tie_word_embeddings", False))),
            eos_token_ids=eos_ids,
            dtype=str(get("torch_dtype", get("dtype", top.get("torch_dtype", "float32")))),
            weight_prefix=weight_prefix,
        )

    @staticmethod
    def _layer_types(raw: dict, num_layers: int, hybrid: bool) -> tuple[str, ...]:
        if not hybrid:
            return ("attention",) * num_layers
        types = raw.get("layer_types")
        if types is None:
            interval = int(raw.get("full_attention_interval", 4))
            types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                     for i in range(num_layers)]
        if len(types) != num_layers:
            raise UserError(f"layer_types has {len(types)} entries for {num_layers} layers")
        mapping = {"full_attention": "attention", "linear_attention": "linear_attention"}
        unknown = sorted(set(types) - set(mapping))
        if unknown:
            raise UserError(f"unsupported layer types {unknown}")
        return tuple(mapping[t] for t in types)
