"""Token sampling: greedy, temperature, top-k, top-p, with a per-request generator for seeds.

A seeded request draws only from its own `torch.Generator`, so its output does not depend on what
else is in the batch.
"""

from __future__ import annotations

import torch

from epinfer.engine.sampling_params import SamplingParams


def sample(logits_SV: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    return sample_tokens(logits_SV, params, generators).tolist()  # host sync: the scheduler needs them


def sample_tokens(logits_SV: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """The sampled token of every row, as a device tensor (no host sync)."""
    tokens = torch.argmax(logits_SV, dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        logits = logits_SV[i] / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            # drop a token when the mass before it already reaches top_p (the first always stays)
            drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= p.top_p
            logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        tokens[i:i + 1] = torch.multinomial(probs, 1, generator=generators[i])
    return tokens
