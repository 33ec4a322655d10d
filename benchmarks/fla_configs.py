"""fla-core's autotune choices on this GPU, written as fla's own config files: one `{kernel}.json` per
autotuned kernel under `--out` (the format fla reads from FLA_CONFIG_DIR when FLA_CACHE_MODE is set:
`autotune_entries` keyed by the hash of Triton's tuning key, and a `default_config`). The engine of
`--shape` is built (its prefill warm-up runs a full-budget step, so every fla kernel it calls is
autotuned at the engine's sizes), then one more prompt chunk runs, and the choice each fla
autotuner made for each key is read back. With these files as FLA_CONFIG_DIR and
FLA_CACHE_MODE=full, fla compiles the chosen config alone instead of timing every candidate: what
the first start on a fresh machine spends autotuning. Prints, per kernel, the candidates it has and
the keys it chose for. epinfer ships such files for the GPUs in `epinfer/kernels/fla_configs/` and
reads them unless fla's config cache is configured; this script turns that off (FLA_CACHE_MODE=disabled
unless set) so that fla autotunes.

    python benchmarks/fla_configs.py --out DIR [--shape qwen3.5-35b-a3b] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch


def config_dict(cfg) -> dict:
    """A `triton.Config` as fla's config files hold one."""
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
            "num_ctas": getattr(cfg, "num_ctas", 1), "maxnreg": getattr(cfg, "maxnreg", None)}


def config_file(name: str, choices: dict, triton_version: str) -> dict:
    """{kernel_name, triton_version, autotune_entries, default_config} for one kernel's choices
    ({tuning key: triton.Config}), keyed as fla looks them up; the default is the config chosen for
    the most keys."""
    from fla.ops.utils.cache import AutotuneKey

    entries, counts = {}, {}
    for key, cfg in choices.items():
        as_dict = config_dict(cfg)
        entries[AutotuneKey.key_hash(key)] = {"autotune_key": AutotuneKey.normalize_autotune_key(key),
                                              "config": as_dict}
        text = json.dumps(as_dict, sort_keys=True)
        counts[text] = counts.get(text, 0) + 1
    default = json.loads(max(counts, key=counts.get)) if counts else None
    return {"kernel_name": name, "triton_version": triton_version, "autotune_entries": entries,
            "default_config": default}


def fla_autotuners() -> dict[str, list]:
    """Every autotuner of the fla modules loaded so far, by kernel name (several fla modules define
    kernels of one name: fla's config file of that name serves them all)."""
    from triton.runtime.autotuner import Autotuner

    found: dict[str, list] = {}
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("fla.") or mod is None:
            continue
        for obj in vars(mod).values():
            for _ in range(4):  # an autotuner may sit under @triton.heuristics (whose .fn it is)
                if isinstance(obj, Autotuner) or not hasattr(obj, "fn"):
                    break
                obj = obj.fn
            if isinstance(obj, Autotuner):  # (base_fn: Triton's own unwrapping, the Python function)
                tuners = found.setdefault(getattr(obj, "kernel_name", None) or obj.base_fn.__name__, [])
                if all(t is not obj for t in tuners):
                    tuners.append(obj)
    return found


def write_configs(out: Path) -> None:
    """The choices of every fla autotuner that ran in this process, as fla's config files under `out`."""
    import triton

    out.mkdir(parents=True, exist_ok=True)
    for name, tuners in sorted(fla_autotuners().items()):
        chosen = {key: cfg for tuner in tuners for key, cfg in tuner.cache.items()}
        if not chosen:
            continue
        (out / f"{name}.json").write_text(json.dumps(config_file(name, chosen, triton.__version__), indent=1))
        print(f"{name}: {max(len(t.configs) for t in tuners)} candidates, chosen for {len(chosen)} key(s): "
              f"{sorted({json.dumps(config_dict(c), sort_keys=True) for c in chosen.values()})}")
    print(f"GPU: {torch.cuda.get_device_name(0)}; files in {out}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="qwen3.5-35b-a3b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--len", type=int, default=3000, help="the extra prompt's tokens")
    args = ap.parse_args()
    os.environ.setdefault("FLA_CACHE_MODE", "disabled")  # fla autotunes instead of reading the shipped choices
    from epinfer.bench.single import shape_folder, submit_random
    from epinfer.engine.engine import Engine, EngineConfig

    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(EngineConfig(model=str(shape_folder(args.shape, args.layers, tmp)), dtype="bfloat16",
                                     device="cuda", random_weights=True, max_model_len=args.len + 64))
        submit_random(engine, 1, 1, args.len, 4, seed=0)
        while engine.has_work():
            engine.step()
        torch.cuda.synchronize()
    write_configs(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
