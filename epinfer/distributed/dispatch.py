"""MoE token dispatchers over the EP group (all ranks), chosen by name with `--dispatch`.

Each is called with this rank's rows `x [R, D]`, their top-k weights / ids, the number of real
rows (the rest are padding) and the per-EP-rank row counts `sizes` from the step's DP decision,
and returns the MoE output for the same R rows. All collectives are labelled `<layer>.moe.*`.

  - agrs: all-gather rows + weights + ids in ONE packed collective, compute the local experts over
    every rank's rows, reduce-scatter the partial sums back. Uniform sizes use the plain
    collectives; unequal sizes (`--dp-padding none`) the size-checked v-variants. The Triton
    routers write top-k straight into the packed rows (`route_into`) and the experts read the
    gathered rows in place, so packing costs one copy of x (at decode each small kernel costs
    about as much as a collective).
  - alltoall: exchange per-destination pair counts, send each routed (row, k) pair only to the
    rank owning its expert (padding rows are not sent), compute, send results back, sum.
  - naive: all-reduce based reference (slow on purpose): every rank scatters its rows into a
    global buffer, one all-reduce shares them, each computes its experts, a second all-reduce sums.
"""

from __future__ import annotations

import torch

from epinfer.core.layout import DISPATCHERS
from epinfer.distributed.communicator import pack_rows, row_layout, row_views
from epinfer.distributed.parallel import split_evenly


class Dispatcher:
    def __init__(self, ctx, label: str) -> None:
        self.comm = ctx.comm
        self.group = ctx.groups.ep_group
        self.label = label

    def route_into(self, x_RD: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Where the router may write (weights, ids) for this call, or None: its own tensors."""
        return None

    def begin(self, x_RD: torch.Tensor, sizes: list[int], step: int) -> None:
        """Every dispatch starts here: plugins at `at_moe_dispatch` see it (fault injection)."""
        for plugin in self.comm.at("at_moe_dispatch"):
            plugin.at_moe_dispatch(step, self, x_RD, sizes)

    def combine_probe(self, x_RD: torch.Tensor, sizes: list[int]) -> None:
        """The collective that follows this dispatcher's first one, on a zero buffer of its shape
        (used only by the `reorder` fault)."""
        zeros = x_RD.new_zeros((sum(sizes), x_RD.shape[1]))
        self.comm.reduce_scatterv(zeros, sizes, self.group, f"{self.label}.combine")

    def _check(self, rows: int, sizes: list[int]) -> None:
        if len(sizes) != self.group.size or sizes[self.group.rank] != rows:
            raise RuntimeError(f"{self.label}: EP rank {self.group.rank} has {rows} rows but the "
                               f"step's sizes say {sizes}")


class AgRsDispatcher(Dispatcher):
    def __init__(self, ctx, label: str) -> None:
        super().__init__(ctx, label)
        self._rows = None  # (packed rows, their field views) handed to this call's router

    @staticmethod
    def _fields(x_RD: torch.Tensor, top_k: int) -> list[tuple[torch.dtype, int]]:
        return [(x_RD.dtype, x_RD.shape[1]), (torch.int32, top_k), (x_RD.dtype, top_k)]  # x | ids | weights

    def route_into(self, x_RD, top_k):
        fields = self._fields(x_RD, top_k)
        packed = x_RD.new_empty((x_RD.shape[0], row_layout(fields)[0]), dtype=torch.uint8)
        self._rows = packed, row_views(packed, fields)
        _, ids, weights = self._rows[1]
        return weights, ids

    def __call__(self, x_RD, weights_RK, ids_RK, real_rows, sizes, experts):
        self._check(x_RD.shape[0], sizes)
        fields = self._fields(x_RD, ids_RK.shape[1])
        if self._rows is None or self._rows[0].shape[0] != x_RD.shape[0]:
            self.route_into(x_RD, ids_RK.shape[1])
        packed, (x_in, ids_in, w_in) = self._rows
        self._rows = None
        if weights_RK.data_ptr() != w_in.data_ptr():  # routed elsewhere (the torch router): pack here
            w_in.copy_(weights_RK)
            ids_in.copy_(ids_RK)
        x_in.copy_(x_RD)
        uniform = len(set(sizes)) == 1
        label = f"{self.label}.dispatch"
        if uniform:
            gathered = self.comm.all_gather(packed, self.group, label)
        else:
            gathered = self.comm.all_gatherv(packed, sizes, self.group, label)
        x_all, ids_all, w_all = row_views(gathered, fields)
        y_all = experts(x_all, w_all, ids_all)
        label = f"{self.label}.combine"
        if uniform:
            return self.comm.reduce_scatter(y_all, self.group, label)
        return self.comm.reduce_scatterv(y_all, sizes, self.group, label)


class AllToAllDispatcher(Dispatcher):
    def combine_probe(self, x_RD, sizes):
        ep = self.group.size
        self.comm.all_to_all(x_RD.new_zeros((0, x_RD.shape[1])), [0] * ep, [0] * ep, self.group,
                             f"{self.label}.dispatch")

    def __call__(self, x_RD, weights_RK, ids_RK, real_rows, sizes, experts):
        self._check(x_RD.shape[0], sizes)
        ep = self.group.size
        num_experts = experts.num_experts_total
        K = ids_RK.shape[1]
        ids = ids_RK[:real_rows].flatten()  # padding rows are never sent
        owner_of = torch.empty(num_experts, dtype=torch.long, device=x_RD.device)
        for r in range(ep):
            lo, hi = split_evenly(num_experts, ep, r)
            owner_of[lo:hi] = r
        dest = owner_of[ids]
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=ep)
        recv_counts = self.comm.all_to_all(send_counts.view(ep, 1), [1] * ep, [1] * ep, self.group,
                                           f"{self.label}.counts").view(ep)
        send, recv = send_counts.tolist(), recv_counts.tolist()  # host sync: split sizes
        pair_rows = torch.div(order, K, rounding_mode="floor")
        payload, fields = pack_rows([x_RD[pair_rows], weights_RK[:real_rows].flatten()[order, None],
                                     ids[order, None].to(torch.int32)])
        got = self.comm.all_to_all(payload, send, recv, self.group, f"{self.label}.dispatch")
        x_in, w_in, ids_in = row_views(got, fields)  # read in place, as agrs's gathered rows
        y = experts(x_in, w_in, ids_in)
        back = self.comm.all_to_all(y, recv, send, self.group, f"{self.label}.combine")
        out = torch.zeros_like(x_RD)
        out.index_add_(0, pair_rows, back)
        return out


class NaiveDispatcher(Dispatcher):
    def combine_probe(self, x_RD, sizes):
        self.comm.all_reduce(x_RD.new_zeros((sum(sizes), x_RD.shape[1])), self.group, f"{self.label}.combine")

    def __call__(self, x_RD, weights_RK, ids_RK, real_rows, sizes, experts):
        self._check(x_RD.shape[0], sizes)
        rank, rows = self.group.rank, x_RD.shape[0]
        offset = sum(sizes[:rank])
        D, K = x_RD.shape[1], ids_RK.shape[1]
        # fp32 carries hidden values, weights and expert ids (< 2^24) exactly through the sum
        shared = x_RD.new_zeros((sum(sizes), D + 2 * K), dtype=torch.float32)
        shared[offset:offset + rows] = torch.cat([x_RD.float(), weights_RK.float(), ids_RK.float()], 1)
        shared = self.comm.all_reduce(shared, self.group, f"{self.label}.dispatch")
        x_all = shared[:, :D].to(x_RD.dtype)
        w_all = shared[:, D:D + K].to(weights_RK.dtype)
        y_all = experts(x_all, w_all, shared[:, D + K:].long())
        y_all = self.comm.all_reduce(y_all, self.group, f"{self.label}.combine")
        return y_all[offset:offset + rows]


# the names live in core.layout.DISPATCHERS (what the command line offers and ParallelContext checks)
DISPATCHER_CLASSES = dict(zip(DISPATCHERS, (AgRsDispatcher, AllToAllDispatcher, NaiveDispatcher), strict=True))


def make_dispatcher(ctx, label: str) -> Dispatcher:
    return DISPATCHER_CLASSES[ctx.dispatch](ctx, label)
