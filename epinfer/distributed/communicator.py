"""The communicator: the only place `torch.distributed` collectives are issued.

Every call names its group explicitly and carries a label (`layer.3.moe.dispatch`, `dp.sync`, …);
hooks (the collective ledger, the pre-flight check) see each call before and after it runs, so
diagnostics attach here without touching call sites. Groups of one member issue nothing.

Variable-size gather / reduce-scatter are built from the uniform ops by padding every rank's rows
to the largest size, because Gloo's list all_gather rejects unequal sizes; the per-rank sizes come
from the step's DP decision, and `sizes[rank] == local rows` is checked before every such call.
Several tensors travel in one collective as byte views packed along the row axis.

With EPINFER_SYMM_MEM=1 on CUDA, small all-gathers, reduce-scatters and all-reduces of the TP and
EP groups go through a symmetric-memory buffer (`symmetric.py`) instead of NCCL; the choice depends
only on sizes every rank shares, so all ranks make it alike, and labels and hooks are unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from epinfer.distributed import symmetric
from epinfer.distributed.groups import Group
from epinfer.errors import UserError

# torch >= 2.13 renamed the tensor forms; the GPU machines run 2.11
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclasses.dataclass
class CollectiveCall:
    op: str
    label: str
    group: Group
    shapes: list[tuple[int, ...]]
    dtypes: list[str]
    sizes: list[int] | None = None
    step: int = -1
    t_enqueue: float = 0.0
    t_done: float = 0.0
    path: str = "nccl"  # "symm": through the group's symmetric-memory buffer


class CollectiveMismatch(RuntimeError):
    """Raised on every rank by the pre-flight check when ranks disagree about a collective."""


class Communicator:
    def __init__(self, precheck: bool = False) -> None:
        self.hooks: list = []  # objects with before(call) / after(call)
        self.precheck = precheck  # --check-collectives
        self.fault = None  # a FaultInjector on the one faulty rank (tests only)
        self.step = -1  # the DP step id the next collectives belong to
        self.schedule: list | None = None  # collectives being captured into a CUDA graph
        self.fast: dict[str, symmetric.SymmetricBuffer] = {}  # group name -> its symmetric buffer

    def enable_symmetric(self, groups: Sequence[Group], everyone: Group, device: torch.device,
                         timeout_s: float) -> None:
        """Symmetric buffers for `groups` (EPINFER_SYMM_MEM=1 on CUDA; otherwise nothing). A collective:
        every rank calls it with its own groups, in the same order; `everyone`: a CPU group of all ranks."""
        if device.type != "cuda" or everyone.size == 1:
            return
        # every rank must agree: a rank without the buffers would hang its peers' first collective
        want = torch.tensor([int(symmetric.wanted(device)), symmetric.MAX_BYTES, 1])
        total = self.all_reduce_cpu(want.clone(), everyone, "symm.agree")
        if total[0] not in (0, total[2]) or total[1] != total[2] * symmetric.MAX_BYTES:
            raise UserError("EPINFER_SYMM_MEM / EPINFER_SYMM_MEM_BYTES differ across ranks: set them alike")
        if not want[0]:
            return
        for group in groups:
            if group.size > 1 and group.name not in self.fast:
                self.fast[group.name] = self._run(
                    "rendezvous", f"symm.{group.name}", group, [], device=False,
                    fn=lambda g=group: symmetric.SymmetricBuffer(g, device, symmetric.MAX_BYTES, timeout_s))

    def release_symmetric(self) -> None:
        """Before the process groups go (after any CUDA graph that uses the buffers)."""
        self.fast.clear()

    @contextlib.contextmanager
    def recording(self, schedule: list):
        """Inside: collectives are captured into a CUDA graph, not run; each is appended to
        `schedule` instead of reaching the hooks (`replayed` reports them at every replay)."""
        self.schedule = schedule
        try:
            yield schedule
        finally:
            self.schedule = None

    def replayed(self, name: str, schedule: list, done) -> None:
        """A CUDA graph holding `schedule`'s collectives was launched; `done` (a CUDA event recorded
        after it) says when it has run. One hook call per replay."""
        for hook in self.hooks:
            if hasattr(hook, "replayed"):
                hook.replayed(name, schedule, self.step, done)

    def _inject(self, x: torch.Tensor) -> tuple[bool, torch.Tensor]:
        """Fault injection (tests only): (skip this collective?, the tensor to send)."""
        action = self.fault.take_pending() if self.fault is not None else None
        if action == "wrong-size":
            x = torch.cat([x, x.new_zeros((1, *x.shape[1:]))])
        return action == "skip-collective", x

    def _run(self, op: str, label: str, group: Group, tensors: Sequence[torch.Tensor],
             fn: Callable[[], object], sizes: list[int] | None = None, device: bool = True, path: str = "nccl"):
        call = CollectiveCall(op, label, group, [tuple(t.shape) for t in tensors],
                              [str(t.dtype).removeprefix("torch.") for t in tensors], sizes, self.step, path=path)
        if self.schedule is not None:
            self.schedule.append(call)
            return fn()
        if device and self.precheck:
            self._check_fingerprints(call)
        for hook in self.hooks:
            hook.before(call)
        call.t_enqueue = time.time()
        result = fn()
        call.t_done = time.time()
        for hook in self.hooks:
            hook.after(call)
        return result

    # --- tensor collectives (device group) -------------------------------------------------

    def _check_fingerprints(self, call: CollectiveCall) -> None:
        """Ranks exchange (op, label, dtypes, shapes, sizes) over the CPU group before the device
        collective; on any difference every rank raises the same error instead of hanging."""
        shapes = [s[1:] for s in call.shapes] if call.op == "all_to_all" else call.shapes
        mine = (call.op, call.label, call.dtypes, shapes, None if call.op == "all_to_all" else call.sizes)
        prints: list = [None] * call.group.size
        dist.all_gather_object(prints, mine, group=call.group.cpu_group)
        if all(p == prints[0] for p in prints):
            return
        keys = [repr(p) for p in prints]
        majority = max(set(keys), key=keys.count)
        odd = [call.group.ranks[i] for i, k in enumerate(keys) if k != majority]
        fields = ("op", "label", "dtypes", "shapes", "sizes")
        ref = prints[keys.index(majority)]
        diffs = []
        for i, p in enumerate(prints):
            if keys[i] != majority:
                diffs += [f"rank {call.group.ranks[i]} {f}={p[j]!r} (others {ref[j]!r})"
                          for j, f in enumerate(fields) if p[j] != ref[j]]
        raise CollectiveMismatch(f"collective mismatch in {call.group.name} before {ref[1]}: ranks {odd} "
                                 f"differ: {'; '.join(diffs[:4])}")

    def all_reduce(self, x: torch.Tensor, group: Group, label: str) -> torch.Tensor:
        if group.size == 1:
            return x
        skip, x = self._inject(x)
        if skip:
            return x
        fast = self._fast(group, x, summing=True)
        if fast is not None:
            out = x if x.is_contiguous() else torch.empty_like(x, memory_format=torch.contiguous_format)
            self._run("all_reduce", label, group, [x], lambda: fast.sum(x, out), path="symm")
            return x if out is x else x.copy_(out)
        self._run("all_reduce", label, group, [x],
                  lambda: dist.all_reduce(x, group=group.device_group))
        return x

    def all_gather(self, x: torch.Tensor, group: Group, label: str) -> torch.Tensor:
        """Uniform rows: returns [size * rows, ...] in rank order."""
        if group.size == 1:
            return x
        skip, x = self._inject(x)
        out = x.new_zeros((group.size * x.shape[0], *x.shape[1:]))
        if skip:
            return out
        fast = self._fast(group, x)
        self._run("all_gather", label, group, [x], lambda: self._gather(out, x, group, fast), path=_path(fast))
        return out

    def all_gatherv(self, x: torch.Tensor, sizes: list[int], group: Group, label: str) -> torch.Tensor:
        """Rank r contributes sizes[r] rows; returns [sum(sizes), ...] in rank order."""
        _check_sizes(sizes, x, group, label)
        if group.size == 1:
            return x
        width = max(sizes)
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[: x.shape[0]] = x
        skip, padded = self._inject(padded)
        out = x.new_zeros((group.size * padded.shape[0], *x.shape[1:]))
        if skip:
            return torch.cat([out[r * width: r * width + n] for r, n in enumerate(sizes)])
        fast = self._fast(group, padded)
        self._run("all_gatherv", label, group, [padded], sizes=sizes, path=_path(fast),
                  fn=lambda: self._gather(out, padded, group, fast))
        return torch.cat([out[r * width: r * width + n] for r, n in enumerate(sizes)])

    def reduce_scatter(self, x: torch.Tensor, group: Group, label: str) -> torch.Tensor:
        """Uniform: x is [size * rows, ...]; returns the sum of every rank's block `rank`."""
        if group.size == 1:
            return x
        skip, x = self._inject(x)
        out = x.new_zeros((x.shape[0] // group.size, *x.shape[1:]))
        if skip:
            return out
        fast = self._fast(group, x, summing=True)
        self._run("reduce_scatter", label, group, [x], lambda: self._scatter_sum(out, x, group, fast),
                  path=_path(fast))
        return out

    def reduce_scatterv(self, x: torch.Tensor, sizes: list[int], group: Group, label: str) -> torch.Tensor:
        """x is [sum(sizes), ...]; returns the sum over ranks of rows of block `rank`, [sizes[rank], ...]."""
        assert x.shape[0] == sum(sizes), f"{label}: {x.shape[0]} rows for sizes {sizes}"
        if group.size == 1:
            return x
        width = max(sizes)
        padded = x.new_zeros((group.size * width, *x.shape[1:]))
        offset = 0
        for r, n in enumerate(sizes):
            padded[r * width: r * width + n] = x[offset: offset + n]
            offset += n
        skip, padded = self._inject(padded)
        out = x.new_zeros((padded.shape[0] // group.size, *x.shape[1:]))
        if skip:
            return out[: sizes[group.rank]]
        fast = self._fast(group, padded, summing=True)
        self._run("reduce_scatterv", label, group, [padded], sizes=sizes, path=_path(fast),
                  fn=lambda: self._scatter_sum(out, padded, group, fast))
        return out[: sizes[group.rank]]

    def _fast(self, group: Group, x: torch.Tensor, summing: bool = False):
        """The group's symmetric buffer if it takes this collective (sizes and dtypes every rank shares)."""
        fast = self.fast.get(group.name)
        if fast is None or not (fast.can_sum(x) if summing else fast.can_gather(x)):
            return None
        return fast

    @staticmethod
    def _gather(out: torch.Tensor, x: torch.Tensor, group: Group, fast) -> None:
        if fast is not None:
            fast.all_gather(x, out)
        else:
            _all_gather_tensor(out, x.contiguous(), group=group.device_group)

    @staticmethod
    def _scatter_sum(out: torch.Tensor, x: torch.Tensor, group: Group, fast) -> None:
        """out = block `group.rank` of the sum over ranks of x [size * rows, ...]."""
        if fast is not None:
            rows = out.shape[0]
            out.copy_(fast.sum(x)[group.rank * rows:(group.rank + 1) * rows])
        else:
            _reduce_scatter_tensor(out, x.contiguous(), group=group.device_group)

    def all_to_all(self, x: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], group: Group,
                   label: str) -> torch.Tensor:
        """Row all-to-all: send_sizes[r] rows to rank r, receive recv_sizes[r] rows from rank r."""
        assert x.shape[0] == sum(send_sizes), f"{label}: {x.shape[0]} rows for sends {send_sizes}"
        if group.size == 1:
            return x
        skip, x = self._inject(x)
        out = x.new_zeros((sum(recv_sizes), *x.shape[1:]))
        if skip:
            return out
        self._run("all_to_all", label, group, [x], sizes=send_sizes,
                  fn=lambda: dist.all_to_all_single(out, x.contiguous(), recv_sizes, send_sizes,
                                                    group=group.device_group))
        return out

    # --- control collectives (CPU group) ---------------------------------------------------

    def all_reduce_cpu(self, x: torch.Tensor, group: Group, label: str) -> torch.Tensor:
        if group.size == 1:
            return x
        self._run("all_reduce", label, group, [x], lambda: dist.all_reduce(x, group=group.cpu_group),
                  device=False)
        return x

    def broadcast_object(self, obj: object, src: int, group: Group, label: str) -> object:
        """`src` is the index inside the group."""
        if group.size == 1:
            return obj
        box = [obj if group.rank == src else None]
        global_src = group.ranks[src]
        self._run("broadcast", label, group, [],
                  lambda: dist.broadcast_object_list(box, src=global_src, group=group.cpu_group),
                  device=False)
        return box[0]

    def gather_object(self, obj: object, dst: int, group: Group, label: str) -> list | None:
        if group.size == 1:
            return [obj]
        box = [None] * group.size if group.rank == dst else None
        self._run("gather", label, group, [],
                  lambda: dist.gather_object(obj, box, dst=group.ranks[dst], group=group.cpu_group),
                  device=False)
        return box


def _path(fast) -> str:
    return "nccl" if fast is None else "symm"


def _check_sizes(sizes: list[int], x: torch.Tensor, group: Group, label: str) -> None:
    if len(sizes) != group.size or sizes[group.rank] != x.shape[0]:
        raise RuntimeError(f"{label}: rank {group.rank} of {group.name} has {x.shape[0]} rows but the "
                           f"step's sizes say {sizes}")


def pack_rows(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[torch.dtype, int]]]:
    """[R, ...] tensors of any dtypes as one [R, bytes] uint8 tensor laid out by `row_layout`, and its
    (dtype, width) fields: `row_views` gives the tensors back, as views."""
    rows = tensors[0].shape[0]
    fields = [(t.dtype, math.prod(t.shape[1:])) for t in tensors]
    packed = tensors[0].new_empty((rows, row_layout(fields)[0]), dtype=torch.uint8)
    for view, t in zip(row_views(packed, fields), tensors, strict=True):
        view.copy_(t.reshape(rows, view.shape[1]))
    return packed, fields


def row_layout(fields: Sequence[tuple[torch.dtype, int]]) -> tuple[int, list[int]]:
    """(bytes per row, each field's byte offset) of packed rows holding (dtype, width) fields in
    order: each field aligned to its item size, rows to 16 bytes, so every field can be viewed in
    place (`row_views`)."""
    offsets, at = [], 0
    for dtype, width in fields:
        at = -(-at // dtype.itemsize) * dtype.itemsize
        offsets.append(at)
        at += width * dtype.itemsize
    return -(-at // 16) * 16, offsets


def row_views(packed: torch.Tensor, fields: Sequence[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    """Row-strided views [R, width] of each field of packed rows [R, bytes] laid out by `row_layout`
    (no copies: kernels that take a row stride read them where they are)."""
    _, offsets = row_layout(fields)
    return [packed[:, at: at + width * dtype.itemsize].view(dtype)
            for (dtype, width), at in zip(fields, offsets, strict=True)]

