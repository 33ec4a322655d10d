"""Prometheus text exposition for `GET /metrics` (format 0.0.4, written by hand: a few counters,
gauges and histograms need no client library).

Per DP replica, from each replica's TP leader (every step that changes them): running and waiting
requests, free sequence slots and KV blocks, outstanding tokens (what routing compares), step
time. Collective skew: the ledger's arrival times at the same `dp.sync` (group, seq) on every rank
of the group, max minus min, sampled every few steps.
"""

from __future__ import annotations

import collections

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.sum:.6f}", f"{name}_count{suffix} {self.count}"]
        return out


class Metrics:
    def __init__(self, dp: int) -> None:
        self.dp = dp
        self.http = collections.Counter()  # (endpoint, status code) -> requests
        self.finished = collections.Counter()  # finish reason -> requests
        self.prompt_tokens = self.generation_tokens = 0
        self.routed = [0] * dp
        # running, waiting, free slots, free blocks, outstanding tokens; prefix cache: queried and hit
        # prompt tokens, cached blocks, evictions, GDN state snapshots, their evictions, and those
        # captured inside prompt chunks
        self.replica_stats: list[tuple] = [(0,) * 12] * dp
        self.step_time = [Histogram(STEP_BUCKETS) for _ in range(dp)]
        self.latency = Histogram(LATENCY_BUCKETS)
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.skew = Histogram(STEP_BUCKETS)
        self.skew_last = self.skew_max = 0.0
        self.skew_pending: dict[tuple, list[float]] = {}

    def add_skew_sample(self, label: str, group: str, seq: int, size: int, t0: float) -> None:
        key = (label, group, seq)
        arrivals = self.skew_pending.setdefault(key, [])
        arrivals.append(t0)
        if len(arrivals) == size:
            del self.skew_pending[key]
            self.skew_last = max(arrivals) - min(arrivals)
            self.skew_max = max(self.skew_max, self.skew_last)
            self.skew.observe(self.skew_last)
        while len(self.skew_pending) > 256:  # a rank that died never completes its samples
            del self.skew_pending[next(iter(self.skew_pending))]

    def render(self, healthy: bool, queue_depth: int, in_flight: int) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples])

        metric("epinfer_healthy", "gauge", "1 while every engine rank is alive", [f"epinfer_healthy {int(healthy)}"])
        metric("epinfer_http_requests_total", "counter", "HTTP requests by endpoint and status code",
               [f'epinfer_http_requests_total{{endpoint="{e}",code="{c}"}} {n}'
                for (e, c), n in sorted(self.http.items())])
        metric("epinfer_requests_finished_total", "counter", "generation requests by finish reason",
               [f'epinfer_requests_finished_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())])
        metric("epinfer_prompt_tokens_total", "counter", "prompt tokens of accepted requests",
               [f"epinfer_prompt_tokens_total {self.prompt_tokens}"])
        metric("epinfer_generation_tokens_total", "counter", "generated tokens",
               [f"epinfer_generation_tokens_total {self.generation_tokens}"])
        metric("epinfer_queue_depth", "gauge", "accepted requests not yet admitted by a replica",
               [f"epinfer_queue_depth {queue_depth}"])
        metric("epinfer_requests_in_flight", "gauge", "accepted requests not finished",
               [f"epinfer_requests_in_flight {in_flight}"])
        names = ("running_requests", "waiting_requests", "free_sequence_slots", "free_kv_blocks",
                 "outstanding_tokens")
        helps = ("requests in the running batch", "requests routed here, not yet admitted",
                 "free sequence (state) slots", "free KV cache blocks (cached ones no request holds included)",
                 "prompt tokens not yet prefilled + tokens still to generate")
        for i, (name, help_) in enumerate(zip(names, helps, strict=True)):
            metric(f"epinfer_{name}", "gauge", f"per DP replica: {help_}",
                   [f'epinfer_{name}{{replica="{r}"}} {s[i]}' for r, s in enumerate(self.replica_stats)])
        prefix = (("prefix_cache_queries_total", "counter", "prompt tokens looked up in the prefix cache"),
                  ("prefix_cache_hits_total", "counter", "prompt tokens found in the prefix cache (not prefilled)"),
                  ("prefix_cache_blocks", "gauge", "KV blocks held by the prefix cache"),
                  ("prefix_cache_evictions_total", "counter", "cached KV blocks evicted for new ones"),
                  ("prefix_cache_state_snapshots", "gauge", "GDN state snapshots kept (hybrid models)"),
                  ("prefix_cache_snapshot_evictions_total", "counter", "GDN state snapshots evicted for new ones"),
                  ("prefix_cache_snapshot_captures_total", "counter",
                   "GDN state snapshots captured inside a prompt chunk (no cut there)"))
        for i, (name, kind, help_) in enumerate(prefix, start=5):
            metric(f"epinfer_{name}", kind, f"per DP replica: {help_}",
                   [f'epinfer_{name}{{replica="{r}"}} {s[i]}' for r, s in enumerate(self.replica_stats)])
        metric("epinfer_prefix_cache_hit_rate", "gauge", "per DP replica: hits / queries (0 before any query)",
               [f'epinfer_prefix_cache_hit_rate{{replica="{r}"}} {s[6] / s[5] if s[5] else 0.0:.4f}'
                for r, s in enumerate(self.replica_stats)])
        metric("epinfer_routed_requests_total", "counter", "requests routed to each DP replica",
               [f'epinfer_routed_requests_total{{replica="{r}"}} {n}' for r, n in enumerate(self.routed)])
        metric("epinfer_step_seconds", "histogram", "forward + sampling time of a step, per DP replica",
               [ln for r, h in enumerate(self.step_time) for ln in h.lines("epinfer_step_seconds", f'replica="{r}"')])
        metric("epinfer_request_latency_seconds", "histogram", "request arrival to last token",
               self.latency.lines("epinfer_request_latency_seconds"))
        metric("epinfer_time_to_first_token_seconds", "histogram", "request arrival to first token",
               self.ttft.lines("epinfer_time_to_first_token_seconds"))
        metric("epinfer_collective_skew_seconds", "histogram",
               "arrival spread of the ranks at the same dp.sync collective (ledger times)",
               self.skew.lines("epinfer_collective_skew_seconds", 'label="dp.sync"'))
        metric("epinfer_collective_skew_last_seconds", "gauge", "the latest dp.sync arrival spread",
               [f'epinfer_collective_skew_last_seconds{{label="dp.sync"}} {self.skew_last:.6f}'])
        metric("epinfer_collective_skew_max_seconds", "gauge", "the largest dp.sync arrival spread seen",
               [f'epinfer_collective_skew_max_seconds{{label="dp.sync"}} {self.skew_max:.6f}'])
        return "\n".join(lines) + "\n"
