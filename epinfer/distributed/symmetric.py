"""Small device collectives through PyTorch symmetric memory (`--symm-mem`, experimental).

A decode step issues ~100 collectives of a few hundred KB at most, where NCCL's per-call latency,
not bandwidth, sets the cost (PERFORMANCE.md). On the GPUs of one host, each rank of a group can
instead map every peer's buffer and move the bytes itself over NVLink: no multicast (it stays
off on these machines), only peer pointers and signal-pad barriers.

  all-gather      copy my rows into my slot of my buffer, barrier, copy every peer's slot from
                  its buffer, barrier (no rank overwrites a slot a peer may still be reading)
  sum             copy into my buffer, then `one_shot_all_reduce_out`: every rank reads every
                  peer's buffer and adds, in rank order (the kernel boundary orders the copy before
                  the kernel's signals); the reduce-scatter keeps its block, the all-reduce all of it

The communicator decides per call (the same on every rank: sizes are uniform or padded) and keeps
labelling, the ledger and graph capture exactly as for NCCL; anything the buffer cannot take
(too large, a dtype the sum kernel lacks) goes to NCCL. Unmeasured until a 2-GPU run
(`benchmarks/comm_sweep.py` compares the primitives).
"""

from __future__ import annotations

import os

import torch

from epinfer.distributed.groups import Group

SUM_DTYPES = (torch.bfloat16, torch.float32)  # what the one-shot sum kernel takes


class SymmetricBuffer:
    """One group's symmetric buffer. Creating it is a collective over the group: every member
    creates its own at the same point."""

    def __init__(self, group: Group, device: torch.device, nbytes: int, timeout_s: float) -> None:
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")  # this path never needs it
        import torch.distributed._symmetric_memory as symm_mem

        self.rank, self.size, self.nbytes = group.rank, group.size, nbytes
        self.name = group.device_group.group_name
        if torch.__version__ < "2.11" and hasattr(symm_mem, "enable_symm_mem_for_group"):  # (deprecated since)
            symm_mem.enable_symm_mem_for_group(self.name)
        self.buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        self.handle = symm_mem.rendezvous(self.buf, self.name)
        # a barrier whose peer never arrives traps (killing this process's CUDA context): only after
        # the watchdog (which says which collective and rank) and the process group's own timeout
        self.timeout_ms = int((2 * timeout_s + 60) * 1000)
        self.summable = hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out")
        self._slots: dict[int, list[torch.Tensor]] = {}

    def _fits(self, nbytes: int) -> bool:
        return 0 < nbytes <= self.nbytes  # (the buffer is as large as the largest collective it takes)

    def can_gather(self, x: torch.Tensor) -> bool:
        return self._fits(x.numel() * x.element_size() * self.size)

    def can_sum(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return self.summable and x.dtype in SUM_DTYPES and nbytes % 16 == 0 and self._fits(nbytes)

    def _views(self, n: int) -> list[torch.Tensor]:
        """Slot r (n bytes at offset r * n) of rank r's buffer, for every rank r."""
        if n not in self._slots:
            self._slots[n] = [self.handle.get_buffer(r, (n,), torch.uint8, r * n) for r in range(self.size)]
        return self._slots[n]

    def all_gather(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out [size * rows, ...] = every rank's x [rows, ...] in rank order (any dtype, bytes copied)."""
        src = x.contiguous().view(-1).view(torch.uint8)
        dst = out.view(-1).view(torch.uint8)
        n = src.numel()
        slots = self._views(n)
        slots[self.rank].copy_(src)
        self.handle.barrier(channel=0, timeout_ms=self.timeout_ms)
        for r, slot in enumerate(slots):
            dst[r * n:(r + 1) * n].copy_(src if r == self.rank else slot)
        self.handle.barrier(channel=1, timeout_ms=self.timeout_ms)

    def sum(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The sum of every rank's x (same shape everywhere), into `out` (may be x) or a new tensor.
        The one-shot kernel has no timeout: a peer that dies inside it is the watchdog's to report."""
        staging = self.buf[: x.numel() * x.element_size()].view(x.dtype).view(x.shape)
        staging.copy_(x)
        out = torch.empty_like(staging) if out is None else out
        return torch.ops.symm_mem.one_shot_all_reduce_out(staging, "sum", self.name, out)


def available(device: torch.device) -> bool:
    """Whether symmetric-memory collectives can run here (CUDA, torch with symmetric memory)."""
    if device.type != "cuda":
        return False
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return False
    return True
