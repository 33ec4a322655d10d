"""What a large guide costs the other requests of `epinfer serve`: one plain request streams while
requests with large JSON schemas arrive (distinct property names: no schema is compiled already;
with `--kind pattern` they share one pattern, compiled once); prints the plain stream's median gap
between tokens, its largest gap once the schemas came, and each schema request's status and seconds
from the first one's send. A schema's compile and its first state's allowed ids run on the step
loop, so they show in the plain stream's gaps.

    python3 benchmarks/guide_stall.py [--serve "FLAGS"] [--schemas 4] [--properties 200] [--kind length]

`--kind length`: `--properties` strings of `maxLength` 200 and up; `pattern`: strings of an e-mail-like
`pattern` each. Starts its own server (the demo model unless FLAGS name another) on a free port.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time

import httpx
from serve_load import start_server


def schema(seed: int, properties: int, kind: str) -> dict:
    def value(i: int) -> dict:
        if kind == "length":
            return {"type": "string", "maxLength": 200 + i}
        return {"type": "string", "pattern": "[a-z]{1,20}@[a-z]{1,12}\\.(com|org|net)"}

    return {"type": "object", "properties": {f"f{seed}_{i}": value(i) for i in range(properties)}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--serve", default="")
    p.add_argument("--schemas", type=int, default=4)
    p.add_argument("--properties", type=int, default=200)
    p.add_argument("--kind", choices=("length", "pattern"), default="length")
    args = p.parse_args()
    proc, url = start_server(args.serve)
    try:
        arrivals: list[float] = []

        def plain() -> None:
            body = {"prompt": "hello", "max_tokens": 120, "ignore_eos": True, "stream": True, "temperature": 0}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        arrivals.append(time.perf_counter())

        stream = threading.Thread(target=plain)
        stream.start()
        while len(arrivals) < 15 and stream.is_alive():
            time.sleep(0.01)
        t0 = time.perf_counter()
        answers: list[tuple[int, float]] = []

        def guided(seed: int) -> None:
            body = {"prompt": "x", "max_tokens": 2, "guided_json": schema(seed, args.properties, args.kind)}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
            answers.append((r.status_code, round(time.perf_counter() - t0, 3)))

        senders = [threading.Thread(target=guided, args=(seed,)) for seed in range(args.schemas)]
        for s in senders:
            s.start()
            time.sleep(0.05)
        for s in senders + [stream]:
            s.join()
        gaps = [(b, b - a) for a, b in zip(arrivals, arrivals[1:], strict=False)] or [(t0, 0.0)]
        after = [g for t, g in gaps if t >= t0] or [0.0]
        print(json.dumps({"kind": args.kind, "properties": args.properties, "tokens": len(arrivals),
                          "median_gap_ms": round(sorted(g for _, g in gaps)[len(gaps) // 2] * 1e3, 1),
                          "largest_gap_after_ms": round(max(after) * 1e3, 1), "schema_requests": sorted(answers)}))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
