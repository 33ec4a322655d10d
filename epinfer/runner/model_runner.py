"""Model runner: loads the model, owns the cache tensors, turns a step plan into a
`ForwardBatch`, runs the forward and returns logits of the rows to sample."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from epinfer.config import ModelConfig
from epinfer.engine.cache import CacheLayout, CacheTensors
from epinfer.engine.scheduler import ScheduledSeq
from epinfer.models.causal_lm import CausalLM
from epinfer.models.loader import load_checkpoint
from epinfer.runner.batch import ForwardBatch, SeqSlice


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(cfg: ModelConfig, folder: Path | None, dtype: torch.dtype,
                device: torch.device) -> CausalLM:
    """Construct on `device` in `dtype` and load `folder` (random init when folder is None)."""
    with _default_dtype(dtype), torch.device(device):
        model = CausalLM(cfg)
    model.rotary.inv_freq = model.rotary.inv_freq.float()
    if folder is not None:
        load_checkpoint(model, folder, cfg)
    return model.eval()


class ModelRunner:
    def __init__(self, model: CausalLM, layout: CacheLayout, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model = model
        self.cfg = model.config
        self.layout = layout
        self.device = device
        self.cache = CacheTensors(self.cfg, layout, dtype, device)

    def build_batch(self, plan: list[ScheduledSeq], pad_to: int | None = None) -> ForwardBatch:
        ids: list[int] = []
        positions: list[int] = []
        kv_slots: list[int] = []
        seqs: list[SeqSlice] = []
        logits_rows: list[int] = []
        bs = self.layout.block_size
        for item in plan:
            seq, start = item.seq, item.seq.num_computed
            if seq.device_blocks is None:
                seq.device_blocks = torch.tensor(seq.block_ids, dtype=torch.long, device=self.device)
            row = len(ids)
            ids.extend(seq.token_slice(start, start + item.num_new))
            pos = range(start, start + item.num_new)
            positions.extend(pos)
            kv_slots.extend(seq.block_ids[p // bs] * bs + p % bs for p in pos)
            seqs.append(SeqSlice(row, item.num_new, start, seq.state_slot, seq.device_blocks))
            if item.samples:
                logits_rows.append(row + item.num_new - 1)
        real = len(ids)
        pad = max(0, (pad_to or real) - real)
        ids.extend([0] * pad)
        positions.extend([0] * pad)
        kv_slots.extend([-1] * pad)

        def t(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.device)

        batch = ForwardBatch(t(ids), t(positions), t(kv_slots), seqs, t(logits_rows), real)
        return batch.finalize(self.device)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.model(batch, self.cache.per_layer)
        return self.model.compute_logits(hidden[batch.logits_rows])
