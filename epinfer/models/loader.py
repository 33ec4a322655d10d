"""Stream a safetensors checkpoint (single file or sharded with an index) into a `CausalLM`.

Checkpoint names are normalised first (multimodal `model.language_model.` prefix, Mixtral's
`block_sparse_moe` / `w1 w2 w3`), parts we don't run are skipped (`model.visual.*`, `mtp.*`), and
each tensor goes to a loader that knows its layout: per-expert or fused expert tensors into the
fused `w13` / `w2` parameters (only the experts this rank owns), Qwen3-Next's grouped GDN input
projection into the Qwen3.5 layout. Any missing, unexpected or mis-shaped tensor is a `UserError`,
and so is a weight file that is not a regular file inside the folder (whatever the index names).
Never unpickles: `.bin` checkpoints are refused.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from epinfer.core.checkpoint_files import MAX_INDEX_BYTES, folder_file, one_line, read_json_object, show, shown_path
from epinfer.core.config import ModelConfig
from epinfer.core.errors import UserError
from epinfer.kernels.fp8_gemm import dequantize_blocks, scale_shape
from epinfer.models.causal_lm import CausalLM
from epinfer.models.families import WEIGHT_RENAMES
from epinfer.models.prefetch import Prefetcher, tensor_spans

SKIP_PREFIXES = ("model.visual.", "visual.", "mtp.", "model.mtp.")
_PER_EXPERT = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
)
_FUSED_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
INDEX_NAME = "model.safetensors.index.json"


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files to load: the shards the index names, else `model.safetensors`, else
    every `*.safetensors`. Only regular files inside the folder qualify (see `folder_file`): an index
    may name any path, and a FIFO or device among the weights would block or never end the load."""
    index = folder_file(folder, INDEX_NAME)
    if index is not None:
        weight_map = read_json_object(index, MAX_INDEX_BYTES).get("weight_map")
        where = shown_path(index)
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise UserError(f"{where}: field 'weight_map' must be an object mapping tensor names to file names, "
                            f"got {show(weight_map)}")
        if not weight_map:
            raise UserError(f"{where}: field 'weight_map' is empty")
        files, missing = [], []
        for name in sorted(set(weight_map.values())):
            path = folder_file(folder, name, referrer=f"{where}: field 'weight_map' names")
            if path is None:
                missing.append(name)
            else:
                files.append(path)
        if missing:
            shown = ", ".join(one_line(n, 80) for n in missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise UserError(f"{where}: field 'weight_map' names missing shard(s): {shown}")
        return files
    single = folder_file(folder, "model.safetensors")
    if single is not None:
        return [single]
    files = [folder_file(folder, p.name) for p in sorted(folder.glob("*.safetensors"))]
    files = [f for f in files if f is not None]
    if files:
        return files
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise UserError(f"{folder} has only pickle (.bin/.pt) weights; epinfer loads safetensors only")
    raise UserError(f"no safetensors weights in {folder}")


def normalize_name(key: str, cfg: ModelConfig) -> str | None:
    """Checkpoint key -> parameter-tree name, or None for tensors we skip."""
    if key.startswith(SKIP_PREFIXES) or key.endswith("rotary_emb.inv_freq"):
        return None
    if key.startswith("model.language_model."):
        key = "model." + key[len("model.language_model."):]
    elif key.startswith("language_model.model."):
        key = "model." + key[len("language_model.model."):]
    elif key.startswith("language_model.lm_head."):
        key = key[len("language_model."):]
    rename = WEIGHT_RENAMES.get(cfg.family)
    return key if rename is None else rename(key)


class _Tracker:
    """The pieces of each parameter loaded, and from which tensor: missing ones can be named in the
    checkpoint's terms, and a piece two tensors load (a duplicate under another name or in another
    layout) is refused, as the later one would silently win. A piece is None (the whole parameter) or,
    for the stacked experts, (expert, "gate_proj" | "up_proj") of `w13` and expert of `w2`."""

    def __init__(self, params: dict[str, torch.nn.Parameter]) -> None:
        self.expected: dict[str, list] = {name: [None] for name in params}
        self.loaded: dict[str, dict] = defaultdict(dict)

    def expect_experts(self, prefix: str, experts) -> None:
        self.expected[f"{prefix}.w13"] = [(e, proj) for e in experts for proj in ("gate_proj", "up_proj")]
        self.expected[f"{prefix}.w2"] = list(experts)

    def mark(self, name: str, key: str, piece: object = None) -> None:
        first = self.loaded[name].setdefault(piece, key)
        if first != key:
            raise UserError(f"tensors {first} and {key} both hold the model's {piece_name(name, piece)}: a "
                            "checkpoint holds each weight once (a duplicate, under another name or in another "
                            "layout)")

    def missing(self) -> list[str]:
        return [self.missing_name(n, p) for n, pieces in self.expected.items() for p in pieces
                if p not in self.loaded[n]]

    def missing_name(self, name: str, piece: object) -> str:
        """A missing expert as the checkpoint would name it: a loaded sibling's name (another expert,
        the same projection) with this expert's number (Mixtral's `w3`, a multimodal prefix), else
        in this model's terms."""
        if piece is not None:
            expert = piece[0] if isinstance(piece, tuple) else piece
            for other, key in self.loaded[name].items():
                same_proj = isinstance(piece, tuple) == isinstance(other, tuple) and (
                    not isinstance(piece, tuple) or other[1] == piece[1])
                sibling = _EXPERT_NUMBER.search(key)
                if same_proj and sibling:
                    return f"{key[:sibling.start(1)]}{expert}{key[sibling.end(1):]}"
        return piece_name(name, piece)


_EXPERT_NUMBER = re.compile(r"\.experts\.(\d+)\.")


def piece_name(name: str, piece: object) -> str:
    """A parameter piece in the model's terms: `...experts.3.up_proj.weight`, not the stacked `w13`."""
    if piece is None:
        return name
    prefix = name.rsplit(".", 1)[0]
    expert, proj = piece if isinstance(piece, tuple) else (piece, "down_proj")
    return f"{prefix}.{expert}.{proj}.weight"


def _copy(param: torch.Tensor, tensor: torch.Tensor, key: str, shard_of: torch.Tensor | None = None) -> None:
    """Copy `tensor` into `param`, first selecting this rank's shard when `shard_of` (the full
    parameter the tensor belongs to) is TP-sharded."""
    if not tensor.is_floating_point():  # (an integer tensor would be cast into nonsense weights)
        raise UserError(f"tensor {key}: dtype {str(tensor.dtype).removeprefix('torch.')} is not a floating-point "
                        "type (weights are float32, float16, bfloat16 or FP8)")
    shard_of = param if shard_of is None else shard_of
    dim = getattr(shard_of, "shard_dim", None)
    if dim is not None:
        index = shard_of.shard_index
        if tensor.dim() <= dim or int(index.max()) >= tensor.shape[dim]:
            raise UserError(f"tensor {key}: shape {tuple(tensor.shape)} is too small for the model")
        tensor = tensor.index_select(dim, index.to(tensor.device))
    if tuple(param.shape) != tuple(tensor.shape):
        raise UserError(
            f"tensor {key}: shape {tuple(tensor.shape)} does not match the model's {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(tensor)


class WeightLoader:
    def __init__(self, model: CausalLM, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.params = dict(model.named_parameters())
        self.tracker = _Tracker(self.params)
        self.sums: list[tuple[str, torch.Tensor]] = []  # each tensor loaded, by the sum of what it wrote
        self.local_index: dict[str, dict[int, int]] = {}
        self.inter_index: dict[str, range | None] = {}
        for name, module in model.named_modules():
            if hasattr(module, "expert_ids"):
                index = {e: i for i, e in enumerate(module.expert_ids)}
                self.local_index[name] = index
                self.inter_index[name] = module.inter_index
                self.tracker.expect_experts(name, index)

    def _put(self, param: torch.Tensor, tensor: torch.Tensor, key: str) -> None:
        _copy(param, tensor, key)
        self.sums.append((key, torch.sum(param.detach(), dtype=torch.float32)))  # (on the device: no wait)

    def check_finite(self) -> None:
        """The tensors loaded since the last check hold no NaN or infinity (a NaN weight would
        otherwise surface only as a request's non-finite logits): their sums, one wait for all."""
        if not self.sums:
            return
        finite = torch.stack([total for _, total in self.sums]).isfinite()
        if not bool(finite.all()):
            key = self.sums[int((~finite).nonzero()[0])][0]
            raise UserError(f"tensor {key} holds NaN or infinite values")
        self.sums.clear()

    def adopt(self, prefix: str, module: torch.nn.Module) -> None:
        """Loads into `module`'s parameters as they are now (made since the loader was built)."""
        for name, param in module.named_parameters():
            self.params[prefix + name] = param

    def forget(self, prefix: str) -> None:
        """Drops the references to the parameters under `prefix` (loaded: their module owns them)."""
        for name in [n for n in self.params if n.startswith(prefix)]:
            del self.params[name]

    def load(self, key: str, get: Callable[[], torch.Tensor]) -> None:
        name = normalize_name(key, self.cfg)
        if name is None:
            return
        if m := _PER_EXPERT.match(name):
            return self._per_expert(key, m[1], int(m[2]), m[3], get)
        if m := _FUSED_EXPERT.match(name):
            return self._fused_expert(key, m[1], m[2], get())
        if name.endswith("linear_attn.in_proj_qkvz.weight") or name.endswith("linear_attn.in_proj_ba.weight"):
            return self._grouped_gdn(key, name, get())
        if name not in self.params:
            raise UserError(f"unexpected tensor {key!r} in checkpoint")
        self.tracker.mark(name, key)
        self._put(self.params[name], get(), key)

    def _per_expert(self, key: str, prefix: str, expert: int, proj: str, get: Callable[[], torch.Tensor]) -> None:
        if prefix not in self.local_index or expert >= self.cfg.num_experts:
            raise UserError(f"unexpected tensor {key!r} in checkpoint")
        local = self.local_index[prefix].get(expert)
        if local is None:
            return  # another expert-parallel rank owns it (not even read)
        tensor = get()
        keep = self.inter_index[prefix]
        if proj == "down_proj":
            if keep is not None:
                tensor = _select(tensor, 1, keep, key)
            self.tracker.mark(f"{prefix}.w2", key, expert)
            self._put(self.params[f"{prefix}.w2"][local], tensor, key)
            return
        if keep is not None:
            tensor = _select(tensor, 0, keep, key)
        inter = self.params[f"{prefix}.w13"].shape[1] // 2
        half = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
        self.tracker.mark(f"{prefix}.w13", key, (expert, proj))
        self._put(self.params[f"{prefix}.w13"][local, half], tensor, key)

    def _fused_expert(self, key: str, prefix: str, proj: str, tensor: torch.Tensor) -> None:
        if prefix not in self.local_index:
            raise UserError(f"unexpected tensor {key!r} in checkpoint")
        index = self.local_index[prefix]
        target = f"{prefix}.w13" if proj == "gate_up_proj" else f"{prefix}.w2"
        param = self.params[target]
        inter = self.cfg.moe_intermediate_size
        expected = (self.cfg.num_experts, 2 * inter, self.cfg.hidden_size) if proj == "gate_up_proj" \
            else (self.cfg.num_experts, self.cfg.hidden_size, inter)
        if tensor.dim() != 3:
            raise UserError(f"tensor {key}: shape {tuple(tensor.shape)} does not match {expected}")
        if tuple(tensor.shape) != expected and tuple(tensor.transpose(1, 2).shape) == expected:
            tensor = tensor.transpose(1, 2)  # some exporters store [E, in, out]
        if tuple(tensor.shape) != expected:
            raise UserError(f"tensor {key}: shape {tuple(tensor.shape)} does not match {expected}")
        ids = torch.tensor(list(index), dtype=torch.long)
        tensor = tensor[ids]
        keep = self.inter_index[prefix]
        if keep is not None:
            keep_t = torch.tensor(list(keep), dtype=torch.long)
            if proj == "gate_up_proj":
                tensor = tensor[:, torch.cat([keep_t, keep_t + inter])]
            else:
                tensor = tensor[:, :, keep_t]
        self._put(param, tensor, key)
        for e in index:
            for piece in ((e, "gate_proj"), (e, "up_proj")) if proj == "gate_up_proj" else (e,):
                self.tracker.mark(target, key, piece)

    def _grouped_gdn(self, key: str, name: str, tensor: torch.Tensor) -> None:
        """Qwen3-Next groups rows per key head: [q k v z] / [b a]; split into the flat layout."""
        cfg = self.cfg
        prefix = name.rsplit(".", 2)[0]
        nk, dk, dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
        if not nk or f"{prefix}.in_proj_qkv.weight" not in self.params:  # (no linear attention there)
            raise UserError(f"unexpected tensor {key!r} in checkpoint")
        if tensor.dim() != 2:
            raise UserError(f"tensor {key}: shape {tuple(tensor.shape)} is not a matrix (rows, hidden size)")
        r = cfg.linear_num_value_heads // nk
        hidden = tensor.shape[-1]
        if name.endswith("in_proj_qkvz.weight"):
            per_group = 2 * dk + 2 * r * dv
            if tensor.shape[0] != nk * per_group:
                raise UserError(f"tensor {key}: shape {tuple(tensor.shape)} does not match "
                                f"({nk * per_group}, {hidden})")
            q, k, v, z = tensor.view(nk, per_group, hidden).split([dk, dk, r * dv, r * dv], dim=1)
            qkv = torch.cat([t.reshape(-1, hidden) for t in (q, k, v)], dim=0)
            parts = {"in_proj_qkv": qkv, "in_proj_z": z.reshape(-1, hidden)}
        else:
            if tensor.shape[0] != nk * 2 * r:
                raise UserError(f"tensor {key}: shape {tuple(tensor.shape)} does not match "
                                f"({nk * 2 * r}, {hidden})")
            b, a = tensor.view(nk, 2 * r, hidden).split([r, r], dim=1)
            parts = {"in_proj_b": b.reshape(-1, hidden), "in_proj_a": a.reshape(-1, hidden)}
        for part, value in parts.items():
            target = f"{prefix}.{part}.weight"
            if target not in self.params:
                raise UserError(f"unexpected tensor {key!r} in checkpoint")
            self.tracker.mark(target, key)
            self._put(self.params[target], value, key)


def _select(tensor: torch.Tensor, dim: int, keep: range, key: str) -> torch.Tensor:
    if tensor.dim() <= dim or keep.stop > tensor.shape[dim]:
        raise UserError(f"tensor {key}: shape {tuple(tensor.shape)} is too small for the model")
    return tensor.narrow(dim, keep.start, len(keep))


Reader = Callable[[], torch.Tensor]


def open_tensors(files: list[Path], stack: contextlib.ExitStack,
                 spans: dict[str, tuple[Path, int, int]] | None = None) -> dict[str, tuple[Reader, str, Path]]:
    """Every tensor of the files, by name: (a reader, its safetensors dtype name, its file); a name
    in two files is refused (which copy is meant can't be known). The files stay
    open (memory-mapped) until `stack` closes, so a tensor can be read with one from another shard.
    `spans`, if given, gets each tensor's (file, begin, end) bytes (for `Prefetcher`)."""
    tensors = {}
    for path in files:
        try:
            handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                if key in tensors:
                    raise UserError(f"tensor {key} is in {tensors[key][2].name} and in {path.name}: a checkpoint "
                                    "holds each tensor once")
                tensors[key] = ((lambda h=handle, k=key, p=path: _read(h, k, p)), handle.get_slice(key).get_dtype(),
                                path)
        except UserError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise UserError(f"cannot read {path.name}: {one_line(exc)}") from None
        if spans is not None:
            spans.update((k, (path, b, e)) for k, (b, e) in tensor_spans(path).items() if k in tensors)
    return tensors


def _read(handle, key: str, path: Path) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except Exception as exc:
        raise UserError(f"cannot read tensor {key} from {path.name}: {one_line(exc)}") from None


FP8 = "F8_E4M3"
SCALE_SUFFIX = "_scale_inv"


def dequantized(tensors: dict, cfg: ModelConfig,
                device: torch.device | None = None) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """The checkpoint's tensors in the model's terms: an FP8 weight is read with its block scales
    (`<name>_scale_inv`) and dequantised to float32 on `device` (the parameters': on a GPU only the
    FP8 bytes cross the bus, and the float32 product is the GPU's work, not the host's), the copy
    into a parameter casts it to the compute dtype; the scales themselves are consumed. Only
    checkpoints whose config declares FP8 may hold FP8 tensors; each needs its scale, and each scale
    its weight."""
    for key, (get, dtype, _) in tensors.items():
        if dtype.startswith("F8_") and dtype != FP8:
            raise UserError(f"tensor {key}: {dtype} weights are not supported (FP8 checkpoints hold F8_E4M3)")
        if dtype == FP8 and cfg.fp8_block is None:
            raise UserError(f"tensor {key} is float8 but config.json has no FP8 quantization_config")
        if cfg.fp8_block is not None and key.endswith(SCALE_SUFFIX):
            weight = key[:-len(SCALE_SUFFIX)]
            if tensors.get(weight, (None, None, None))[1] != FP8:
                raise UserError(f"tensor {key}: a scale without the FP8 weight {weight}")
            continue
        if dtype != FP8:
            yield key, get
            continue
        if key + SCALE_SUFFIX not in tensors:
            raise UserError(f"tensor {key} is FP8 but its scale {key + SCALE_SUFFIX} is missing")
        scale = tensors[key + SCALE_SUFFIX][0]
        yield key, (lambda g=get, sc=scale, k=key: dequantize_fp8(g().to(device), checked_scale(sc(), k).to(device),
                                                                  cfg.fp8_block, k))


def checked_scale(scale: torch.Tensor, key: str) -> torch.Tensor:
    """A weight's block scales as read (on the host, before they cross to the GPU): finite and not
    negative (0 is an all-zero block; no quantiser makes a negative or non-finite one)."""
    if scale.numel() and scale.is_floating_point() and not (float(scale.min()) >= 0 and float(scale.max()) < math.inf):
        bad = scale[~((scale >= 0) & scale.isfinite())].flatten()[0].item()
        raise UserError(f"tensor {key}{SCALE_SUFFIX}: scales must be finite and not negative, found {bad}")
    return scale


def dequantize_fp8(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], key: str) -> torch.Tensor:
    """weight = fp8 x scale of its (rows x columns) block, over the last two dims (edge blocks partial)."""
    if w.dim() < 2:
        raise UserError(f"tensor {key}: an FP8 weight must have 2 or more dims, got shape {tuple(w.shape)}")
    want = scale_shape(w.shape, block)
    if tuple(scale.shape) != want or not scale.is_floating_point():
        raise UserError(f"tensor {key}{SCALE_SUFFIX}: shape {tuple(scale.shape)} ({str(scale.dtype)[6:]}) does not "
                        f"match the {block[0]}x{block[1]} blocks of {key} {tuple(w.shape)}: expected {want}, float")
    return dequantize_blocks(w, scale, block)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def load_checkpoint(model: CausalLM, folder: Path, cfg: ModelConfig,
                    each_layer: Callable[[torch.nn.Module, Callable[[], None]], None] | None = None,
                    device: torch.device | None = None) -> None:
    """`each_layer(module, load)`: the model's layers, then the rest, are loaded one module at a
    time — `each_layer` makes the module's memory, calls `load` (its tensors), and may transform it
    (FP8: quantise, so that only one layer is ever held in the compute dtype). `device`: where FP8
    weights are dequantised (the parameters' device). Units load in layer order, the rest last,
    their bytes read ahead by a `Prefetcher`."""
    loader = WeightLoader(model, cfg)
    with contextlib.ExitStack() as stack:
        spans: dict[str, tuple[Path, int, int]] = {}
        raw = open_tensors(checkpoint_files(folder), stack, spans)
        by_layer: dict[int | None, list] = defaultdict(list)
        for key, get in dequantized(raw, cfg, device):
            m = _LAYER.match(normalize_name(key, cfg) or "")
            by_layer[int(m[1]) if m and int(m[1]) < cfg.num_layers else None].append((key, get))
        units: list[int | None] = [*range(cfg.num_layers), None]
        prefetch = Prefetcher([[spans[k] for key, _ in by_layer.get(u, []) for k in (key, key + SCALE_SUFFIX)
                                if k in spans] for u in units])
        stack.callback(prefetch.close)

        def load_unit(prefix: str, module: torch.nn.Module | None, unit: int | None) -> None:
            prefetch.advance(cfg.num_layers if unit is None else unit)  # (its place in `units`)
            if module is not None:
                loader.adopt(prefix, module)  # the parameters `each_layer` just made
            for key, get in by_layer.pop(unit, []):
                loader.load(key, get)
            loader.check_finite()

        if each_layer is None:
            for u in units:
                load_unit("", None, u)
        else:
            for i, layer in enumerate(model.model.layers):
                each_layer(layer, lambda i=i, layer=layer: load_unit(f"model.layers.{i}.", layer, i))
                loader.forget(f"model.layers.{i}.")
            each_layer(model, lambda: load_unit("", model, None))
    missing = loader.tracker.missing()
    if "lm_head.weight" in missing and cfg.tie_word_embeddings:
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)
        missing.remove("lm_head.weight")
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"checkpoint is missing tensors: {shown}")
