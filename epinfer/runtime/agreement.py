"""Hosts that must agree before anything collective starts.

Across hosts every process gets its flags from its own command line, so two hosts can disagree on
`--dp / --tp`, the dtype or the checkpoint. Left alone that hangs in the first collective (the
groups differ) or, worse, runs with mismatched weights. So every participant (a torchrun rank, a
serving host) publishes what must match in the rendezvous store and reads everyone else's; each
one finds the same first difference and stops with the same one-line error, before any process
group is built.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from epinfer.core.config import DEMO_MODEL, EngineConfig
from epinfer.core.errors import Interrupted, UserError
from epinfer.core.untrusted import one_line
from epinfer.core.version import VERSION

AGREE_KEY = "epinfer/agree/"


def model_fingerprint(engine: EngineConfig) -> str:
    """The checkpoint, whatever folder it sits in on each host: config.json's digest and the
    weight files' total size (random weights: only the config)."""
    folder = Path(engine.model) if engine.model else DEMO_MODEL
    config = folder / "config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest()[:12] if config.is_file() else "no config.json"
    if engine.random_weights:
        return f"config {digest}, random weights"
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else 0
    return f"config {digest}, {size:,} bytes of weights"


def start_settings(job, **extra) -> dict:
    """What every host of a run must share: the layout, the checkpoint, the dtype, epinfer itself
    (the flags that change the collective schedule are checked again by the ranks' `settings.agree`)."""
    return {"--dp": job.dp, "--tp": job.tp, **extra, "the model": model_fingerprint(job.engine),
            "--dtype": job.engine.dtype, "--fp8-weights": job.engine.fp8_weights,
            "--mamba-ssm-cache-dtype": job.engine.mamba_ssm_cache_dtype,
            "--max-model-len": job.engine.max_model_len, "epinfer": VERSION}


def agree(store, me: int, count: int, mine: dict, name: Callable[[int, dict], str], timeout: float,
          scope: str = "", interrupted: Callable[[], int] = lambda: 0) -> None:
    """Publishes `mine` as participant `me` of `count`, waits up to `timeout` seconds for the
    others, and raises the same `UserError` on every participant if any differs from participant 0.
    `name(i, values)` says who participant i is (its values may carry where it runs); keys under
    `values["where"]` are reported, not compared. The wait polls, so that a signal noted by
    `interrupted` (its number) stops it (`Interrupted`): a wait inside the store defers Python's signal
    handlers to its end."""
    prefix = f"{AGREE_KEY}{scope}"
    store.set(f"{prefix}{me}", json.dumps(mine))
    keys = [f"{prefix}{i}" for i in range(count)]
    deadline = time.monotonic() + timeout
    try:
        while not store.check(keys):
            if interrupted():
                raise Interrupted(interrupted())
            if time.monotonic() > deadline:
                missing = [i for i, key in enumerate(keys) if not store.check([key])]
                raise UserError(f"{', '.join(name(i, {}) for i in missing)} did not start within {timeout:.0f} s: "
                                "start every host of the run (the same command, its own node rank)")
            time.sleep(0.05)
        values = [json.loads(store.get(key)) for key in keys]
        store.set(f"{prefix}read{me}", "1")
    except (RuntimeError, OSError) as exc:  # the store's holder stopped meanwhile (torch's store errors)
        raise UserError(f"the rendezvous store stopped answering while the hosts compared their settings "
                        f"({type(exc).__name__})") from None
    first = values[0]
    for i, other in enumerate(values[1:], start=1):
        differ = [k for k in first if k != "where" and other.get(k) != first[k]]
        if differ:
            if me == 0:  # (it may hold the store: the others read first, then it stops)
                with contextlib.suppress(Exception):
                    store.wait([f"{prefix}read{i}" for i in range(count)], datetime.timedelta(seconds=10))
            show = "; ".join(f"{k} {_show(other.get(k))} there, {_show(first[k])} on {name(0, first)}" for k in differ)
            raise UserError(f"{name(i, other)} does not match: {show}: every host needs the same model and flags")


def _show(value) -> str:
    return "(none)" if value is None else str(value)


def torchrun_agree(job, world: int, layout_error: UserError | None = None) -> None:
    """Under torchrun: every rank, before its process group (the rendezvous store of torchrun). A
    rank whose flags do not even fit WORLD_SIZE (`layout_error`) still publishes them, so that the
    other hosts name the difference too, then raises its own error at once."""
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    mine = start_settings(job, **{"ranks (WORLD_SIZE)": world}) | {"where": int(os.environ.get("GROUP_RANK", 0) or 0)}
    scope = f"torchrun{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    address = (os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 0) or 0))
    if layout_error is not None:
        with contextlib.suppress(Exception):  # (best effort: no store, no publication)
            store = dist.TCPStore(*address, is_master=False, timeout=datetime.timedelta(seconds=5))
            store.set(f"{AGREE_KEY}{scope}{rank}", json.dumps(mine))
        raise layout_error
    try:
        store = dist.TCPStore(*address, is_master=False, timeout=datetime.timedelta(seconds=60))
    except (RuntimeError, OSError) as exc:  # (torch's DistNetworkError and DistStoreError are RuntimeErrors)
        raise UserError(f"cannot reach torchrun's rendezvous store at {address[0]}:{address[1]} (MASTER_ADDR, "
                        f"MASTER_PORT): {one_line(exc, 160)}; run under torchrun, or unset RANK and WORLD_SIZE"
                        ) from None

    def name(i: int, values: dict) -> str:
        return f"rank {i}" + (f" (host {values['where']})" if "where" in values else "")

    agree(store, rank, world, mine, name, timeout=120.0, scope=scope)
