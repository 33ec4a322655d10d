"""The forward metadata that layers read: `ForwardBatch`, what one forward pass computes, as flat
rows (built by the runner, read by attention, the gated delta net and the MoE).

Rows `[0, num_real_rows)` are real tokens of scheduled sequences, laid out sequence after sequence;
rows `[num_real_rows, num_rows)` are padding (data-parallel padding, later graph buckets). Padding
rows belong to no sequence: attention and the gated delta net compute nothing for them (their
output rows are zero), they write no cache (slot -1), and the MoE gives them weight 0. Sequences
are described once here, so every kernel agrees on what "number of tokens" means.

Shape suffixes: T rows, S sequences.
"""

from __future__ import annotations

import dataclasses

import torch


def graph_bucket(rows: int) -> int:
    """The decode graph size holding `rows` rows (before any limit): 1, 2, 4, 8, then multiples of
    16 up to 256 and of 32 beyond: 28 graphs up to 512 rows instead of 36, each about 0.3 s to
    capture at the Qwen3.5 shape on an H200. Kernels pick their tiles by it, so an eager step of any
    size reuses the captured variants."""
    if rows <= 8:
        return 1 << (rows - 1).bit_length()
    step = 16 if rows <= 256 else 32
    return -(-rows // step) * step


def aligned_device_rows(rows: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Int64 lists as device tensors in one copy without a stream sync, each starting 16-byte
    aligned (padded to an even length): Triton compiles a kernel per pointer alignment, and a
    row's alignment must not depend on how many sequences a step has."""
    flat, starts = [], []
    for row in rows:
        starts.append(len(flat))
        flat += row + [0] * (len(row) % 2)
    host = torch.tensor(flat, dtype=torch.long).to(device, non_blocking=True)
    return [host[s:s + len(row)] for s, row in zip(starts, rows, strict=True)]


@dataclasses.dataclass
class SeqSlice:
    """One sequence's part of the batch."""

    start: int  # first row of this sequence in the batch
    num_new: int  # rows (new tokens) this step
    context_len: int  # tokens of this sequence already in the cache before this step
    state_slot: int  # index into per-sequence state (GDN conv/recurrent state)
    block_ids: torch.Tensor  # KV cache blocks of this sequence (device, int32; a row of the block table)
    captures: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (rows in, GDN state row)

    @property
    def total_len(self) -> int:
        return self.context_len + self.num_new


@dataclasses.dataclass
class DecodeMeta:
    """A decode-only batch on the device fast path: row b is sequence b's one new token for
    b < S, rows past S are padding. Everything is a device tensor (CUDA-graph safe); padding rows
    point at the cache's scratch block / state slot, attend to nothing and are masked out."""

    state_slots_T: torch.Tensor  # [T] block-table row and GDN state slot (scratch for padding)
    seq_lens_T: torch.Tensor  # [T] tokens attended, the new one included; 0 for padding
    row_mask_T: torch.Tensor  # [T] bool, True for real rows
    block_table: torch.Tensor  # [slots + 1, max blocks] int32, the runner's persistent table


@dataclasses.dataclass
class PrefillMeta:
    """The sequences of a step that are not one-token decodes (prompt chunks), packed in row order:
    what the varlen prefill kernels read. Built once per step, shared by every layer."""

    seq_ids: list[int]  # indices into `ForwardBatch.seqs`
    lens: list[int]  # new rows of each
    rows: slice | torch.Tensor  # their rows in the batch (a slice when contiguous)
    state_slots: torch.Tensor  # [N] long
    fresh: torch.Tensor  # [N] bool: starts at position 0 (zero GDN state whatever the slot holds)
    # GDN states to capture inside the chunks (prefix caching): (sequence, rows into it, state row)
    captures: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    memo: dict = dataclasses.field(default_factory=dict)  # per-step index tensors a layer derives once


@dataclasses.dataclass
class ForwardBatch:
    input_ids_T: torch.Tensor  # [T] int64
    positions_T: torch.Tensor  # [T] int64
    kv_slots_T: torch.Tensor  # [T] flat KV cache row per token, -1 for padding
    seqs: list[SeqSlice]
    logits_rows: torch.Tensor  # [S_sampled] rows whose next token is sampled
    num_real_rows: int
    # sequences decoding a single token after earlier context: batched in the gated delta net
    decode_seq_ids: list[int] = dataclasses.field(default_factory=list)
    decode_rows: slice | torch.Tensor | None = None  # [S_dec] rows of those sequences (a slice when contiguous)
    decode_state_slots: torch.Tensor | None = None  # [S_dec]
    moe_sizes: list[int] | None = None  # rows per EP rank in the MoE dispatch (DP decision)
    step_id: int = -1  # the DP step id (-1 in single-process runs)
    decode: DecodeMeta | None = None  # set on the decode fast path (kernels take their sizes from it)
    decode_seq_lens: torch.Tensor | None = None  # [S_dec] tokens each decode row attends (mixed steps)
    block_table: torch.Tensor | None = None  # the runner's persistent table (rows: state slots)
    prefill: PrefillMeta | None = None  # the prompt chunks of a mixed or prefill step
    row_mask_T: torch.Tensor | None = None  # [T] bool, True for real rows, where the device holds it
    memo: dict = dataclasses.field(default_factory=dict)  # per-step index tensors a layer derives once

    @property
    def num_rows(self) -> int:
        return int(self.input_ids_T.shape[0])

    def finalize(self, device: torch.device) -> ForwardBatch:
        """Fill the derived decode index tensors (call once after `seqs` is complete)."""
        if self.decode is not None:  # every row (padding too) takes the batched decode path
            self.row_mask_T = self.decode.row_mask_T
            self.decode_seq_ids = list(range(self.num_rows))
            self.decode_rows = torch.arange(self.num_rows, device=device)
            self.decode_state_slots = self.decode.state_slots_T
            return self
        decoding = [s.num_new == 1 and s.context_len > 0 for s in self.seqs]
        self.decode_seq_ids = [i for i, d in enumerate(decoding) if d]
        dec = [self.seqs[i] for i in self.decode_seq_ids]
        self.decode_rows, self.decode_state_slots, self.decode_seq_lens = aligned_device_rows(
            [[s.start for s in dec], [s.state_slot for s in dec], [s.total_len for s in dec]], device)
        if all(s.start == i for i, s in enumerate(dec)):  # decodes come first in a step: views, not gathers
            self.decode_rows = slice(0, len(dec))
        chunks = [i for i, d in enumerate(decoding) if not d]
        if chunks:
            pre = [self.seqs[i] for i in chunks]
            lens = [s.num_new for s in pre]
            first, end = pre[0].start, pre[-1].start + pre[-1].num_new
            contiguous = end - first == sum(lens)
            rows = [r for s in pre for r in range(s.start, s.start + s.num_new)] if not contiguous else []
            slots, fresh, packed = aligned_device_rows(
                [[s.state_slot for s in pre], [int(s.context_len == 0) for s in pre], rows], device)
            self.prefill = PrefillMeta(chunks, lens, slice(first, end) if contiguous else packed, slots, fresh.bool(),
                                       [(j, r, row) for j, s in enumerate(pre) for r, row in s.captures])
        return self
