"""epinfer: an inference engine for mixture-of-experts LLMs (DP × TP attention, EP MoE)."""

from epinfer.engine.llm import LLM
from epinfer.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"
