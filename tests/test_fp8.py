"""FP8 checkpoints (block-scaled float8_e4m3fn weights with `*_scale_inv`, as Qwen publishes them)
on CPU: dequantised once at load into the compute dtype, every family gives greedy tokens identical
to transformers running the same weights dequantised (block sizes that divide the weights and ones
that leave partial edge blocks; fused experts, sharded files); malformed FP8 checkpoints are one
line naming the tensor."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from epinfer import LLM, SamplingParams
from epinfer.core.errors import UserError
from tests.checkpoints import FAMILIES, hf_generate

PROMPTS = [[7], [3, 1, 4, 1, 5, 9], list(range(40, 73))]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def block_for(family: str) -> tuple[int, int]:
    return (16, 16) if family in ("qwen3_5_moe", "qwen3_moe", "olmoe") else (12, 20)  # (12, 20): edge blocks


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_matches_transformers_on_dequantized_weights(family, ckpt_dir):
    path = ckpt_dir(family, fp8_block=block_for(family))
    raw = load_file(str(path / "model.safetensors"))
    assert any(t.dtype == torch.float8_e4m3fn for t in raw.values())
    ours = [o.token_ids for o in LLM(str(path), dtype="float32", device="cpu").generate(PROMPTS, GREEDY)]
    assert ours == [hf_generate(path / "dequantized", p, 10)[0] for p in PROMPTS]


@pytest.mark.parametrize("layout", [dict(expert_layout="fused", sharded=True), dict(multimodal=True)])
def test_fp8_layouts(layout, ckpt_dir):
    path = ckpt_dir("qwen3_5_moe", fp8_block=(16, 16), **layout)
    ours = [o.token_ids for o in LLM(str(path), dtype="float32", device="cpu").generate(PROMPTS, GREEDY)]
    ref = [o.token_ids for o in LLM(str(path / "dequantized"), dtype="float32", device="cpu").generate(PROMPTS, GREEDY)]
    assert ours == ref


def _variant(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("dequantized"))
    if edit_tensors:
        tensors = load_file(str(dst / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_malformed_fp8_checkpoints_are_one_line(ckpt_dir, tmp_path):
    src = ckpt_dir("qwen3_5_moe", fp8_block=(16, 16))
    name = "model.layers.0.mlp.experts.0.gate_proj.weight"
    down = "model.layers.1.mlp.experts.2.down_proj.weight"
    cases = [
        (lambda t: t.pop(name + "_scale_inv"), None, f"tensor {name} is FP8 but its scale {name}_scale_inv is missing"),
        (lambda t: t.update({name + "_scale_inv": torch.ones(1, 1)}), None, f"tensor {name}_scale_inv: shape (1, 1)"),
        (lambda t: t[name + "_scale_inv"].view(-1)[1:2].fill_(-2.0), None,
         f"tensor {name}_scale_inv: scales must be finite and not negative, found -2.0"),
        (lambda t: t[name + "_scale_inv"].view(-1)[0:1].fill_(math.nan), None,
         f"tensor {name}_scale_inv: scales must be finite and not negative, found nan"),
        (lambda t: t.update({"model.norm.weight_scale_inv": torch.ones(1)}), None,
         "tensor model.norm.weight_scale_inv: a scale without the FP8 weight model.norm.weight"),
        (lambda t: t.update({name: t[name][:-16], name + "_scale_inv": t[name + "_scale_inv"][:-1]}), None,
         f"tensor {name}: shape"),
        (lambda t: t[down].view(torch.uint8).view(-1)[5:6].fill_(0x7F), None,
         f"tensor {down} holds NaN or infinite values"),  # (0x7F: float8_e4m3fn's NaN)
        (None, lambda c: c.pop("quantization_config"), "is float8 but config.json has no FP8 quantization_config"),
        (None, lambda c: c["quantization_config"].update(activation_scheme="static"), "activation_scheme"),
        (None, lambda c: c["quantization_config"].update(quant_method="awq"), "quantized checkpoint (awq)"),
    ]
    for i, (tensors, config, message) in enumerate(cases):
        bad = _variant(src, tmp_path / f"bad{i}", tensors, config)
        with pytest.raises(UserError, match=None) as err:
            LLM(str(bad), dtype="float32", device="cpu")
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_fp8_weights_come_back_as_the_checkpoints(ckpt_dir):
    """--fp8-weights: the projections and experts hold the checkpoint's own FP8 values and scales
    (blocks that divide the weights: requantising the dequantised blocks gives them back)."""
    path = ckpt_dir("qwen3_5_moe", fp8_block=(16, 16))
    raw = load_file(str(path / "model.safetensors"))
    model = LLM(str(path), dtype="float32", device="cpu", fp8_weights=True).engine.runner.model
    layer = model.model.layers[0]
    for name, lin in [("mlp.shared_expert.down_proj", layer.mlp.shared_expert.down_proj),
                      ("linear_attn.out_proj", layer.linear_attn.out_proj)]:
        key = f"model.layers.0.{name}.weight"
        assert lin.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(lin.weight.view(torch.uint8), raw[key].view(torch.uint8)), name
        torch.testing.assert_close(lin.weight_scale, raw[key + "_scale_inv"], rtol=1e-6, atol=0)
    experts = layer.mlp.experts
    inter = experts.w13.shape[1] // 2
    gate = raw["model.layers.0.mlp.experts.3.gate_proj.weight"]
    assert torch.equal(experts.w13[3, :inter].view(torch.uint8), gate.view(torch.uint8))
    assert model.lm_head.weight.dtype == torch.float32 and layer.mlp.gate.weight.dtype == torch.float32


def first_logits(llm: LLM, prompt: list[int]) -> torch.Tensor:
    captured = []
    apply = llm.engine.apply
    llm.engine.apply = lambda scheduled, logits: captured.append(logits.float().clone()) or apply(scheduled, logits)
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    return captured[-1][-1]


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_moe", "qwen3_next"])
def test_fp8_weights_logits_close_to_dequantized(family, ckpt_dir):
    """FP8 weights with FP8 activations (the kernels' quantisation, in torch on the CPU) against the
    same weights dequantised: the same top token, cosine of the logits >= 0.99 (0.9950-0.9993 seen:
    the tiny models' scaled-up weights make FP8 rounding count more than at real shapes)."""
    path = ckpt_dir(family, fp8_block=(16, 16))
    fp8 = LLM(str(path), dtype="float32", device="cpu", fp8_weights=True)
    plain = LLM(str(path), dtype="float32", device="cpu")
    for prompt in PROMPTS:
        a, b = first_logits(fp8, prompt), first_logits(plain, prompt)
        assert not torch.equal(a, b), "the activations were not quantised"
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) >= 0.99 and a.argmax() == b.argmax()


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_moe"])
def test_fp8_projections_stack(family, ckpt_dir, monkeypatch):
    """In low precision the FP8 projections that read the same rows run as one GEMM (q / k / v, the
    GDN's qkv / z, gate / up), the bf16 columns beside them as one more where there are two (the GDN's
    a / b), with the same logits as one GEMM each."""
    from epinfer.layers import attention, gdn, linear

    path = ckpt_dir(family, fp8_block=(16, 16))
    stacked = LLM(str(path), dtype="bfloat16", device="cpu", fp8_weights=True)
    model = stacked.engine.runner.model
    found = {name for m in model.modules() for name, v in vars(m).items() if isinstance(v, linear.Stacked)
             and v.block == (16, 16)}
    assert found == ({"qkv", "in_proj", "gate_up"} if family == "qwen3_5_moe" else {"qkv"}), found
    rests = [(v.rest and (v.rest.block, len(v.rest.sizes)), len(v.apart)) for m in model.modules()
             for v in vars(m).values() if isinstance(v, linear.Stacked) and v.block is not None]
    if family == "qwen3_5_moe":  # each GDN layer's a / b stacked in bf16; the shared expert's gate column alone
        gdn_layers = sum(isinstance(m, gdn.GatedDeltaNet) for m in model.modules())
        assert rests.count(((None, 2), 0)) == gdn_layers > 0 and rests.count((None, 1)) > 0, rests
    for module in (attention, gdn, linear):
        monkeypatch.setattr(module, "stack_linears", lambda linears: None)
    apart = LLM(str(path), dtype="bfloat16", device="cpu", fp8_weights=True)
    for prompt in PROMPTS:
        a, b = first_logits(stacked, prompt), first_logits(apart, prompt)
        torch.testing.assert_close(a, b, atol=2e-2, rtol=0)  # bf16 outputs of the same arithmetic
        assert a.argmax() == b.argmax()


def test_fp8_weights_need_an_fp8_checkpoint(ckpt_dir):
    with pytest.raises(UserError, match="--fp8-weights needs an FP8 checkpoint"):
        LLM(str(ckpt_dir("qwen3_5_moe")), dtype="float32", device="cpu", fp8_weights=True)


def test_fp8_weights_load_one_layer_at_a_time(ckpt_dir, monkeypatch):
    """With --fp8-weights the model is made layer by layer: when a layer is quantised, the layers
    after it do not exist yet (so only one layer is ever held in the compute dtype), and the result
    is the single-process FP8 run's (checkpoint and random weights alike)."""
    from epinfer.runner import model_runner

    seen = []
    real = model_runner.quantize_fp8

    def spy(module, block):
        if not isinstance(module, real_lm):  # (the whole model: the memory estimate, on the meta device)
            seen.append([lay.input_layernorm.weight.is_meta for lay in model_box[-1].model.layers])
        return real(module, block)

    model_box = []
    real_lm = model_runner.CausalLM

    class Recording(real_lm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            model_box.append(self)

    monkeypatch.setattr(model_runner, "quantize_fp8", spy)
    monkeypatch.setattr(model_runner, "CausalLM", Recording)
    path = ckpt_dir("qwen3_5_moe", fp8_block=(16, 16))
    llm = LLM(str(path), dtype="float32", device="cpu", fp8_weights=True)
    n = len(model_box[-1].model.layers)
    assert seen == [[j > i for j in range(n)] for i in range(n)]
    assert llm.generate(PROMPTS, GREEDY)[0].token_ids


def test_expert_tile_tables_for_fp8_and_from_a_sweep_file(tmp_path, monkeypatch):
    """FP8 expert weights take `FP8_CONFIGS` (the bf16 table while it has no rows) and, for a few
    pairs, `FP8_PER_PAIR`; a sweep's file (EPINFER_MOE_CONFIGS) replaces only the tables it holds."""
    from epinfer.kernels import moe_configs

    for name in ("PER_PAIR", "FP8_PER_PAIR", "CONFIGS", "FP8_CONFIGS", "_LOADED"):  # restored after the test
        monkeypatch.setattr(moe_configs, name, type(getattr(moe_configs, name))(getattr(moe_configs, name)))
    pairs = 64 * moe_configs.PER_PAIR["max_pairs"]
    bf16 = moe_configs.grouped_config(pairs, 8)
    prefill = moe_configs.grouped_config(1024 * 128, 128, fp8=True)  # 1024 pairs an expert
    assert prefill in [cfg for _, cfg in moe_configs.FP8_CONFIGS] and prefill["BLOCK_M"] == 128
    moe_configs.FP8_CONFIGS.clear()
    assert moe_configs.grouped_config(pairs, 8, fp8=True) is bf16  # no FP8 rows: the bf16 table
    fp8_cfg = {"BLOCK_M": 32, "up": [64, 128, 3, 4], "down": [64, 128, 3, 4]}  # (as JSON gives them)
    table = tmp_path / "moe.json"
    table.write_text(json.dumps({"fp8_grouped": [[1e9, fp8_cfg]]}))
    monkeypatch.setenv("EPINFER_MOE_CONFIGS", str(table))
    moe_configs._LOADED.clear()
    assert moe_configs.grouped_config(pairs, 8, fp8=True) == fp8_cfg
    assert moe_configs.grouped_config(pairs, 8) == bf16  # the bf16 table kept: the file has none
    assert moe_configs.grouped_config(1, 8, fp8=True) is moe_configs.FP8_PER_PAIR  # a few pairs: per pair
    assert moe_configs.grouped_config(1, 8) is moe_configs.PER_PAIR
    w16_cfg = {"BLOCK_M": 16, "up": [16, 1024, 3, 2], "down": [32, 512, 4, 2]}  # tensor-core tiles: no "gemv"
    table.write_text(json.dumps({"fp8_per_pair": {**w16_cfg, "max_pairs": 4}}))
    moe_configs._LOADED.clear()
    limit = moe_configs.PER_PAIR["max_pairs"]
    assert moe_configs.grouped_config(limit, 8, fp8=True) == w16_cfg  # replaced whole, the bf16 table's limit
    assert moe_configs.grouped_config(limit + 1, 8, fp8=True) == fp8_cfg
    assert moe_configs.grouped_config(limit, 8) is moe_configs.PER_PAIR and "gemv" not in moe_configs.PER_PAIR


def test_cublas_fp8_takes_only_the_shapes_it_runs_faster():
    """cuBLAS's block-scaled FP8 GEMM (the default) only for 256 rows or more (128 for weights 4096
    or more wide) and weights of 2048 x 2048 or wider, in whole 128 blocks: on an H200 it lost to the
    Triton kernel on the shared expert's 1024 x 2048 and 2048 x 512 projections, and at 64 rows."""
    from epinfer.kernels.fp8_gemm import cublas_shape

    assert cublas_shape(16384, 12288, 2048) and cublas_shape(256, 2048, 4096)
    assert cublas_shape(128, 12288, 2048) and cublas_shape(200, 5120, 2048)
    assert not cublas_shape(255, 2048, 4096) and not cublas_shape(127, 12288, 2048)  # the Triton kernel
    assert not cublas_shape(16384, 1024, 2048) and not cublas_shape(16384, 2048, 512)
    assert not cublas_shape(16384, 2048 + 64, 2048)  # a partial block


def test_dequantized_experts_only_where_asked_and_counted_in_memory(monkeypatch):
    """EPINFER_FP8_DEQUANT_PAIRS (default 2048, 0: never): FP8 experts dequantised for the grouped GEMM
    only from that many pairs an expert on average over all the model's experts, on GPUs (never on
    the CPU); one layer's experts in the compute dtype kept from the cache, in the headroom and in
    the graph pieces' pool, when the experts run in FP8; scales of the wrong shape refused."""
    import dataclasses

    from epinfer.core.config import DEMO_MODEL, EngineConfig, ModelConfig
    from epinfer.core.env import SWITCHES, check_switches
    from epinfer.engine.memory import activation_headroom, pieces_pool_bytes
    from epinfer.kernels.fp8_gemm import dequantize_weights, quantize_blocks
    from epinfer.layers.moe import dequantized_experts

    cfg = dataclasses.replace(ModelConfig.from_dir(DEMO_MODEL), fp8_block=(16, 16))
    ecfg = EngineConfig(model="x", max_num_batched_tokens=8192, fp8_weights=True, cuda_graphs=True,
                        piecewise_graphs=True)
    monkeypatch.setenv("EPINFER_FP8_DEQUANT_PAIRS", "0")  # never
    check_switches()  # (0 is not a bad number here)
    base = activation_headroom(ecfg, cfg, torch.bfloat16), pieces_pool_bytes(cfg, ecfg, torch.bfloat16)
    layer = cfg.num_experts * 3 * cfg.moe_intermediate_size * cfg.hidden_size * 2
    monkeypatch.delenv("EPINFER_FP8_DEQUANT_PAIRS")  # the default: from 2048 pairs an expert
    assert activation_headroom(ecfg, cfg, torch.bfloat16) == base[0] + layer
    assert SWITCHES.fp8_dequant_pairs == 2048
    monkeypatch.setenv("EPINFER_FP8_DEQUANT_PAIRS", "512")
    assert activation_headroom(ecfg, cfg, torch.bfloat16) == base[0] + layer
    assert pieces_pool_bytes(cfg, ecfg, torch.bfloat16) == base[1] + layer
    assert activation_headroom(dataclasses.replace(ecfg, fp8_weights=False), cfg, torch.bfloat16) == base[0]
    assert activation_headroom(ecfg, dataclasses.replace(cfg, fp8_block=None), torch.bfloat16) == base[0]
    # a budget whose steps cannot reach the threshold keeps nothing, unless other replicas' rows can
    small = dataclasses.replace(ecfg, max_num_batched_tokens=512 * cfg.num_experts // cfg.top_k - 1)
    assert activation_headroom(small, cfg, torch.bfloat16) == activation_headroom(
        dataclasses.replace(small, fp8_weights=False), cfg, torch.bfloat16)
    assert pieces_pool_bytes(cfg, small, torch.bfloat16, dp=2) == pieces_pool_bytes(
        cfg, dataclasses.replace(small, fp8_weights=False), torch.bfloat16) + layer
    assert not dequantized_experts(torch.zeros(2, 4), 10**9, 8)  # CPU
    monkeypatch.setenv("EPINFER_FP8_DEQUANT_PAIRS", "zero")
    with pytest.raises(UserError, match="EPINFER_FP8_DEQUANT_PAIRS='zero': give a number"):
        activation_headroom(ecfg, cfg, torch.bfloat16)
    w, s = quantize_blocks(torch.randn(3, 40, 24), (16, 16))
    with pytest.raises(ValueError, match=r"scales \(3, 3, 1\) for \(3, 40, 24\)"):
        dequantize_weights(w, s[..., :1], (16, 16), torch.bfloat16)
