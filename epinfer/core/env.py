"""Every `EPINFER_*` environment variable, typed and read in one place.

Switches here change how a kernel runs or what a rank prints, never which collectives run. The two
that change the collective schedule are read here only as the defaults of their flags
(`--parallel-graphs`, `--symm-mem`): the command line turns them into fields of the run
description, which every rank compares at start-up (`runtime.worker.agree_settings`), so a rank
whose environment differs is a one-line error instead of a hang.

  EPINFER_COMPILE=0           small elementwise ops eager instead of `torch.compile` (A/B runs)
  EPINFER_MOE_TRITON=0        MoE experts through cuBLAS grouped GEMMs instead of the Triton kernels
  EPINFER_MOE_CONFIGS=FILE    a tile table from `benchmarks/moe_kernel_sweep.py` instead of the built-in one
  EPINFER_PDL=0               no programmatic dependent launch on Hopper
  EPINFER_FLA=0               GDN prefill through the torch chunked form instead of fla-core's kernel
  EPINFER_PIECEWISE=0         prefill and mixed steps without graph pieces (`runner.piecewise`), eagerly
  EPINFER_CHUNK_ATTENTION=0   prompt chunks' attention through SDPA per chunk instead of one Triton kernel
                              over the paged cache (`kernels.prefill_attention`)
  EPINFER_CUDNN_CHUNKS=0      prompt chunks of 4,096 rows or more through the Triton kernel, not cuDNN's
                              attention (`kernels.cudnn_attention`), and long prompts not cut at multiples
                              of 2,048 tokens
  EPINFER_FP8_DECODE_W16=1    FP8 weights widened to bf16 in registers, activations unquantised, at every
                              decode size (`kernels.fp8_gemm`); by default only in steps of 8 tokens or fewer,
                              where it is faster; =0 never
  EPINFER_FP8_DEQUANT_PAIRS=N  FP8 experts of steps with N or more pairs an expert (prefill sizes) dequantised
                              to the compute dtype each layer and run through cuBLAS's grouped GEMM
                              (`layers.moe`); default 2048, 0: never
  EPINFER_FP8_CUBLAS=0        FP8 projections of 256 rows or more, 2048 x 2048 or wider, through the Triton
                              kernel instead of cuBLAS's block-scaled GEMM (`kernels.fp8_gemm`; A/B runs)
  EPINFER_MIXED_STEP_KERNELS=0  the SiLU-mul kernel and the GDN conv kernel's separate q / k / v outputs
                              off (prefill and mixed steps; A/B runs)
  EPINFER_STATE_CAPTURE=0     prefix caching in hybrid models cuts a prompt chunk at each GDN state snapshot
                              instead of capturing the state inside the chunk (`engine.scheduler`; A/B runs)
  EPINFER_EXPANDABLE_SEGMENTS=0  the CUDA caching allocator's fixed-size segments in a single-process run
                              (`engine.memory.expandable_segments`; A/B runs)
  EPINFER_PERMUTE_KERNEL=0    the decode MoE's pair permutation by the compiled torch counting sort instead of
                              one Triton program (`kernels.moe_triton`; A/B runs)
  EPINFER_MOE_TRITON_MAX=N    pairs per expert up to which the Triton expert kernels run (default 96)
  EPINFER_PDL_PRELOAD=0       one-row projections, the router and the FP8 experts' down kernel load their
                              weights after their PDL wait, not before (`kernels.pdl.PRELOAD_BYTES`; A/B runs)
  EPINFER_PRELOAD_KERNELS=0   no parallel compile of the GPU's kernel manifest at start-up (`kernels.preload`)
  EPINFER_RECORD_KERNELS=FILE  every Triton kernel variant a process compiles appended to FILE (a manifest)
  EPINFER_STACKS_AFTER=S      debugging a hang: every rank dumps all Python stacks every S seconds
  EPINFER_PARALLEL_GRAPHS=1   the default of --parallel-graphs
  EPINFER_SYMM_MEM=1          the default of --symm-mem
  EPINFER_SYMM_MEM_BYTES=N    the largest collective the symmetric-memory path takes (default 1 MiB)
  EPINFER_SPAWNED=1           set by the launcher in the ranks it spawns (they are not under torchrun)
  EPINFER_API_KEY=KEY         serve: the key clients must send (as --api-key, kept out of the process list)

fla-core's own FLA_CACHE_MODE and FLA_CONFIG_DIR are left to the user when either is set; otherwise
fla takes exact matches from the autotune choices shipped for the GPU (`kernels.gdn_prefill`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from epinfer.core.errors import UserError
from epinfer.core.untrusted import one_line, open_regular

_OFF = ("0", "false", "off", "no")
_ON = ("1", "true", "on", "yes")


def _on(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None or not value.strip() else value.strip().lower() not in _OFF


def _number(name: str, kind, default):
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = kind(text)
    except ValueError:
        raise UserError(f"{name}={text!r}: give a number") from None
    if not 0 < value < float("inf"):
        raise UserError(f"{name}={text!r}: give a positive number")
    if value < LEAST.get(name, 0):
        raise UserError(f"{name}={text!r}: give at least {LEAST[name]:g}")
    return value


LEAST = {"EPINFER_STACKS_AFTER": 1.0}  # (seconds: dumping every stack more often floods stderr and can crash)


class Switches:
    """Each property reads its variable when asked (a bad number is a one-line UserError then,
    never at import)."""

    @property
    def compile(self) -> bool:
        return _on("EPINFER_COMPILE", True)

    @property
    def moe_triton(self) -> bool:
        return _on("EPINFER_MOE_TRITON", True)

    @property
    def expandable_segments(self) -> bool:
        return _on("EPINFER_EXPANDABLE_SEGMENTS", True)

    @property
    def permute_kernel(self) -> bool:
        """The decode MoE's pair permutation as one Triton program (`kernels.moe_triton.permute`, up
        to 1024 pairs); EPINFER_PERMUTE_KERNEL=0: the compiled torch counting sort."""
        return _on("EPINFER_PERMUTE_KERNEL", True)

    @property
    def moe_triton_max(self) -> float:
        """Average pairs per expert up to which the Triton expert kernels run; beyond, cuBLAS's
        grouped GEMM (EPINFER_MOE_TRITON_MAX, for the prefill-size comparison)."""
        return _number("EPINFER_MOE_TRITON_MAX", float, 96.0)

    @property
    def moe_configs(self) -> str | None:
        return os.environ.get("EPINFER_MOE_CONFIGS") or None

    @property
    def pdl(self) -> bool:
        return _on("EPINFER_PDL", True) and os.environ.get("TRITON_INTERPRET", "0") != "1"

    @property
    def pdl_preload(self) -> bool:
        return _on("EPINFER_PDL_PRELOAD", True)

    @property
    def fla(self) -> bool:
        return _on("EPINFER_FLA", True)

    @property
    def piecewise(self) -> bool:
        return _on("EPINFER_PIECEWISE", True)

    @property
    def chunk_attention(self) -> bool:
        return _on("EPINFER_CHUNK_ATTENTION", True)

    @property
    def preload_kernels(self) -> bool:
        return _on("EPINFER_PRELOAD_KERNELS", True)

    @property
    def api_key(self) -> str | None:
        return os.environ.get("EPINFER_API_KEY") or None

    @property
    def record_kernels(self) -> str | None:
        return os.environ.get("EPINFER_RECORD_KERNELS") or None

    @property
    def cudnn_chunks(self) -> bool:
        return _on("EPINFER_CUDNN_CHUNKS", True)

    @property
    def mixed_step_kernels(self) -> bool:
        """The SiLU-mul kernel (`kernels/activation.py`) and the conv kernel's separate q / k / v
        outputs (`gdn_prefill.planar_groups`): the throughput profile ran 5.2 % faster with them on
        an H200, in the same call (RESULTS.md, end-to-end workloads); EPINFER_MIXED_STEP_KERNELS=0
        for an A/B run."""
        return _on("EPINFER_MIXED_STEP_KERNELS", True)

    @property
    def state_capture(self) -> bool:
        return _on("EPINFER_STATE_CAPTURE", True)

    @property
    def fp8_w16_tokens(self) -> int:
        """The most tokens a step may carry for FP8 weights to take the weight-only decode mode
        (`kernels.fp8_gemm`): 8 by default (on an H200 the 30B shape's batch-1 step took 3.137 ms
        in it against 3.375, and batch 64 14.668 against 13.256); EPINFER_FP8_DECODE_W16=1 at every
        decode size, =0 never."""
        value = os.environ.get("EPINFER_FP8_DECODE_W16")
        if value is None:
            return 8
        return 1 << 30 if _on("EPINFER_FP8_DECODE_W16", False) else 0

    @property
    def fp8_dequant_pairs(self) -> float | None:
        """Average pairs an expert from which FP8 experts are dequantised and run as bf16 grouped
        GEMMs (EPINFER_FP8_DEQUANT_PAIRS, default 2048); None (=0): never. The dequantisation costs a
        pass over the layer's expert weights, the same for any number of rows, while the FP8 grouped
        kernel loses to bf16's grouped GEMM by a share of the rows' work, so it pays for large steps
        only. On an H100 the 30B shape's 64 x 1024 prefill (1024 pairs an expert a step) ran 6 %
        faster on the FP8 kernel (its tiles with "n_fast") than dequantised (RESULTS.md); larger
        steps were not compared, and the threshold sits at twice that."""
        if os.environ.get("EPINFER_FP8_DEQUANT_PAIRS", "").strip() == "0":
            return None
        return _number("EPINFER_FP8_DEQUANT_PAIRS", float, 2048.0)

    @property
    def fp8_cublas(self) -> bool:
        """FP8 linears of 256 rows or more through cuBLAS's block-scaled GEMM (`kernels.fp8_gemm`)
        where it runs (Hopper, CUDA 12.9 or later): the 30B shape's 64 x 1024 prefill ran 8.6 %
        faster with it on an H200."""
        return _on("EPINFER_FP8_CUBLAS", True)

    @property
    def stacks_after(self) -> float | None:
        return _number("EPINFER_STACKS_AFTER", float, None)

    @property
    def parallel_graphs(self) -> bool:
        return _on("EPINFER_PARALLEL_GRAPHS", False)

    @property
    def symm_mem(self) -> bool:
        return _on("EPINFER_SYMM_MEM", False)

    @property
    def symm_mem_bytes(self) -> int:
        return _number("EPINFER_SYMM_MEM_BYTES", int, 1 << 20)

    @property
    def spawned(self) -> bool:
        return _on("EPINFER_SPAWNED", False)


SWITCHES = Switches()

# every variable `Switches` reads, by kind (`check_switches`)
KNOWN = {"EPINFER_COMPILE": bool, "EPINFER_MOE_TRITON": bool, "EPINFER_MOE_CONFIGS": str, "EPINFER_PDL": bool,
         "EPINFER_PDL_PRELOAD": bool,
         "EPINFER_FLA": bool, "EPINFER_PIECEWISE": bool, "EPINFER_CHUNK_ATTENTION": bool,
         "EPINFER_CUDNN_CHUNKS": bool, "EPINFER_FP8_DECODE_W16": bool, "EPINFER_FP8_DEQUANT_PAIRS": float,
         "EPINFER_FP8_CUBLAS": bool, "EPINFER_MIXED_STEP_KERNELS": bool, "EPINFER_STATE_CAPTURE": bool,
         "EPINFER_EXPANDABLE_SEGMENTS": bool, "EPINFER_PERMUTE_KERNEL": bool, "EPINFER_MOE_TRITON_MAX": float,
         "EPINFER_STACKS_AFTER": float, "EPINFER_PARALLEL_GRAPHS": bool, "EPINFER_SYMM_MEM": bool,
         "EPINFER_SYMM_MEM_BYTES": int, "EPINFER_SPAWNED": bool, "EPINFER_PRELOAD_KERNELS": bool,
         "EPINFER_RECORD_KERNELS": str, "EPINFER_API_KEY": str}


ZERO_OFF = {"EPINFER_FP8_DEQUANT_PAIRS"}  # numbers whose 0 turns the mode off
_NOTED: set[str] = set()


def _tile_table(name: str, value: str) -> None:
    """EPINFER_MOE_CONFIGS: a JSON file, read at the first MoE step on a GPU (a traceback there)."""
    what = f"{name}={value!r}"
    fd, _ = open_regular(value, what)
    with open(fd, "rb") as f:
        data = f.read(MAX_TABLE_BYTES + 1)
    try:
        table = json.loads(data)
    except (ValueError, RecursionError) as exc:  # (not UTF-8 text is a ValueError too)
        raise UserError(f"{what}: not a JSON tile table ({one_line(exc, 120)})") from None
    if len(data) > MAX_TABLE_BYTES or not isinstance(table, (dict, list)):
        raise UserError(f"{what}: not a tile table (a JSON object or list, as benchmarks/moe_kernel_sweep.py writes)")


def _appended_file(name: str, value: str) -> None:
    """EPINFER_RECORD_KERNELS: a file in an existing folder, appended to as kernels compile."""
    path = Path(value)
    if path.is_dir() or not path.parent.is_dir():
        raise UserError(f"{name}={value!r}: not a file in an existing folder")


MAX_TABLE_BYTES = 16 << 20
FILES = {"EPINFER_MOE_CONFIGS": _tile_table, "EPINFER_RECORD_KERNELS": _appended_file}  # checked at start


def check_switches() -> None:
    """Every EPINFER_* variable that is set, checked once at start (the command line, `LLM`): a switch
    reads 1 or 0 (true / false, on / off, yes / no), a number a positive number, or a one-line
    UserError — "EPINFER_PDL=disable" would otherwise mean on; a file switch a file it can use (`FILES`:
    read or appended to only later, on a GPU); a name this version does not read
    gets a one-line note (a misspelt switch would otherwise change nothing, silently)."""
    unknown = []
    for name, value in sorted(os.environ.items()):
        kind = KNOWN.get(name)
        if not name.startswith("EPINFER_") or not value.strip():
            continue
        if kind is None:
            if name not in _NOTED:  # (once a process)
                unknown.append(name)
                _NOTED.add(name)
        elif kind is bool and value.strip().lower() not in _OFF + _ON:
            raise UserError(f"{name}={value!r}: give 1 or 0 (true / false, on / off, yes / no)")
        elif kind in (int, float) and not (name in ZERO_OFF and value.strip() == "0"):
            _number(name, kind, None)
        elif name in FILES:
            FILES[name](name, value)
    if unknown:
        print(f"epinfer: note: {', '.join(unknown)} {'is not a variable' if len(unknown) == 1 else 'are not variables'}"
              f" this version reads (ignored; epinfer/core/env.py lists them)", file=sys.stderr)


def mark_spawned() -> None:
    """In a rank the launcher spawned: it is not a torchrun rank, whatever RANK says."""
    os.environ["EPINFER_SPAWNED"] = "1"


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and not SWITCHES.spawned


def raise_open_file_limit() -> None:
    """The soft limit on open files raised to the hard one: a server holds a socket per client, and
    the common soft limit of 1024 is reached below a thousand concurrent streams (as vLLM and
    SGLang do at start-up). Nothing happens where the platform has no such limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):  # (a platform may refuse: the limit stays)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
