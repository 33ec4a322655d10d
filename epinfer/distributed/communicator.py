"""The communicator: the only place `torch.distributed` collectives are issued.

Every call names its group explicitly and carries a label (`layer.3.moe.dispatch`, `dp.sync`, …);
hooks (the collective ledger, the pre-flight check) see each call before and after it runs, so
diagnostics attach here without touching call sites. Groups of one member issue nothing.

Variable-size gather / reduce-scatter are built from the uniform ops by padding every rank's rows
to the largest size, because Gloo's list all_gather rejects unequal sizes; the per-rank sizes come
from the step's DP decision, and `sizes[rank] == local rows` is checked before every such call.
Several tensors travel in one collective as byte views packed along the row axis.

Plugins: everything else that watches or bends collectives is a plugin, attached by the runtime
(`add_plugin`), never a branch here. A plugin is an object with any of these methods, each an
extension point called in attachment order:
  before(call) / after(call)        around every collective (the ledger, the fingerprint pre-check,
                                    the server's skew probe); `before` may raise to stop the call
  payload(op, label, step, x)       what a device collective sends: x, another tensor, or None to
                                    skip it (fault injection only)
  replayed(name, schedule, step, done)   a CUDA graph holding collectives was launched
  at_moe_dispatch(step, dispatcher, x, sizes)   called by every MoE dispatch (fault injection)
  at_step(step) / at_logits(step, logits)       called by the lockstep loop (fault injection)
With no plugin the call is the collective alone; the runtime always attaches the ledger.

With `--symm-mem` on CUDA, small all-gathers, reduce-scatters and all-reduces of the TP and EP groups
go through a symmetric-memory buffer (`symmetric.py`) instead of NCCL; the choice depends only on
sizes every rank shares, so all ranks make it alike, and labels and plugins are unchanged.
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
    device: bool = True  # a device-group collective (False: the CPU twin)


EXTENSION_POINTS = ("before", "after", "payload", "replayed", "at_moe_dispatch", "at_step", "at_logits")


class Communicator:
    def __init__(self) -> None:
        self.plugins: list = []
        self._at: dict[str, list] = {name: [] for name in EXTENSION_POINTS}  # plugins by extension point
        self.step = -1  # the DP step id the next collectives belong to
        self.schedule: list | None = None  # collectives being captured into a CUDA graph
        self.fast: dict[str, symmetric.SymmetricBuffer] = {}  # group name -> its symmetric buffer

    def add_plugin(self, plugin) -> None:
        """Attach `plugin` after those already attached (see the module docstring)."""
        self.plugins.append(plugin)
        for name, attached in self._at.items():
            if callable(getattr(plugin, name, None)):
                attached.append(plugin)

    def remove_plugin(self, plugin) -> None:
        self.plugins.remove(plugin)
        for attached in self._at.values():
            if plugin in attached:
                attached.remove(plugin)

    def at(self, point: str) -> list:
        """The plugins attached to extension point `point` (empty without diagnostics)."""
        return self._at[point]

    def enable_symmetric(self, groups: Sequence[Group], device: torch.device, max_bytes: int,
                         timeout_s: float) -> None:
        """Symmetric buffers for `groups` (`--symm-mem` on CUDA, which every rank has agreed on at
        start). A collective: every rank calls it with its own groups, in the same order."""
        if not symmetric.available(device):
            return
        for group in groups:
            if group.size > 1 and group.name not in self.fast:
                self.fast[group.name] = self._run(
                    "rendezvous", f"symm.{group.name}", group, [], device=False,
                    fn=lambda g=group: symmetric.SymmetricBuffer(g, device, max_bytes, timeout_s))

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
        after it) says when it has run. One plugin call per replay."""
        for plugin in self._at["replayed"]:
            plugin.replayed(name, schedule, self.step, done)

    def _payload(self, op: str, label: str, x: torch.Tensor) -> tuple[bool, torch.Tensor]:
        """(skip this collective?, the tensor to send): what the `payload` plugins make of x."""
        for plugin in self._at["payload"]:
            sent = plugin.payload(op, label, self.step, x)
            if sent is None:
                return True, x
            x = sent
        return False, x

    def _run(self, op: str, label: str, group: Group, tensors: Sequence[torch.Tensor],
             fn: Callable[[], object], sizes: list[int] | None = None, device: bool = True, path: str = "nccl"):
        call = CollectiveCall(op, label, group, [tuple(t.shape) for t in tensors],
                              [str(t.dtype).removeprefix("torch.") for t in tensors], sizes, self.step,
                              path=path, device=device)
        if self.schedule is not None:
            self.schedule.append(call)
            return fn()
        for plugin in self._at["before"]:
            plugin.before(call)
        call.t_enqueue = time.time()
        result = fn()
        call.t_done = time.time()
        for plugin in self._at["after"]:
            plugin.after(call)
        return result

    # --- tensor collectives (device group) -------------------------------------------------

    def all_reduce(self, x: torch.Tensor, group: Group, label: str) -> torch.Tensor:
        if group.size == 1:
            return x
        skip, x = self._payload("all_reduce", label, x)
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
        skip, x = self._payload("all_gather", label, x)
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
        skip, padded = self._payload("all_gatherv", label, padded)
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
        skip, x = self._payload("reduce_scatter", label, x)
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
        skip, padded = self._payload("reduce_scatterv", label, padded)
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
        skip, x = self._payload("all_to_all", label, x)
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

