"""Token sampling: greedy, temperature, min-p, top-k, top-p, with a per-request generator for seeds.

A seeded request draws only from its own `torch.Generator`, so its output does not depend on what
else is in the batch. A row whose logits are not all finite (a broken model or kernel) can't be
sampled: `nonfinite_rows` flags it, its draw is made from a harmless stand-in distribution so
nothing raises (on a GPU `multinomial` of NaN is a device-side assert that kills the process),
and the engine fails that request alone.
"""

from __future__ import annotations

import math

import torch

from epinfer.core.sampling_params import SamplingParams

_FP32_TINY = torch.finfo(torch.float32).tiny


def sample(logits_SV: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    return sample_tokens(logits_SV, params, generators).tolist()  # host sync: the scheduler needs them


def nonfinite_rows(logits_SV: torch.Tensor) -> torch.Tensor:
    """[S] bool: rows holding a NaN or an infinity. One reduction pass (a non-finite value makes
    the row's fp32 sum non-finite; finite logits are far too small to overflow it); no host sync."""
    return ~torch.isfinite(logits_SV.sum(dim=-1, dtype=torch.float32))


def sample_tokens(logits_SV: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None], batched: bool | None = None,
                  bad_S: torch.Tensor | None = None) -> torch.Tensor:
    """The sampled token of every row, as a device tensor (no host sync). Greedy rows take the
    argmax. `batched` (default: on GPUs, where each kernel costs a launch) filters and draws the
    unseeded sampling rows together; otherwise, and always for a seeded row (its own generator),
    one row at a time (on CPUs the vocabulary sort dominates either way). `bad_S`: rows flagged
    by `nonfinite_rows` (computed here when not given); their tokens are meaningless."""
    tokens = torch.argmax(logits_SV, dim=-1)
    batched = logits_SV.is_cuda if batched is None else batched
    sampling = [i for i, p in enumerate(params) if not p.greedy]
    if not sampling:
        return tokens
    bad_S = nonfinite_rows(logits_SV) if bad_S is None else bad_S
    together = [i for i in sampling if generators[i] is None] if batched else []
    if together:
        rows = host_list_on(logits_SV.device, together)
        probs = _filtered_probs(logits_SV[rows], [params[i] for i in together], bad_S[rows])
        tokens[rows] = torch.multinomial(probs, 1)[:, 0]
    drawn = set(together)
    for i in sampling:
        if i not in drawn:
            probs = _filtered_probs(logits_SV[i:i + 1], [params[i]], bad_S[i:i + 1])
            tokens[i:i + 1] = torch.multinomial(probs[0], 1, generator=generators[i])
    return tokens


def _filtered_probs(logits_RV: torch.Tensor, params: list[SamplingParams],
                    bad_R: torch.Tensor | None = None) -> torch.Tensor:
    """Temperature, then min-p, then top-k (ties at the k-th value stay), then top-p (a token goes when the
    mass before it already reaches top_p; the first always stays), per row; softmax. The row
    maximum is subtracted before dividing by the temperature, so any finite temperature > 0 keeps
    the values finite (the maximum becomes 0, the rest at worst -inf: a tiny temperature is
    greedy, never NaN). `bad_R` rows get a one-hot stand-in distribution."""
    V = logits_RV.shape[1]
    dev = logits_RV.device
    logits = logits_RV.float()
    temps = [max(p.temperature, _FP32_TINY) for p in params]  # a smaller one would be 0 in fp32: 0 / 0
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / host_list_on(dev, temps)[:, None]
    if bad_R is not None:
        logits = logits.masked_fill(bad_R[:, None], 0.0)
        logits[:, 1:].masked_fill_(bad_R[:, None], float("-inf"))
    min_ps = [p.min_p or 0.0 for p in params]
    if any(min_ps):  # (the maximum is 0 here: a token goes where its logit is under log(min_p))
        floor_R = host_list_on(dev, [math.log(m) if m > 0 else float("-inf") for m in min_ps])
        logits = logits.masked_fill(logits < floor_R[:, None], float("-inf"))
    ks = [p.top_k if 0 < p.top_k < V else 0 for p in params]
    if any(ks):
        top = torch.topk(logits, max(ks), dim=-1).values  # [R, max k]
        k_R = host_list_on(dev, ks)
        kth = top.gather(1, (k_R - 1).clamp(min=0)[:, None])
        kth = torch.where(k_R[:, None] > 0, kth, float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    ps = [p.top_p for p in params]
    if any(p < 1.0 for p in ps):
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        p_R = host_list_on(dev, [p if p < 1.0 else float("inf") for p in ps])[:, None]  # inf: keep all
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= p_R
        drop_sorted[:, 0] = False  # (a top_p below fp32's range is 0 there, and 0 >= 0 would drop all)
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return torch.softmax(logits, dim=-1)


def host_list_on(device: torch.device, values: list) -> torch.Tensor:
    """A small host list on `device` without a host sync (torch.tensor(..., device=cuda) waits for
    the stream: with async scheduling the forward would have to finish first)."""
    return torch.tensor(values).to(device, non_blocking=True)
