"""How fast an FP8 checkpoint loads (the "FP8 weights" section of benchmarks/RESULTS.md): writes a
checkpoint of a Qwen3-MoE shape as Qwen publishes its FP8 models (projection and per-expert weights
float8_e4m3fn with float32 `*_scale_inv` per 128 x 128 block; embeddings, norms, router and LM head in
bf16; safetensors shards of --shard-gb with an index), drops the page cache where it may (root), then
times `LLM(folder, fp8_weights=True)` to ready and to its first token. One JSON record: the bytes on
disk, the weights phase's seconds and GB/s, the start-up by phase, the first token's seconds. With
--disk-rate the shards are first read in parallel from the dropped cache (the disk's own GB/s); with
--cached they are read into the page cache before the load instead of dropped (the loader's own GB/s).

    python benchmarks/fp8_load.py --dir DIR [--shape qwen3-30b-a3b] [--layers L] [--shard-gb 5]
        [--device cuda] [--keep] [--disk-rate] [--cached]

The random values are drawn on --device (on a GPU the full 30B shape's 31 GB takes seconds to draw).
DIR must be new or empty, or hold this script's complete checkpoint of the same shape and layers (it
is then reused, and kept); one the script wrote is removed at the end unless --keep. A write that was
cut short is cleared and redone. The values are random, their scales arbitrary: for load timing only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from epinfer import LLM, SamplingParams
from epinfer.bench.single import shape_folder
from epinfer.core.config import ModelConfig

FP8 = torch.float8_e4m3fn


def layer_tensors(cfg: ModelConfig, i: int, device: str) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors by checkpoint name (projections in FP8 with their block scales)."""
    D, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.moe_intermediate_size
    block = cfg.fp8_block
    out: dict[str, torch.Tensor] = {}
    templates: dict[tuple[int, int], torch.Tensor] = {}

    def fp8(name: str, rows: int, cols: int) -> None:
        if (rows, cols) not in templates:  # one draw a shape; every tensor its own copy (own storage)
            templates[rows, cols] = (torch.randn(rows, cols, device=device) * 0.5).to(FP8).cpu()
        out[name] = templates[rows, cols].clone()
        scale = torch.full((-(-rows // block[0]), -(-cols // block[1])), 0.02 / 448, dtype=torch.float32)
        out[name + "_scale_inv"] = scale

    p = f"model.layers.{i}."
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[p + norm + ".weight"] = torch.ones(D, dtype=torch.bfloat16)
    fp8(p + "self_attn.q_proj.weight", cfg.num_heads * hd, D)
    fp8(p + "self_attn.k_proj.weight", cfg.num_kv_heads * hd, D)
    fp8(p + "self_attn.v_proj.weight", cfg.num_kv_heads * hd, D)
    fp8(p + "self_attn.o_proj.weight", D, cfg.num_heads * hd)
    if cfg.qk_norm == "head":
        out[p + "self_attn.q_norm.weight"] = torch.ones(hd, dtype=torch.bfloat16)
        out[p + "self_attn.k_norm.weight"] = torch.ones(hd, dtype=torch.bfloat16)
    out[p + "mlp.gate.weight"] = (torch.randn(cfg.num_experts, D, device=device) * 0.02).to(torch.bfloat16).cpu()
    for e in range(cfg.num_experts):
        fp8(p + f"mlp.experts.{e}.gate_proj.weight", inter, D)
        fp8(p + f"mlp.experts.{e}.up_proj.weight", inter, D)
        fp8(p + f"mlp.experts.{e}.down_proj.weight", D, inter)
    return out


def write_checkpoint(folder: Path, shape: str, layers: int | None, shard_bytes: int, device: str) -> int:
    """Writes the checkpoint (config.json, shards, index) into `folder`; returns its bytes."""
    shape_folder(shape, layers, str(folder), fp8=True)
    cfg = ModelConfig.from_dir(folder)
    if (cfg.is_hybrid or cfg.num_experts == 0 or cfg.attn_output_gate or set(cfg.mlp_types) != {"moe"}
            or cfg.shared_expert_intermediate_size or cfg.attention_bias or cfg.qk_norm not in ("head", "none")):
        raise SystemExit(f"fp8_load.py writes Qwen3-MoE shapes only (plain attention, every layer MoE), "
                         f"not {shape}")
    weight_map: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    shards = 0

    def flush() -> None:
        nonlocal shards, pending
        if pending:
            shards += 1
            name = f"model-{shards:05d}.safetensors"
            save_file(pending, str(folder / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(pending, name))
            pending = {}

    def add(tensors: dict[str, torch.Tensor]) -> None:
        pending.update(tensors)
        if sum(t.numel() * t.element_size() for t in pending.values()) >= shard_bytes:
            flush()

    emb = (torch.randn(cfg.vocab_size, cfg.hidden_size, device=device) * 0.02).to(torch.bfloat16).cpu()
    add({"model.embed_tokens.weight": emb})
    for i in range(cfg.num_layers):
        add(layer_tensors(cfg, i, device))
    add({"model.norm.weight": torch.ones(cfg.hidden_size, dtype=torch.bfloat16)}
        | ({} if cfg.tie_word_embeddings else {"lm_head.weight": emb.clone()}))
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


MARKER = "fp8_load.json"  # written last: the checkpoint is complete, of this shape and depth
OWN = re.compile(r"^(config\.json|model-\d{5}\.safetensors|model\.safetensors\.index\.json)$")


def prepare(folder: Path, want: dict) -> bool:
    """Whether `folder` already holds this script's complete checkpoint for `want` (reuse it); else
    makes it ready for a new one: created, or cleared of a cut-short write of this script's own files.
    Stops on anything else in it."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [p.name for p in folder.iterdir()]
    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return True
    if any(not OWN.match(n) for n in names if n != MARKER) or (names and marker.is_file()):
        raise SystemExit(f"--dir {folder}: holds other files or another checkpoint ({want} wanted); "
                         f"give a new or empty folder")
    for n in names:  # a write that was cut short
        (folder / n).unlink()
    return False


def drop_page_cache() -> bool:
    """Whether the kernel's page cache could be dropped (root only), so the load reads the disk."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def read_all(files: list[Path]) -> float:
    """Seconds to read every file once, one thread a file (16 MiB reads): the disk's own rate when
    the page cache was dropped before, and the files are in the cache after."""
    def read(path: Path) -> None:
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(16 << 20)
            while f.readinto(buf):
                pass

    t = time.perf_counter()
    with ThreadPoolExecutor(len(files)) as pool:
        list(pool.map(read, files))
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--shape", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--disk-rate", action="store_true",
                    help="also time a parallel read of the shards with the page cache dropped (the disk's rate)")
    ap.add_argument("--cached", action="store_true",
                    help="the shards read into the page cache before the load: the loader's own rate")
    args = ap.parse_args()
    folder = Path(args.dir)
    want = {"shape": args.shape, "layers": args.layers}
    t = time.perf_counter()
    reused = prepare(folder, want)
    if reused:
        written = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        write_s = None
    else:
        written = write_checkpoint(folder, args.shape, args.layers, int(args.shard_gb * 1e9), args.device)
        (folder / MARKER).write_text(json.dumps(want))
        write_s = round(time.perf_counter() - t, 1)
    shards = sorted(folder.glob("*.safetensors"))
    disk_s = read_all(shards) if args.disk_rate and drop_page_cache() else None
    if args.cached:
        read_all(shards)
        dropped = False
    else:
        dropped = drop_page_cache()
    t = time.perf_counter()
    llm = LLM(str(folder), dtype="bfloat16", device=args.device, fp8_weights=True, max_model_len=2048,
              max_num_seqs=16)
    ready = time.perf_counter() - t
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    first = time.perf_counter() - t
    weights_s = llm.engine.startup["weights"]
    rec = {"shape": args.shape, "layers": llm.engine.model_config.num_layers, "bytes": written,
           "shards": len(shards), "written_s": write_s, "page_cache_dropped": dropped, "cached": args.cached,
           "disk_GBps": round(written / disk_s / 1e9, 2) if disk_s else None,
           "weights_s": weights_s, "weights_GBps": round(written / max(weights_s, 1e-9) / 1e9, 2),
           "ready_s": round(ready, 2), "first_token_s": round(first, 2), "startup_s": llm.engine.startup,
           "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device}
    print(json.dumps(rec))
    print(f"FP8 load: {written / 1e9:.1f} GB in {weights_s:.1f} s ({rec['weights_GBps']} GB/s), first token "
          f"{first:.1f} s after LLM(...); page cache dropped: {dropped}"
          + (f"; the disk read them at {rec['disk_GBps']} GB/s" if disk_s else ""), file=sys.stderr)
    if not (args.keep or reused):
        shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
