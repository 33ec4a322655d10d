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
                  generators: list[torch.Generator | None], batched: bool | None = None) -> torch.Tensor:
    """The sampled token of every row, as a device tensor (no host sync). Greedy rows take the
    argmax. `batched` (default: on GPUs, where each kernel costs a launch) filters and draws the
    unseeded sampling rows together; otherwise, and always for a seeded row (its own generator),
    one row at a time (on CPUs the vocabulary sort dominates either way)."""
    tokens = torch.argmax(logits_SV, dim=-1)
    batched = logits_SV.is_cuda if batched is None else batched
    together = [i for i, p in enumerate(params) if not p.greedy and generators[i] is None] if batched else []
    if together:
        rows = _on(logits_SV.device, together)
        probs = _filtered_probs(logits_SV[rows], [params[i] for i in together])
        tokens[rows] = torch.multinomial(probs, 1)[:, 0]
    drawn = set(together)
    for i, p in enumerate(params):
        if not p.greedy and i not in drawn:
            probs = _filtered_probs(logits_SV[i:i + 1], [p])
            tokens[i:i + 1] = torch.multinomial(probs[0], 1, generator=generators[i])
    return tokens


def _filtered_probs(logits_RV: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k (ties at the k-th value stay), then top-p (a token goes when the
    mass before it already reaches top_p; the first always stays), per row; softmax."""
    V = logits_RV.shape[1]
    dev = logits_RV.device
    logits = logits_RV.float() / _on(dev, [p.temperature for p in params])[:, None]
    ks = [p.top_k if 0 < p.top_k < V else 0 for p in params]
    if any(ks):
        top = torch.topk(logits, max(ks), dim=-1).values  # [R, max k]
        k_R = _on(dev, ks)
        kth = top.gather(1, (k_R - 1).clamp(min=0)[:, None])
        kth = torch.where(k_R[:, None] > 0, kth, float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    ps = [p.top_p for p in params]
    if any(p < 1.0 for p in ps):
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        p_R = _on(dev, [p if p < 1.0 else float("inf") for p in ps])[:, None]  # inf: keep all
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= p_R
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return torch.softmax(logits, dim=-1)


def _on(device: torch.device, values: list) -> torch.Tensor:
    """A small host list on `device` without a host sync (torch.tensor(..., device=cuda) waits for
    the stream: with async scheduling the forward would have to finish first)."""
    return torch.tensor(values).to(device, non_blocking=True)
