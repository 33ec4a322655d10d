"""What masking a step's restricted rows costs (`engine.penalties.allow`): R rows, each allowing N
random ids of a 151,936-token vocabulary (a guide's broad states allow most of it), given as a
guide's `TokenSet` (sent as a bit mask; its bits made once, as a remembered state's are) or as a
host tensor of ids; the median of 20 calls after 3, synchronised on a GPU.

    python benchmarks/mask_cost.py [--device cuda] [--rows 64,256] [--ids 1000,30000,100000]

On a tree without `TokenSet` only the ids form runs (an A/B against an earlier tree).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from epinfer.engine.penalties import allow

try:
    from epinfer.engine.guided import TokenSet
except ImportError:  # (an earlier tree)
    TokenSet = None

V = 151936


def timed(logits: torch.Tensor, rows: list) -> float:
    times = []
    for i in range(23):
        if logits.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        allow(logits, rows)
        if logits.is_cuda:
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", default="64,256")
    ap.add_argument("--ids", default="1000,30000,100000")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    for R in map(int, args.rows.split(",")):
        logits = torch.randn(R, V, device=args.device)
        for n in map(int, args.ids.split(",")):
            ids = [torch.sort(torch.randperm(V, generator=gen)[:n]).values for _ in range(R)]
            forms = {"ids": [(r, t) for r, t in enumerate(ids)]}
            if TokenSet is not None:
                sets = [TokenSet(t) for t in ids]
                for s in sets:
                    s.bits()
                forms["bits"] = list(enumerate(sets))
            for form, rows in forms.items():
                print(json.dumps({"device": args.device, "rows": R, "ids": n, "form": form,
                                  "ms": round(timed(logits, rows), 3)}), flush=True)


if __name__ == "__main__":
    main()
