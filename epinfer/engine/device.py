"""The engine's device and dtypes from their names ("auto" included), and the settings whose
defaults follow the device (async scheduling, piecewise graphs)."""

from __future__ import annotations

import torch

from epinfer.core.config import EngineConfig, ModelConfig
from epinfer.core.env import SWITCHES
from epinfer.core.errors import UserError
from epinfer.kernels import paged_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if hasattr(torch, "xpu") and torch.xpu.is_available():
            return torch.device("xpu")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "xpu") and not name.startswith(("cuda:", "xpu:")):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or xpu")
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    if kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise UserError("--device xpu requested but no XPU device is available")
    return torch.device(name)


def resolve_state_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """--mamba-ssm-cache-dtype: float32, bfloat16, float16, or auto (the compute dtype)."""
    if name == "auto":
        return dtype
    if name not in DTYPES:
        raise UserError(f"unknown --mamba-ssm-cache-dtype {name!r}; use auto, float32, bfloat16 or float16")
    return DTYPES[name]


def resolve_dtype(name: str, cfg: ModelConfig) -> torch.dtype:
    if name == "auto":
        name = cfg.dtype if cfg.dtype in DTYPES else "float32"
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return DTYPES[name]


def async_default(ecfg: EngineConfig, device: torch.device) -> bool:
    """--async-scheduling unless set: on for CUDA, where the host plans the next step while the GPU
    runs this one (tokens identical to the synchronous loop: tests/test_engine.py); off where the
    device computes synchronously (CPU), since there it only delays each token by a step."""
    return ecfg.async_scheduling if ecfg.async_scheduling is not None else device.type == "cuda"


def piecewise_default(ecfg: EngineConfig, device: torch.device) -> bool:
    """`piecewise_graphs` unless set: on where decode graphs run (CUDA with Triton, graphs on) unless
    EPINFER_PIECEWISE=0. On an H200 the throughput profile ran 4.2 % faster with them (and the
    chunk-attention kernel) than without, in the same call (RESULTS.md, end-to-end workloads)."""
    if ecfg.piecewise_graphs is not None:
        return ecfg.piecewise_graphs
    return SWITCHES.piecewise and ecfg.cuda_graphs and device.type == "cuda" and paged_attention.triton is not None
