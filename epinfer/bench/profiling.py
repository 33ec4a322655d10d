"""Step-time breakdown for `epinfer bench`: where a decode step's time goes.

Two profiled passes over a few decode steps of the running batch:

1. eager (no CUDA graph), with a profiler range around each part of the model — attention, GDN,
   MoE router (+ top-k, sort), MoE experts, shared expert, dense MLP, LM head — and around sampling;
   each kernel counts for the innermost part that launched it (the MoE block's own kernels —
   gate, top-k, sort, gathers — are "moe_router"); kernels outside every part (norms, residual
   adds, embedding, rotary, metadata copies) are "other".
2. the step as it normally runs (CUDA graph replay where it applies): device-busy time per step;
   "host overhead" is the step's wall time minus that: scheduling, metadata, Python, the sampled
   tokens' copy back — time in which the GPU waits.

The parts are scaled so they sum to the normal step's device-busy time (eager kernels are the same
kernels as in the graph, but the graph has no launch gaps), and reported in ms per step.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

PARTS = {"self_attn": "attention", "linear_attn": "gdn", "experts": "moe_experts",
         "shared_expert": "moe_shared_expert", "lm_head": "lm_head"}


def _device_time(evt) -> float:
    t = getattr(evt, "device_time_total", None)  # (older torch: cuda_time_total)
    return t if t is not None else getattr(evt, "cuda_time_total", 0.0)


def _self_device(evt) -> float:
    t = getattr(evt, "self_device_time_total", None)
    return (t if t is not None else getattr(evt, "self_cuda_time_total", 0.0)) or 0.0


def _is_work(evt) -> bool:
    """A device-side event that is work (kernel, copy, memset): annotations (our `part.*` ranges,
    inductor's compiled-graph ranges) are spans over kernels counted on their own."""
    return (evt.device_type != torch.autograd.DeviceType.CPU and not evt.name.startswith("part.")
            and not getattr(evt, "is_user_annotation", False))


def _device_work(prof) -> dict[str, float]:
    """Device time (µs) by name of every device-side event of the profiled steps that is work, each
    once, whether or not host ops were profiled too."""
    by_name: dict[str, float] = {}
    for e in prof.events():
        if _is_work(e):
            by_name[e.name] = by_name.get(e.name, 0.0) + _device_time(e)
    return by_name


def _kernel_time(prof) -> float:
    """Total device time (µs) of the profiled steps."""
    return sum(_device_work(prof).values())


# Kernels the profile does not link to the CPU op that launched them (our Triton kernels, launched
# through the driver API) come as device events of their own: they are attributed by name.
TRITON_PARTS = (("_grouped_", "moe_experts"), ("_route_kernel", "moe_router"), ("_split_kernel", "attention"),
                ("_merge_kernel", "attention"), ("_rope_cache", "attention"), ("_gate_route", "moe_router"),
                ("_combine_kernel", "moe_experts"), ("_gdn", "gdn"), ("_conv", "gdn"),
                ("triton_", "compiled_small_ops"))


def _unlinked_part(name: str) -> str:
    return next((part for prefix, part in TRITON_PARTS if name.startswith(prefix)), "other")


def _by_part(prof) -> tuple[dict[str, float], float]:
    """Device time (µs) of the kernels launched inside each innermost `part.*` range, and in all."""
    events = prof.events()
    by_span = _by_device_span(events)
    if by_span is not None:
        return by_span
    parts: dict[str, float] = {}
    total = 0.0
    cpu_ids = {e.id for e in events if e.device_type == torch.autograd.DeviceType.CPU}
    for evt in events:
        if evt.device_type != torch.autograd.DeviceType.CPU:
            linked = getattr(evt, "linked_correlation_id", 0)
            if linked and linked in cpu_ids:
                continue  # counted below, as its launching op's device time
            t = _device_time(evt)
            if t:
                total += t
                part = _unlinked_part(evt.name)
                parts[part] = parts.get(part, 0.0) + t
            continue
        if evt.name.startswith("part."):
            continue  # (a range's own device time is its GPU span, idle gaps included)
        t = _self_device(evt)
        if not t:
            continue
        total += t
        up = evt.cpu_parent
        while up is not None and not up.name.startswith("part."):
            up = up.cpu_parent
        key = up.name[5:] if up is not None else "other"
        parts[key] = parts.get(key, 0.0) + t
    return parts, total


def _device_parts(events) -> list[tuple[object, str]] | None:
    """On GPUs the profile carries each `part.*` range's span on the device timeline (a user
    annotation). Each kernel (and copy) with its part: the innermost span that contains its start —
    whatever launched it: cuBLAS, Triton and inductor kernels launched through the driver API are
    not linked to the op that launched them. None without such spans (CPU runs)."""
    device = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]
    spans = sorted(((e.time_range.start, e.time_range.end, e.name[5:]) for e in device if e.name.startswith("part.")),
                   key=lambda span: span[1] - span[0])  # innermost (shortest) first
    if not spans:
        return None
    found = []
    for evt in device:
        if _is_work(evt) and _device_time(evt):
            start = evt.time_range.start
            found.append((evt, next((name for lo, hi, name in spans if lo <= start < hi), None)
                          or _unlinked_part(evt.name)))
    return found


def _by_device_span(events) -> tuple[dict[str, float], float] | None:
    """Device time (µs) by part, every kernel once (`_device_parts`); None on CPU runs."""
    found = _device_parts(events)
    if found is None:
        return None
    parts: dict[str, float] = {}
    for evt, part in found:
        parts[part] = parts.get(part, 0.0) + _device_time(evt)
    return parts, sum(parts.values())


def top_kernels_by_part(prof, steps: int, n: int = 25) -> list[tuple[str, str, float]]:
    """(part, kernel, ms a step) of the kernels that took longest, each name counted in each part
    apart (one elementwise kernel serves many ops); empty on CPU runs."""
    acc: dict[tuple[str, str], float] = {}
    for evt, part in _device_parts(prof.events()) or []:
        acc[part, evt.name[:60]] = acc.get((part, evt.name[:60]), 0.0) + _device_time(evt)
    rows = sorted(acc.items(), key=lambda kv: -kv[1])[:n]
    return [(part, name, round(t / steps / 1e3, 3)) for (part, name), t in rows]


def top_kernels(prof, steps: int, n: int = 12) -> list[tuple[str, float]]:
    rows = sorted(_device_work(prof).items(), key=lambda kv: -kv[1])
    return [(name[:60], round(t / steps / 1e3, 3)) for name, t in rows[:n] if t > 0]


@contextmanager
def _ranges(model):
    """Profiler ranges around the model's parts, through forward hooks (no cost when not used)."""
    handles = []

    def wrap(module, name):
        state = {}

        def pre(*_):
            state["rf"] = record_function(f"part.{name}")
            state["rf"].__enter__()

        def post(*_):
            state.pop("rf").__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    from epinfer.layers.moe import MoEBlock

    for qual, module in model.named_modules():
        leaf = qual.rsplit(".", 1)[-1]
        if isinstance(module, MoEBlock):
            wrap(module, "moe_block")
        elif leaf in PARTS and not qual.endswith("mlp.experts.shared_expert"):
            wrap(module, PARTS[leaf])
        elif leaf == "mlp":
            wrap(module, "dense_mlp")
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def comm_kind(label: str) -> str:
    """The breakdown's name for a collective label."""
    if label.startswith("graph."):
        return "graph"  # a CUDA graph replay: its collectives are not timed one by one
    for suffix, kind in ((".dispatch", "dispatch"), (".combine", "combine"), ("dp.sync", "dp_sync"),
                         ("tp.plan", "tp_plan")):
        if label.endswith(suffix):
            return kind
    return "tp_collectives"  # row-parallel all-reduces, sequence-parallel gathers, TP expert sums


class _CommRanges:
    """A communicator plugin: a profiler range around every collective, so NCCL kernels (their
    device time includes waiting for peers: exposed communication) count as `comm.<kind>`."""

    def __init__(self) -> None:
        self.open: list = []

    def before(self, call) -> None:
        rf = record_function(f"part.comm.{comm_kind(call.label)}")
        rf.__enter__()
        self.open.append(rf)

    def after(self, call) -> None:
        self.open.pop().__exit__(None, None, None)


def _profile_steps(step_fn, steps: int, sync, activities):
    """`steps` profiled steps after one that runs under the started profiler but is not recorded: the
    first step would carry the profiler's start-up (CUPTI) and the switch between eager and graph
    mode. In a parallel run the ranks start their profilers at different moments, and a peer's
    collective waits that long in the first step (likely part of the TP=2 `tp.tokens` time in RESULTS.md §3.1)."""
    with profile(activities=list(activities), schedule=schedule(wait=0, warmup=1, active=steps, repeat=1)) as prof:
        for i in range(steps + 1):
            step_fn()
            if i in (0, steps):  # the warm-up step's kernels run before the window, the recorded ones in it
                sync()
            prof.step()
    return prof


def steps_needed(steps: int) -> int:
    """Decode steps `breakdown(engine, steps)` runs: two passes of `steps`, each after a warm-up step."""
    return 2 * (steps + 1)


def breakdown(engine, steps: int = 3, step_fn=None, trace: str | None = None) -> dict:
    """ms per decode step by part; call while the batch is decoding (>= steps_needed(steps) steps
    left). `step_fn`: one step (default `engine.step`; a parallel run passes its lockstep step).
    `trace`: also write the normal path's steps there as a Chrome trace, host activity included."""
    step_fn = step_fn or engine.step
    dev = engine.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    host_and_device = (ProfilerActivity.CPU, ProfilerActivity.CUDA)[:1 + (dev.type == "cuda")]
    runner = engine.runner
    graphs, runner.graphs = runner.graphs, None
    comm = engine.ctx.comm
    hook = _CommRanges()
    if comm is not None:
        comm.add_plugin(hook)
    try:
        with _ranges(engine.runner.model):
            scope, engine.part_scope = engine.part_scope, lambda name: record_function(f"part.{name}")
            try:
                prof = _profile_steps(step_fn, steps, sync, host_and_device)
            finally:
                engine.part_scope = scope
    finally:
        runner.graphs = graphs
        if comm is not None:
            comm.remove_plugin(hook)
    raw, eager_total = _by_part(prof)
    parts = {k: v / steps / 1e3 for k, v in raw.items()}
    eager_total = eager_total / steps / 1e3
    # the MoE block's own kernels (gate, top-k, sort, gathers) and the router kernels counted by name
    parts["moe_router"] = parts.pop("moe_block", 0.0) + parts.get("moe_router", 0.0)
    device_only = host_and_device[-1:]
    prof2 = _profile_steps(step_fn, steps, sync, host_and_device if trace else device_only)  # the normal path
    if trace:
        prof2.export_chrome_trace(trace)
    busy = _kernel_time(prof2) / steps / 1e3
    scale = busy / eager_total if eager_total > 0 else 1.0
    out = {k: round(v * scale, 3) for k, v in sorted(parts.items())}
    out.update(device_busy=round(busy, 3), eager_device=round(eager_total, 3))
    out["top_kernels"] = top_kernels(prof2, steps)
    return out  # the caller adds host_overhead = unprofiled step time - device_busy
