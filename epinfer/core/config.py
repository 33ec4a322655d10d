"""Frozen configuration records.

`ModelConfig.from_dir` / `from_hf` read a Hugging Face `config.json` (hub style or transformers-5
style, text-only or the multimodal wrapper with `text_config`) of every supported family into one
normalised record, so that layers never look at raw config keys. It does not load weights or
tokenizers.

A config.json is untrusted input: every field used is checked for type and range, and related sizes
for consistency (heads divisible by KV heads, experts per token within the experts, ...); any
problem is one `UserError` line naming the file and the field. Sizes are capped at generous maxima
(`MAX_*`, several times those of the largest real models) before anything is built per layer, so a
configuration cannot make parsing allocate without bound; `weight_count_floor` then lets the memory
check refuse a too-large model from the sizes alone, before even its meta-device copy is built.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from pathlib import Path
from typing import Any

from epinfer.core.checkpoint_files import (
    REQUIRED,
    JsonFields,
    folder_file,
    one_line,
    read_json_object,
    show,
    shown_path,
)
from epinfer.core.errors import UserError

MAX_LAYERS = 1024  # real MoE models: up to ~100 layers
MAX_VOCAB = 1 << 22  # real: up to ~262k tokens
MAX_HIDDEN = 1 << 16  # real: up to ~16k
MAX_INTERMEDIATE = 1 << 20  # dense, expert and shared-expert MLP widths; real: up to ~53k
MAX_HEADS = 1024  # attention and linear-attention heads; real: up to 128
MAX_HEAD_DIM = 1 << 12  # real: up to 512
MAX_EXPERTS = 1 << 14  # real: up to 512
MAX_POSITIONS = 1 << 30  # real: up to ~10M
MAX_CONV_KERNEL = 64  # the linear-attention causal conv; real: 4

DEMO_MODEL = Path(__file__).resolve().parent.parent / "demo_model"  # what runs without --model

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
    # FP8 checkpoints (quant_method "fp8", e4m3, dynamic activations): the weight block of the
    # `*_scale_inv` tensors, (rows, columns); None for a bf16 / fp16 / fp32 checkpoint
    fp8_block: tuple[int, int] | None = None

    @property
    def is_hybrid(self) -> bool:
        return "linear_attention" in self.layer_types

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        config_path = folder_file(Path(path), "config.json")
        if config_path is None:
            raise UserError(f"no config.json in {path}")
        return cls.from_hf(read_json_object(config_path), shown_path(config_path))

    @classmethod
    def from_hf(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """`source` names the file in error messages."""
        if not isinstance(raw, dict):
            raise UserError(f"{source}: expected a JSON object at the top level, got {show(raw, 30)}")
        top = JsonFields(raw, source)
        archs = top.str_list("architectures", [])
        family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if family is None:
            known = ", ".join(sorted(ARCHITECTURES))
            raise UserError(f"{source}: field 'architectures': unsupported architecture "
                            f"{show(archs) if archs else '(none given)'}; supported: {known}")
        text_config = top.obj("text_config")
        where = "quantization_config" if raw.get("quantization_config") else "text_config.quantization_config"
        quant = parse_quantization(raw.get("quantization_config") or (text_config or {}).get("quantization_config"),
                                   source, where)
        if text_config is None:
            cfg = cls._parse(family, top, top, "model.")
        else:
            cfg = cls._parse(family, JsonFields(text_config, source, "text_config."), top, "model.language_model.")
        return dataclasses.replace(cfg, fp8_block=quant)

    @classmethod
    def _parse(cls, family: str, f: JsonFields, top: JsonFields, weight_prefix: str) -> ModelConfig:
        """`f`: the language model's fields (`text_config` in the multimodal wrapper), `top`: the
        file's top level, where eos, tied embeddings and the dtype may also be."""
        src = f.source
        hidden = f.integer("hidden_size", lo=1, hi=MAX_HIDDEN)
        num_layers = f.integer("num_hidden_layers", lo=1, hi=MAX_LAYERS)
        num_heads = f.integer("num_attention_heads", lo=1, hi=MAX_HEADS)
        vocab = f.integer("vocab_size", lo=1, hi=MAX_VOCAB)
        present = [k for k in ("rope_parameters", "rope_scaling") if f.obj(k)]
        for rope_key in present:  # each: transformers applies a scaling type from either, both given or not
            rope = JsonFields(f.raw[rope_key], src, f"{f.prefix}{rope_key}.")
            rope_type = rope.raw.get("rope_type", rope.raw.get("type", "default"))
            if rope_type not in ("default", None):
                key = "rope_type" if "rope_type" in rope.raw else "type"
                raise UserError(f"{src}: field {rope.name(key)}: rope type {show(rope_type)} is not supported")
        rope = JsonFields(f.raw[present[0]], src, f"{f.prefix}{present[0]}.") if present else JsonFields({}, src)
        unsupported_window = "sliding-window attention is not supported"
        if f.flag("use_sliding_window", False):
            raise UserError(f"{src}: field {f.name('use_sliding_window')}: {unsupported_window}")
        if family == "mixtral" and f.has("sliding_window"):  # Mixtral's config has only the window size
            raise UserError(f"{src}: field {f.name('sliding_window')}: {unsupported_window}")
        hybrid = family in HYBRID_FAMILIES
        layer_types = cls._layer_types(f, num_layers, hybrid)  # per-layer tuples only after the caps

        experts_key = "num_experts" if f.has("num_experts") else "num_local_experts"
        num_experts = f.integer(experts_key, 0, hi=MAX_EXPERTS)
        # indices past the last layer are ignored (a shape cut to fewer layers keeps its list)
        mlp_only = set(f.int_list("mlp_only_layers", [], hi=MAX_LAYERS))
        sparse_step = f.integer("decoder_sparse_step", 1, lo=1, hi=MAX_LAYERS)
        mlp_types = tuple(
            "moe" if (i not in mlp_only and num_experts > 0 and (i + 1) % sparse_step == 0)
            else "dense"
            for i in range(num_layers)
        )
        has_moe, has_dense = "moe" in mlp_types, "dense" in mlp_types

        def size(key: str, needed: bool, hi: int = MAX_INTERMEDIATE) -> int:
            """A size that must be given and positive where `needed`, else may be absent (0)."""
            return f.integer(key, REQUIRED if needed else 0, lo=1 if needed else 0, hi=hi)

        intermediate = size("intermediate_size", has_dense)
        if family == "mixtral":
            moe_key = "intermediate_size"
        else:
            moe_key = "moe_intermediate_size" if f.has("moe_intermediate_size") else "intermediate_size"
        moe_intermediate = size(moe_key, has_moe)
        top_k = f.integer("num_experts_per_tok", REQUIRED if has_moe else 0, lo=1 if has_moe else 0,
                          hi=num_experts if has_moe else MAX_EXPERTS)
        norm_topk = {"mixtral": True, "qwen3_5_moe": True}.get(family)
        if norm_topk is None:
            norm_topk = f.flag("norm_topk_prob", False)
        shared = size("shared_expert_intermediate_size", False) if family in ("qwen2_moe", *HYBRID_FAMILIES) else 0
        attention_bias = f.flag("qkv_bias", True) if family == "qwen2_moe" else f.flag("attention_bias", False)

        num_kv_heads = f.integer("num_key_value_heads", num_heads, lo=1, hi=num_heads)
        if num_heads % num_kv_heads:
            raise UserError(f"{src}: field {f.name('num_attention_heads')} ({num_heads}) must be a multiple of "
                            f"{f.name('num_key_value_heads')} ({num_kv_heads})")
        if f.has("head_dim"):
            head_dim = f.integer("head_dim", lo=1, hi=MAX_HEAD_DIM)
        elif hidden % num_heads:
            raise UserError(f"{src}: field {f.name('hidden_size')} ({hidden}) is not a multiple of "
                            f"{f.name('num_attention_heads')} ({num_heads}) and no 'head_dim' is given")
        else:
            head_dim = hidden // num_heads
        rope_theta = (rope if rope.has("rope_theta") else f).number("rope_theta", 10000.0, lo=0.0, lo_open=True)
        partial = (rope if rope.has("partial_rotary_factor") else f).number(
            "partial_rotary_factor", 0.25 if hybrid else 1.0, lo=0.0, hi=1.0, lo_open=True)
        rotary_dim = int(head_dim * partial)
        if rotary_dim < 2 or rotary_dim % 2:
            raise UserError(f"{src}: fields {f.name('head_dim')} ({head_dim}) x 'partial_rotary_factor' ({partial:g}) "
                            f"give {rotary_dim} rotary dimensions; rotary embedding needs an even number >= 2")

        linear = dict.fromkeys(("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                "linear_value_head_dim"), 0)
        conv_kernel = 4
        if hybrid:
            gdn = "linear_attention" in layer_types
            for key in linear:
                linear[key] = size(key, gdn, MAX_HEADS if key.endswith("heads") else MAX_HEAD_DIM)
            conv_kernel = f.integer("linear_conv_kernel_dim", 4, lo=1, hi=MAX_CONV_KERNEL)
            nk, nv = linear["linear_num_key_heads"], linear["linear_num_value_heads"]
            if gdn and nv % nk:
                raise UserError(f"{src}: field {f.name('linear_num_value_heads')} ({nv}) must be a multiple of "
                                f"{f.name('linear_num_key_heads')} ({nk})")

        # eos, tied embeddings and dtype: the top level wins where it has the key (multimodal wrapper)
        eos_fields = top if "eos_token_id" in top.raw else f
        tie_fields = top if "tie_word_embeddings" in top.raw else f
        if f.has("torch_dtype"):
            dtype = f.text("torch_dtype")
        elif f.has("dtype"):
            dtype = f.text("dtype")
        else:
            dtype = top.text("torch_dtype", "float32")
        return cls(
            family=family,
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=f.number("rms_norm_eps", 1e-6, lo=0.0, hi=1.0, lo_open=True),
            rope_theta=rope_theta,
            partial_rotary_factor=partial,
            max_position_embeddings=f.integer("max_position_embeddings", 4096, lo=1, hi=MAX_POSITIONS),
            layer_types=layer_types,
            mlp_types=mlp_types,
            intermediate_size=intermediate,
            moe_intermediate_size=moe_intermediate,
            num_experts=num_experts,
            top_k=top_k,
            norm_topk_prob=norm_topk,
            shared_expert_intermediate_size=shared,
            attention_bias=attention_bias,
            qk_norm={"qwen3_moe": "head", "olmoe": "full", "qwen3_next": "head",
                     "qwen3_5_moe": "head"}.get(family, "none"),
            attn_output_gate=hybrid,
            zero_centered_norm=hybrid,
            clip_qkv=f.number("clip_qkv", None, lo=0.0, lo_open=True),
            **linear,
            linear_conv_kernel=conv_kernel,
            tie_word_embeddings=tie_fields.flag("tie_word_embeddings", False),
            eos_token_ids=eos_fields.token_ids("eos_token_id") or (),
            dtype=dtype,
            weight_prefix=weight_prefix,
        )

    @staticmethod
    def _layer_types(f: JsonFields, num_layers: int, hybrid: bool) -> tuple[str, ...]:
        if not hybrid:
            return ("attention",) * num_layers
        types = f.str_list("layer_types", None)
        if types is None:
            interval = f.integer("full_attention_interval", 4, lo=1, hi=MAX_LAYERS)
            types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                     for i in range(num_layers)]
        if len(types) != num_layers:
            raise UserError(f"{f.source}: field {f.name('layer_types')} has {len(types)} entries for "
                            f"{num_layers} layers ({f.name('num_hidden_layers')})")
        mapping = {"full_attention": "attention", "linear_attention": "linear_attention"}
        unknown = sorted(set(types) - set(mapping))
        if unknown:
            raise UserError(f"{f.source}: field {f.name('layer_types')} has unsupported layer types {show(unknown)}")
        return tuple(mapping[t] for t in types)

    def weight_count_floor(self) -> int:
        """Parameters that any full copy of the model holds at least (embeddings, LM head, the
        projections and experts; norms, biases and the router left out), from the sizes alone:
        cheap enough to refuse a huge configuration before anything per layer is built."""
        D, hd = self.hidden_size, self.head_dim
        attention = D * hd * (self.num_heads * (3 if self.attn_output_gate else 2) + 2 * self.num_kv_heads)
        key = self.linear_num_key_heads * self.linear_key_head_dim
        value = self.linear_num_value_heads * self.linear_value_head_dim
        linear_attention = D * (2 * key + 3 * value)  # in_proj_qkv, in_proj_z, out_proj
        moe = 3 * D * (self.num_experts * self.moe_intermediate_size + self.shared_expert_intermediate_size)
        dense = 3 * D * self.intermediate_size
        count = 2 * self.vocab_size * D
        count += sum(attention if t == "attention" else linear_attention for t in self.layer_types)
        count += sum(moe if t == "moe" else dense for t in self.mlp_types)
        return count


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # checkpoint folder; None = the shipped demo model
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 0  # 0: chosen by the engine for the device and model (`auto_max_num_seqs`)
    # tokens a step at most (decodes first, then prompt chunks); 0: by the device (`auto_max_num_batched_tokens`)
    max_num_batched_tokens: int = 0
    block_size: int = 16
    cache_memory_gb: float | None = None  # KV + GDN state budget; None = automatic
    gpu_memory_utilization: float = 0.9
    random_weights: bool = False  # benchmarks: the folder needs only config.json
    cuda_graphs: bool = True  # decode steps as CUDA graphs (single-process CUDA runs); --enforce-eager
    # plan step n+1 while the device runs step n; None: on where the device runs asynchronously (CUDA)
    async_scheduling: bool | None = None
    parallel_graphs: bool = False  # decode graphs that hold MoE / TP collectives too; --parallel-graphs
    # prefill and mixed steps as graph pieces between the attention / GDN parts (`runner.piecewise`);
    # None: with CUDA graphs on CUDA unless EPINFER_PIECEWISE=0; True on the CPU runs the pieces as calls
    piecewise_graphs: bool | None = None
    # an FP8 checkpoint's (or, with random weights, an FP8 config's) weights kept in FP8 with block
    # scales, run by the FP8 kernels (`kernels.fp8_gemm`); off: dequantised to `dtype` at load
    fp8_weights: bool = False
    # the GDN recurrent state's dtype: auto (the compute dtype, as vLLM's default): in bf16 half the
    # state bytes a decode step reads and writes, and room for more sequences, at the cost of rounding
    # the state every token; float32 (transformers' arithmetic), bfloat16, float16
    mamba_ssm_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True  # reuse the KV blocks of cached prompt prefixes; --no-prefix-caching
    # hybrid models with prefix caching: GDN state snapshots kept (0: a quarter of max_num_seqs, at least 8)
    prefix_state_snapshots: int = 0

    def checked(self) -> EngineConfig:
        """This config with every field of the right type and range (numbers of any numeric type,
        numpy's too, as int / float), or a one-line `UserError` naming the field: the Python API
        takes any object, and a block size of 0 or a NaN budget must not reach the planner."""
        fixed: dict[str, Any] = {}
        if self.model is not None and (not isinstance(self.model, (str, os.PathLike)) or not str(self.model)):
            raise UserError("model must be a checkpoint folder's path (None: the demo model), got "
                            f"{_python(self.model)}")
        for name in ("dtype", "device", "mamba_ssm_cache_dtype"):
            if not isinstance(getattr(self, name), str):
                raise UserError(f"{name} must be a string, got {_python(getattr(self, name))}")
        for name, least, auto in (("max_num_seqs", 1, 0), ("max_num_batched_tokens", 1, 0), ("block_size", 1, _NONE),
                                  ("prefix_state_snapshots", 1, 0), ("max_model_len", 2, None)):
            value = getattr(self, name)
            if value is None and auto is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (value < least and value != auto):
                note = "" if auto is _NONE else f" ({'unset' if auto is None else auto}: chosen by the engine)"
                raise UserError(f"{field_flag(name)} must be an integer >= {least}{note}, got {_python(value)}")
            fixed[name] = int(value)
        for name, unit in (("cache_memory_gb", False), ("gpu_memory_utilization", True)):
            value = getattr(self, name)
            if value is None and not unit:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < float("inf") \
                    or (unit and value > 1):
                raise UserError(f"{field_flag(name)} must be {'in (0, 1]' if unit else 'a finite number > 0'}, "
                                f"got {_python(value)}")
            fixed[name] = float(value)
        for name in ("random_weights", "cuda_graphs", "parallel_graphs", "fp8_weights", "enable_prefix_caching",
                     "async_scheduling", "piecewise_graphs"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name in ("async_scheduling", "piecewise_graphs")):
                raise UserError(f"{name} must be True or False, got {_python(value)}")
        return dataclasses.replace(self, **fixed)


_NONE = object()  # (a field with no "chosen by the engine" value)


def _python(value: Any) -> str:
    """A value as Python spells it, bounded (for messages to `LLM` callers)."""
    return one_line(repr(value), 60)


def field_flag(name: str) -> str:
    """An engine field as `LLM` names it, and as the command line does where it has a flag."""
    flags = {"max_num_seqs", "max_num_batched_tokens", "max_model_len", "cache_memory_gb", "gpu_memory_utilization"}
    return f"{name} (--{name.replace('_', '-')})" if name in flags else name


def parse_quantization(quant: Any, source: str, where: str) -> tuple[int, int] | None:
    """The FP8 weight block of a `quantization_config` (None when absent); every other method, or an
    FP8 variant the loader does not read, is a one-line `UserError` naming it."""
    if not quant:
        return None
    if not isinstance(quant, dict):
        raise UserError(f"{source}: field '{where}' must be a JSON object, got {show(quant)}")
    f = JsonFields(quant, source, f"{where}.")
    method = quant.get("quant_method")
    if method != "fp8":
        name = one_line(method, 40) if isinstance(method, str) else "unknown"
        raise UserError(f"{source}: field '{where}': quantized checkpoint ({name}) is not supported; use an FP8 "
                        f"(quant_method fp8) or a bf16 / fp16 / fp32 one")
    if f.text("fmt", "e4m3") != "e4m3":
        raise f.fail("fmt", "must be e4m3 (float8_e4m3fn weights)")
    if f.text("activation_scheme", "dynamic") != "dynamic":
        raise f.fail("activation_scheme", "must be dynamic (static activation scales are not supported)")
    block = f.int_list("weight_block_size", None, lo=1, hi=1 << 16)
    if block is None or len(block) != 2:
        raise f.fail("weight_block_size", "must be [rows, columns] (block-scaled FP8)")
    f.str_list("modules_to_not_convert", None)
    return block[0], block[1]
