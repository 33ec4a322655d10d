"""What the engine hands the runner for one step: `StepPlan` (a replica's scheduled work, also sent
to its TP peers) of `SeqWork` items. The runner turns a plan into a `core.forward.ForwardBatch`."""

from __future__ import annotations

import dataclasses

PENDING = -1  # a token sampled in the previous step, still on the device (async scheduling)


@dataclasses.dataclass
class SeqWork:
    """One sequence's work in a step, as the replica's scheduler sends it to its TP peers."""

    tokens: list[int]  # the new tokens
    start: int  # position of tokens[0] (= tokens already cached)
    state_slot: int
    samples: bool  # the last row's logits are sampled
    new_blocks: list[int] | None = None  # the sequence's KV blocks, sent with its first chunk
    prev_row: int = -1  # tokens == [PENDING]: its row in the previous step's sampled tokens
    # GDN states captured inside this chunk into snapshot rows: (rows into the chunk, state row)
    captures: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    # prompt logprobs: the prompt token each row predicts (the first rows; none past the prompt) and
    # how many top logprobs a row reports
    targets: list[int] | None = None
    top: int = 0


@dataclasses.dataclass
class StepPlan:
    items: list[SeqWork]
    reset_slots: list[int]  # state slots freed since the last step: zeroed before this forward
    has_work: bool  # the replica has requests left (waiting, running or in flight)
    prev_sampled: int = 0  # rows sampled in the previous step (the size of its token tensor)
    # GDN state rows copied before the forward: snapshots (running slot -> snapshot row) first,
    # then the resets, then restores (snapshot row -> the slot of a sequence reusing a prefix)
    snapshots: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    restores: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def has_pending(self) -> bool:
        return any(w.prev_row >= 0 for w in self.items)

    @property
    def num_tokens(self) -> int:
        return sum(len(w.tokens) for w in self.items)
