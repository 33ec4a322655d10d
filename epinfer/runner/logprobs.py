"""Prompt logprobs (`SamplingParams.prompt_logprobs`): for the rows of a prompt chunk, the logprob of
the prompt token each row predicts, its rank in the row's distribution and the row's top N, from the
hidden states of the forward that just ran (the LM head over those rows, a slice at a time, so a long
chunk never holds more than `ROWS` rows of vocabulary-wide logits)."""

from __future__ import annotations

import torch

from epinfer.runner.batch import StepPlan

ROWS = 256  # rows of float32 logits at once (256 x 248,320 vocabulary = 254 MB)


def prompt_logprobs(compute_logits, plan: StepPlan, hidden_TD: torch.Tensor) -> list[tuple[int, list]]:
    """[(item index, records)] for the items of `plan` with `targets`: one record a target, (logprob,
    rank, [(token id, logprob)] of the top `top`), rank 1 the most likely token. `hidden_TD`: the
    forward's rows, the items' tokens one after another (padding after them)."""
    out, row = [], 0
    for i, w in enumerate(plan.items):
        if w.targets:
            records = []
            targets = torch.tensor(w.targets, device=hidden_TD.device)
            for a in range(0, len(w.targets), ROWS):
                b = min(a + ROWS, len(w.targets))
                logprobs = torch.log_softmax(compute_logits(hidden_TD[row + a:row + b]).float(), dim=-1)
                chosen = logprobs.gather(1, targets[a:b, None])
                ranks = ((logprobs > chosen).sum(-1) + 1).tolist()
                if w.top:
                    values, ids = torch.topk(logprobs, w.top)
                    tops = [list(zip(t, v, strict=True)) for t, v in zip(ids.tolist(), values.tolist(), strict=True)]
                else:
                    tops = [[] for _ in ranks]
                records += zip(chosen[:, 0].tolist(), ranks, tops, strict=True)
            out.append((i, records))
        row += len(w.tokens)
    return out
