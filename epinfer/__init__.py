"""epinfer: an inference engine for mixture-of-experts LLMs (DP × TP attention, EP MoE)."""

from epinfer.core.sampling_params import SamplingParams
from epinfer.engine.llm import LLM

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"
