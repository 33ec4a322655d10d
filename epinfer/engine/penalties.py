"""What a request's sampling parameters do to a step's logits before sampling: its end ids at -inf
until `min_tokens` are out, and the ids that would end a bad word (`hold`); every token outside the
ones it may sample (`allowed_token_ids`, a guided choice's, a grammar's next tokens) at -inf
(`allow`), its `logit_bias` added (`bias`), then the presence, frequency and repetition penalties (`penalize`;
vLLM's and transformers' arithmetic): for a row whose request sets any of them,

    logit = logit / r where positive, logit * r where not, for each token of the prompt or the output
    logit -= f * (times the token was generated) + p * (whether it was)

with r = repetition_penalty, f = frequency_penalty, p = presence_penalty. Each such request keeps its
counts on the device (`PenaltyCounts`), brought up to date with the tokens the host has seen; a token
sampled by the step still in flight (async scheduling) is added from the device, so the penalties
are those of the synchronous loop. Rows without penalties cost nothing.
"""

from __future__ import annotations

import torch

from epinfer.engine.bad_words import banned
from epinfer.engine.guided import TokenSet
from epinfer.runner.sampler import host_list_on


class PenaltyCounts:
    """One request's tokens on the device: which its prompt holds, and how often each of its output
    tokens the host has seen so far occurs."""

    def __init__(self, prompt_ids: list[int], vocab: int, device: torch.device) -> None:
        self.prompt_V = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.prompt_V[host_list_on(device, prompt_ids)] = True
        self.counts_V = torch.zeros(vocab, dtype=torch.float32, device=device)
        self.counted = 0

    def catch_up(self, output_ids: list[int]) -> None:
        if len(output_ids) > self.counted:
            new = host_list_on(self.counts_V.device, output_ids[self.counted:])
            self.counts_V.index_add_(0, new, torch.ones(new.shape, device=new.device))
            self.counted = len(output_ids)


def hold(logits_SV: torch.Tensor, sampled: list, end_ids) -> torch.Tensor:
    """`logits_SV` with the rows of requests short of their `min_tokens` at -inf on their end ids
    (`end_ids(params)`: end-of-sequence and stop token ids), and of requests with bad words on the ids
    that would end one (`bad_words.banned`); the tensor itself when there are none (the common case)."""
    rows, ids = [], []
    for row, seq in enumerate(sampled):
        p = seq.params
        held = list(end_ids(p)) if len(seq.output_ids) + seq.pending < p.min_tokens else []
        held += banned(seq.bad_ids, seq.output_ids) if seq.bad_ids else []
        held = [t for t in held if t < logits_SV.shape[-1]]
        rows += [row] * len(held)
        ids += held
    if not rows:
        return logits_SV
    index = torch.tensor([rows, ids]).to(logits_SV.device, non_blocking=True)
    return logits_SV.index_put((index[0], index[1]), torch.tensor(float("-inf"), device=logits_SV.device))


def bias(logits_SV: torch.Tensor, sampled: list) -> torch.Tensor:
    """`logits_SV` with each request's `logit_bias` added (the tensor itself when none has one)."""
    rows, ids, values = [], [], []
    for row, seq in enumerate(sampled):
        for token, value in (seq.params.logit_bias or {}).items():
            rows.append(row)
            ids.append(token)
            values.append(value)
    if not rows:
        return logits_SV
    dev = logits_SV.device
    return logits_SV.index_put((host_list_on(dev, rows), host_list_on(dev, ids)),
                               host_list_on(dev, values).to(logits_SV.dtype), accumulate=True)


# a set of more ids than this goes to the device as its bit mask, fewer as ids (an H100, 256 rows of 1,000 ids: 3.2
# ms a step either way; of 30,000 or 100,000: 5.1 and 4.3 ms as masks, 22.8 and 48.0 one row at a time;
# benchmarks/mask_cost.py, RESULTS.md)
BITS_FROM = 2048


def allow(logits_SV: torch.Tensor, rows: list[tuple[int, object]]) -> torch.Tensor:
    """`logits_SV` with every token but the listed ones at -inf in each (row, ids) of `rows` (the
    tensor itself when there are none). ids: a list or a host tensor of them, or a `TokenSet` (a
    guide state's, whose bit mask is made once). Two copies to the device a step for any number of
    rows: the bit masks of the sets of more than `BITS_FROM` ids, 8 ids a byte (a broad guide state
    allows most of the vocabulary: as ids, 1.2 MB a row), and the (row, id) pairs of the rows of
    fewer; a row of more ids that is not a set (rare) is a copy of its own."""
    if not rows:
        return logits_SV
    dev, V = logits_SV.device, logits_SV.shape[-1]
    pin = dev.type == "cuda"
    keep = torch.zeros(len(rows), V, dtype=torch.bool, device=dev)
    masked = [isinstance(ids, TokenSet) and len(ids.ids) > BITS_FROM for _, ids in rows]
    masks = [(j, ids.bits()) for j, (_, ids) in enumerate(rows) if masked[j]]
    listed = [(j, ids.ids if isinstance(ids, TokenSet) else torch.as_tensor(ids, dtype=torch.long))
              for j, (_, ids) in enumerate(rows) if not masked[j]]
    if masks:
        width = -(-V // 8)
        host = torch.nn.utils.rnn.pad_sequence([bits[:width] for _, bits in masks], batch_first=True)
        host = torch.nn.functional.pad(host, (0, width - host.shape[1]))
        shifts = torch.arange(8, dtype=torch.uint8, device=dev)
        bits = ((host.pin_memory() if pin else host).to(dev, non_blocking=True)[:, :, None] >> shifts) & 1
        keep[host_list_on(dev, [j for j, _ in masks])] = bits.view(len(masks), -1)[:, :V].bool()  # (bit t: byte t // 8)
    for j, ids in listed:  # (many ids not remembered as a set: a guide's narrowed by allowed_token_ids)
        if len(ids) > BITS_FROM:
            keep[j, ids.to(dev, non_blocking=True)] = True
    listed = [(j, ids) for j, ids in listed if len(ids) <= BITS_FROM]
    if listed:
        at = torch.stack([torch.repeat_interleave(torch.tensor([j for j, _ in listed]),
                                                  torch.tensor([len(ids) for _, ids in listed])),
                          torch.cat([ids for _, ids in listed])])
        at = (at.pin_memory() if pin else at).to(dev, non_blocking=True)
        keep[at[0], at[1]] = True
    mask = torch.zeros(len(rows), V, dtype=logits_SV.dtype, device=dev).masked_fill_(~keep, float("-inf"))
    return logits_SV.index_add(0, host_list_on(dev, [r for r, _ in rows]), mask)


def penalize(logits_SV: torch.Tensor, sampled: list, prev_tokens: torch.Tensor | None) -> torch.Tensor:
    """`logits_SV` with the penalties of `sampled`'s requests applied (the tensor itself when none has
    any). `sampled`: the step's sampling sequences in row order; `prev_tokens`: the tokens the
    previous step sampled, where a sequence's `pending` token is (its `pending_row`)."""
    rows = [r for r, seq in enumerate(sampled) if seq.params.penalized]
    if not rows:
        return logits_SV
    dev, V = logits_SV.device, logits_SV.shape[-1]
    seqs = [sampled[r] for r in rows]
    for seq in seqs:
        if seq.penalty is None:
            seq.penalty = PenaltyCounts(seq.prompt_ids, V, dev)
        seq.penalty.catch_up(seq.output_ids)
    counts_RV = torch.stack([seq.penalty.counts_V for seq in seqs])
    waiting = [(i, seq.pending_row) for i, seq in enumerate(seqs) if seq.pending]
    if waiting:  # (async scheduling: sampled by the step in flight, not yet seen by the host)
        at = host_list_on(dev, [i for i, _ in waiting])
        counts_RV.index_put_((at, prev_tokens[host_list_on(dev, [row for _, row in waiting])]),
                             torch.ones(len(waiting), device=dev), accumulate=True)
    rows_R = host_list_on(dev, rows)
    x_RV = logits_SV[rows_R].float()
    rep_R1 = host_list_on(dev, [seq.params.repetition_penalty for seq in seqs])[:, None]
    seen_RV = torch.stack([seq.penalty.prompt_V for seq in seqs]) | (counts_RV > 0)
    x_RV = torch.where(seen_RV, torch.where(x_RV > 0, x_RV / rep_R1, x_RV * rep_R1), x_RV)
    x_RV = (x_RV - host_list_on(dev, [seq.params.frequency_penalty for seq in seqs])[:, None] * counts_RV
            - host_list_on(dev, [seq.params.presence_penalty for seq in seqs])[:, None] * (counts_RV > 0).float())
    return logits_SV.index_put((rows_R,), x_RV.to(logits_SV.dtype))
