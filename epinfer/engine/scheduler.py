"""Continuous-batching scheduler (pure Python, no tensors).

Each step it plans, within `max_num_batched_tokens`: one token for every running sequence that is
decoding, then the next chunk of every running sequence still prefilling, then admits waiting
requests in arrival order while a sequence slot and cache room for the whole request exist (with
prefix caching, a request starts after the longest cached prefix of its prompt: see `cache`). A
long prompt is prefilled over several steps (chunked prefill); prefill and decode of different
requests share a step.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable

from epinfer.core.sampling_params import SamplingParams
from epinfer.engine.cache import CacheAllocator, block_hashes, reusable_blocks


@dataclasses.dataclass(eq=False)
class Sequence:
    index: int  # request index (input order)
    prompt_ids: list[int]
    params: SamplingParams
    max_total_len: int  # prompt + max generated tokens, capped by the max model length
    output_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0  # tokens whose cache entries exist
    block_ids: list[int] = dataclasses.field(default_factory=list)
    state_slot: int = -1
    finish_reason: str | None = None
    stop_text_end: int | None = None  # text is cut here when a stop string matched
    stop_search: object = None  # engine.stops.StopSearch, made at its first stop-string check
    generator: object = None  # torch.Generator for seeded sampling
    penalty: object = None  # engine.penalties.PenaltyCounts, made at its first penalized step
    guide: object = None  # engine.json_mode.JsonGuide of a JSON-mode or schema request (`restrict.json_guide`)
    allowed: object = None  # engine.guided.TokenSet of a long allowed_token_ids (`restrict.allowed_rows`)
    bad_ids: list = dataclasses.field(default_factory=list)  # its bad words' token sequences (`engine.bad_words`)
    nan_logits: bool = False  # the model produced a non-finite logit for it
    error: str | None = None  # why it failed, when finish_reason is "error"
    error_status: int = 500  # 400: the request's own constraints failed it (a guide no token continues)
    # async scheduling: tokens sampled on the device but not yet seen by the host (0 or 1 at plan
    # time), the row of the last one in its step's sampled tokens, and whether that one is the
    # request's last by count (max tokens / length): then it is not scheduled again
    pending: int = 0
    pending_row: int = -1
    final: bool = False
    # prefix caching: the hash chain of the prompt's full blocks, how many of them are registered
    # in the cache, and whether the runner has this sequence's block list yet
    block_hashes: list[int] = dataclasses.field(default_factory=list)
    registered: int = 0
    blocks_sent: bool = False
    # hybrid models: block counts at whose end its state is to be snapshot (ascending), and the
    # snapshot its state starts from (restored before its first chunk), or -1, and the chain hash
    # of the latest snapshot on its way (the one it started from, then each it took)
    snapshot_at: list[int] = dataclasses.field(default_factory=list)
    restore: int = -1
    last_snapshot: int | None = None
    # snapshots the chunk in flight captures inside itself: (block count, snapshot index, or None
    # when that state is kept already)
    capturing: list[tuple[int, int | None]] = dataclasses.field(default_factory=list)
    # params.prompt_logprobs: per prompt position, (logprob, rank, [(id, logprob) of the top N]) of
    # its token given the ones before (position 0: None), filled as its chunks run
    prompt_logprobs: list | None = None

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all computed yet (so no cached prefix is reused)."""
        lp = self.prompt_logprobs
        return self.params.prompt_logprobs is not None and (lp is None or any(r is None for r in lp[1:]))

    @property
    def prompt_logprobs_out(self) -> list | None:
        """The prompt logprobs to report: None unless asked for."""
        if self.params.prompt_logprobs is None:
            return None
        return self.prompt_logprobs or [None] * len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        prompt_len = len(self.prompt_ids)
        if end <= prompt_len:
            return self.prompt_ids[start:end]
        if start >= prompt_len:  # decoding: no copy of the whole sequence per step
            return self.output_ids[start - prompt_len:end - prompt_len]
        return (self.prompt_ids + self.output_ids)[start:end]


@dataclasses.dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens, so a next token is sampled."""
        return self.seq.num_computed + self.num_new == self.seq.num_tokens + self.seq.pending


class Scheduler:
    """`capture_rows` (hybrid models with prefix caching): the runner can capture a sequence's state
    this many rows (or a multiple) into a prompt chunk, so a snapshot point inside a chunk does not
    cut it (a cut chunk's tail waits for the next step, and so does the request's first token): the
    point moves back to the nearest such block boundary. 0: every snapshot point ends a chunk.
    `align()`: (rows, prompt length), the rule of `_aligned` for this step ((0, 0): none; the attention
    of `kernels.cudnn_attention` needs contexts from a few sizes)."""

    def __init__(self, allocator: CacheAllocator, max_num_seqs: int, max_num_batched_tokens: int,
                 capture_rows: int = 0, align: Callable[[], tuple[int, int]] = lambda: (0, 0)):
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.capture_rows = capture_rows
        self.alignment = align
        self.align = self.long_prompt = 0  # `_aligned`'s, read from `alignment` each step
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.snapshots: list[tuple[int, int]] = []  # (state slot, snapshot index) taken, not yet planned

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        self.align, self.long_prompt = self.alignment()
        plan: list[ScheduledSeq] = []
        decoding = [s for s in self.running if s.num_computed >= len(s.prompt_ids)]
        prefilling = [s for s in self.running if s.num_computed < len(s.prompt_ids)]
        chunked = False  # a prompt chunk is planned
        for seq in decoding + prefilling:
            if seq.final:
                continue
            n = self._aligned(seq, seq.num_computed, min(seq.num_tokens + seq.pending - seq.num_computed, budget),
                              chunked)
            n = self._chunk(seq, n) if n > 0 else 0  # (a chunk of 0 moves no snapshot point)
            if n > 0:
                plan.append(ScheduledSeq(seq, n))
                budget -= n
                chunked |= seq.num_computed < len(seq.prompt_ids)
        alloc = self.allocator
        bs = alloc.layout.block_size
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if alloc.prefix_caching and not seq.block_hashes:
                seq.block_hashes = block_hashes(seq.prompt_ids, bs)
            last = 0 if seq.wants_prompt_logprobs else reusable_blocks(len(seq.prompt_ids), bs)
            prefix = alloc.match(seq.block_hashes[:last])
            if alloc.needs_state:  # only as far as a kept state; snapshots where it branches off and at its end
                kept, index = alloc.with_state(seq.block_hashes, len(prefix))
                seq.restore = -1 if index is None else index
                seq.last_snapshot = seq.block_hashes[kept - 1] if index is not None else None
                seq.snapshot_at = sorted({b for b in (len(prefix), last) if b > kept})
                prefix = prefix[:kept]
            start = len(prefix) * bs
            n = self._aligned(seq, start, min(len(seq.prompt_ids) - start, budget), chunked)
            if n == 0 or not alloc.can_allocate(seq.max_total_len, prefix):
                break
            self.waiting.popleft()
            seq.block_ids, seq.state_slot = alloc.allocate(seq.max_total_len, prefix, len(seq.prompt_ids))
            seq.registered = len(prefix)
            seq.num_computed = start
            if seq.last_snapshot is not None:
                alloc.restored(seq.last_snapshot)
            self.running.append(seq)
            n = self._chunk(seq, n)
            plan.append(ScheduledSeq(seq, n))
            budget -= n
            chunked = True
        return plan

    def _aligned(self, seq: Sequence, start: int, n: int, chunked: bool) -> int:
        """`n` new tokens from `start`, or fewer: a chunk of a long prompt that the budget cuts short
        ends at a multiple of `align` tokens, so that the context it leaves is one, where that gives
        up at most an eighth of the step's budget; where it leaves nothing, 0 (the prompt waits for a
        step with room), unless no other prompt chunk is planned (some prefill always progresses)."""
        end = start + n
        if not self.align or len(seq.prompt_ids) < self.long_prompt or end >= len(seq.prompt_ids):
            return n
        cut = max(end - end % self.align - start, 0)
        if n - cut > self.max_num_batched_tokens // 8 or (cut == 0 and not chunked):
            return n
        return cut

    def _chunk(self, seq: Sequence, n: int) -> int:
        """`n` new tokens, or fewer so that the chunk ends where the sequence's state is snapshot
        (unless the runner captures it inside the chunk). A chunk cut short by the budget before its
        next snapshot point ends a whole number of capture rows in, so the next one can capture, where
        that gives up at most an eighth of it (a large step's last admitted prompt; not a small
        budget's every chunk)."""
        bs, start = self.allocator.layout.block_size, seq.num_computed
        if (self.capture_rows and seq.snapshot_at and seq.snapshot_at[0] * bs > start + n
                and n < len(seq.prompt_ids) - start and n % self.capture_rows <= n // 8):
            n -= n % self.capture_rows
        while seq.snapshot_at and seq.snapshot_at[0] * bs < start + n:
            if not self._capture(seq, seq.snapshot_at[0]):
                return seq.snapshot_at[0] * bs - start
            seq.snapshot_at.pop(0)
        end = start + n
        if (self.capture_rows and seq.snapshot_at and end % bs == 0
                and seq.snapshot_at[0] * bs - end < self.capture_rows):
            seq.snapshot_at[0] = end // bs  # the next chunk could not capture it: taken at this one's end
        return n

    def _capture(self, seq: Sequence, blocks: int) -> bool:
        """Plans the capture of `seq`'s state inside its coming chunk at the last block boundary at
        or before `blocks` that lies a whole number of capture rows into the chunk; False when there
        is none or no snapshot index is free of other captures in flight."""
        bs, start, rows = self.allocator.layout.block_size, seq.num_computed, self.capture_rows
        if not rows:
            return False
        at = next((b for b in range(blocks, start // bs, -1) if (b * bs - start) % rows == 0), 0)
        if at * bs <= start:
            return False
        if any(b == at for b, _ in seq.capturing):  # two points moved back to one boundary
            return True
        chain_hash = seq.block_hashes[at - 1]
        if chain_hash in self.allocator.snapshots:  # kept already (or captured by another this step)
            seq.capturing.append((at, None))
            return True
        index = self.allocator.reserve_snapshot(chain_hash)
        if index is None:
            return False
        seq.capturing.append((at, index))
        return True

    def computed(self, seq: Sequence) -> None:
        """After a step: registers the prompt blocks `seq` has now filled, for later requests, and
        takes the snapshot of its state due here (copied before the next step runs)."""
        bs = self.allocator.layout.block_size
        full = min(seq.num_computed, len(seq.prompt_ids)) // bs
        while seq.registered < min(full, len(seq.block_hashes)):
            self.allocator.register(seq.block_ids[seq.registered], seq.block_hashes[seq.registered])
            seq.registered += 1
        for blocks, index in seq.capturing:  # captured by this step's forward
            if index is not None:
                self.allocator.ready(seq.block_hashes[blocks - 1])
            if seq.last_snapshot is not None:
                self.allocator.supersede(seq.last_snapshot)
            seq.last_snapshot = seq.block_hashes[blocks - 1]
        seq.capturing = []
        while seq.snapshot_at and seq.snapshot_at[0] * bs <= seq.num_computed:
            blocks = seq.snapshot_at.pop(0)
            if blocks * bs == seq.num_computed:
                if seq.last_snapshot is not None:  # passed: unless others start there, it goes first
                    self.allocator.supersede(seq.last_snapshot)
                index = self.allocator.take_snapshot(seq.block_hashes[blocks - 1])
                if index is not None:
                    self.snapshots.append((seq.state_slot, index))
                seq.last_snapshot = seq.block_hashes[blocks - 1]

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.block_ids, seq.state_slot)
