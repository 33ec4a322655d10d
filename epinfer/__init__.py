"""epinfer: an inference engine for mixture-of-experts LLMs (DP × TP attention, EP MoE)."""

from __future__ import annotations

from epinfer.core.sampling_params import SamplingParams
from epinfer.core.version import VERSION

__all__ = ["LLM", "SamplingParams"]
__version__ = VERSION


def __getattr__(name: str):
    # `LLM` brings in torch: loaded when first used, so the command line answers a bad flag fast
    if name == "LLM":
        from epinfer.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'epinfer' has no attribute {name!r}")
