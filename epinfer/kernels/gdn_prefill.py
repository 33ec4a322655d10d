"""Gated DeltaNet prefill over many sequences at once (variable lengths, packed rows).

`causal_conv_varlen`: the depthwise causal conv + silu of every prefill row of a step, each
sequence continuing from its conv state (zeros for a fresh one), and the new conv states. One
gather per tap over the packed rows: no per-sequence work.

`chunk_rule_varlen`: the chunked gated delta rule over the packed rows, each sequence from its
own initial state, returning the outputs and the final states, and on request the state of a
sequence after a whole number of chunks into its rows (`capture`: prefix caching snapshots a state
inside a chunk without cutting it there). On CUDA with the field's Triton library (`fla-core`, an
optional GPU dependency; `EPINFER_FLA=0` turns it off) it is that library's varlen kernel (its
stages called one by one when states are captured: the per-chunk states are an intermediate it
does not return); elsewhere the torch form below, with all sequences batched: each is padded to
whole chunks and the chunk loop runs once for all of them. The single-sequence
`gdn_ops.chunk_gated_delta_rule` is its one-sequence case.

Shape suffixes: P packed rows, N sequences, C channels, H value heads, K key dim, V value dim.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from epinfer.core.env import SWITCHES
from epinfer.kernels.gdn_ops import CHUNK, prepare_qkv

try:  # Triton is optional: CPU installs don't have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

# fla-core autotunes each of its chunk kernels at first use: a dozen candidates compiled and timed,
# about half a minute of a first start-up. `fla_configs/<GPU>/` holds the choices it made on that GPU
# at the shipped shapes' sizes (benchmarks/fla_configs.py wrote them), in fla's own format. Unless the
# user configures fla's config cache (FLA_CACHE_MODE or FLA_CONFIG_DIR set), fla is pointed at our
# folder for the GPU of its first call, exact matches only: any other size, or a GPU without a folder,
# autotunes as before. Set on fla's module, not in the environment, which ranks spawned later inherit.
FLA_CONFIGS = Path(__file__).parent / "fla_configs"
_fla_configs_pending = True


def fla_config_dir(gpu_name: str) -> Path | None:
    """Our fla config folder for a GPU of this name (fla's spelling of it), if we ship one."""
    folder = FLA_CONFIGS / (re.sub(r"[^0-9A-Za-z]+", "_", gpu_name).strip("_") or "unknown_gpu")
    return folder if folder.is_dir() else None


def use_shipped_fla_configs(fla_cache, gpu_name: str) -> bool:
    """Points fla's config cache module (`fla.ops.utils.cache`) at our folder for `gpu_name`, exact
    matches only, unless the user configured it or we ship nothing for that GPU (or that fla has no
    such module attributes). Returns whether it did."""
    folder = fla_config_dir(gpu_name)
    if folder is None or "FLA_CACHE_MODE" in os.environ or "FLA_CONFIG_DIR" in os.environ:
        return False
    modes = getattr(fla_cache, "FlaCacheMode", None)
    if modes is None or not hasattr(fla_cache, "get_fla_config_dir") or not hasattr(fla_cache, "FLA_CACHE_MODE"):
        return False
    fla_cache.FLA_CACHE_MODE = modes.STRICT
    fla_cache.get_fla_config_dir = lambda: folder
    return True


try:  # optional: GPU installs only (it pulls in Triton; never in the CPU test environment)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _fla_chunk
except Exception:  # pragma: no cover - ImportError, or a Triton / driver mismatch at import
    _fla_chunk = None
try:  # the stages of that kernel (fla-core 0.6's layout), for the per-chunk states
    from fla.modules.norm.l2norm import l2norm_fwd as _fla_l2norm
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h as _fla_states
    from fla.ops.common.chunk_o import chunk_fwd_o as _fla_output
    from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra as _fla_intra
    from fla.ops.utils import chunk_local_cumsum as _fla_cumsum
    from fla.ops.utils.constant import RCP_LN2 as _RCP_LN2
except Exception:  # pragma: no cover
    _fla_states = None


def fla_usable(x: torch.Tensor) -> bool:
    global _fla_configs_pending
    usable = _fla_chunk is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and SWITCHES.fla
    if usable and _fla_configs_pending:  # (before fla's first kernel runs: every call comes through here)
        _fla_configs_pending = False
        import fla.ops.utils.cache as fla_cache

        use_shipped_fla_configs(fla_cache, torch.cuda.get_device_name(x.device))
    return usable


def conv_taps(lens: list[int], kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Host index tensors into `cat([previous inputs of each sequence, N*(K-1) rows], packed rows)`:
    taps [K, P] (tap m of row t reads input t - (K-1) + m of its sequence) and the new state rows
    [N, K-1] (each sequence's last K-1 inputs)."""
    n, k1 = len(lens), kernel - 1
    head = n * k1
    taps, state = [], []
    start = 0
    for j, length in enumerate(lens):
        local = torch.arange(length)
        src = local[None, :] - k1 + torch.arange(kernel)[:, None]  # [K, n_j] positions in the sequence
        taps.append(torch.where(src >= 0, head + start + src, j * k1 + k1 + src))
        last = torch.arange(length - k1, length)
        state.append(torch.where(last >= 0, head + start + last, j * k1 + k1 + last))
        start += length
    return torch.cat(taps, dim=1), torch.stack(state)


def causal_conv_varlen(x_PC: torch.Tensor, prev_NCk: torch.Tensor, w_CK: torch.Tensor, taps_KP: torch.Tensor,
                       state_rows: torch.Tensor, norm_cols: int = 0, head_dim: int = 0,
                       groups: tuple[int, ...] | None = None,
                       cfg: tuple[int, int, int] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """silu(causal depthwise conv) of the packed rows [P, C] in x's dtype (accumulated in fp32), as
    the column groups of widths `groups` (default: one, [P, C]), and the new conv states [N, C, K-1].
    `prev_NCk`: each sequence's previous K-1 inputs (zeros when fresh). `norm_cols` (the Triton kernel
    only, see `conv_norm_fusable`): the first `norm_cols` channels (q and k) come out L2-normalised
    per head of `head_dim`, before rounding. The Triton kernel writes each group contiguous where
    the groups fall on its channel blocks (`planar_groups`): q, k and v then reach the chunk kernel
    without the copies it makes of strided inputs (three [P, width] copies a GDN layer). `cfg`: the
    kernel's (rows, channels, warps) a program (default `CONV_CONFIG`; the sweep's)."""
    N, C, k1 = prev_NCk.shape
    # the "previous inputs" rows, contiguous: for one sequence the reshape is a view with a column
    # stride of K-1, and the kernel takes a row stride only
    head = prev_NCk.transpose(1, 2).reshape(N * k1, C).to(x_PC.dtype).contiguous()
    if conv_kernel_usable(x_PC):
        # the kernel reads the previous inputs and the packed rows where they are: no concatenated copy
        # of every row (a [8192, 8192] copy a GDN layer at the Qwen3.5 shape's step)
        flat, n = state_rows.flatten(), head.shape[0]
        new_state = torch.where((flat < n)[:, None], head[flat.clamp(max=max(n - 1, 0))], x_PC[(flat - n).clamp(min=0)])
        P, K = x_PC.shape[0], w_CK.shape[1]
        assert groups is None or sum(groups) == C, f"column groups {groups} do not add up to {C}"
        block_t, block_c, warps = cfg or CONV_CONFIG
        planar = planar_groups(groups or (C,), block_c)
        out = torch.empty(P * C, dtype=x_PC.dtype, device=x_PC.device)
        starts = list(itertools.accumulate(planar))  # group ends; groups past the second never start
        _conv_varlen_kernel[(triton.cdiv(P, block_t), triton.cdiv(C, block_c))](
            head, x_PC, taps_KP, w_CK, out, n, P, C, norm_cols, head.stride(0), x_PC.stride(0), taps_KP.stride(0),
            w_CK.stride(0), *(starts + [C, C])[:2], K=K, BLOCK_T=block_t, BLOCK_C=block_c,
            NORM=norm_cols > 0, HEAD=head_dim or block_c, num_warps=warps)
        parts = [out[P * (end - width):P * end].view(P, width) for end, width in zip(starts, planar, strict=True)]
        if len(planar) == 1 and groups and len(groups) > 1:
            parts = list(torch.split(parts[0], list(groups), dim=1))
        return parts, new_state.view(N, k1, C).transpose(1, 2)
    assert not norm_cols, "the q / k norm is fused in the Triton kernel only"
    src = torch.cat([head, x_PC])
    new_state = src[state_rows.flatten()].view(N, k1, C).transpose(1, 2)
    acc = None
    for m in range(w_CK.shape[1]):
        term = src[taps_KP[m]].float() * w_CK[:, m].float()
        acc = term if acc is None else acc + term
    return list(torch.split(F.silu(acc).to(x_PC.dtype), list(groups or (C,)), dim=1)), new_state


def planar_groups(groups: tuple[int, ...], block_c: int | None = None) -> tuple[int, ...]:
    """The column groups the conv kernel writes apart: `groups` when at most three and each boundary
    falls on a channel block (every program writes inside one group), else all the columns as one
    (and always with EPINFER_MIXED_STEP_KERNELS=0)."""
    block_c = block_c or CONV_CONFIG[1]
    ok = SWITCHES.mixed_step_kernels and len(groups) <= 3 and all(width % block_c == 0 for width in groups[:-1])
    return tuple(groups) if ok else (sum(groups),)


CONV_CONFIG = (16, 256, 4)  # rows, channels (a multiple of the head size: the fused norm), warps


def conv_kernel_usable(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def conv_norm_fusable(x: torch.Tensor, key_dim: int, head_dim: int) -> bool:
    """Whether the conv kernel can L2-normalise q and k (each channel block holds whole heads of
    q or k only), so the chunk kernel needs no norm launch (and no autotuning of its own)."""
    return (conv_kernel_usable(x) and fla_usable(x) and CONV_CONFIG[1] % head_dim == 0
            and (2 * key_dim) % CONV_CONFIG[1] == 0)


def varlen_index(lens: list[int], device: torch.device, capture: list[tuple[int, int]] = ()) -> dict:
    """The fla kernel's per-step index tensors, built once on the host and copied without a stream
    sync, shared by every layer of the step: row offsets [N + 1], the chunk list [chunks, 2]
    (sequence, chunk within it) and, for `chunk_rule_varlen`'s `capture` pairs, the chunk whose
    starting state each one is [M] (or None)."""
    cu_host = torch.tensor([0, *itertools.accumulate(lens)])
    chunks = torch.tensor([(i, c) for i, n in enumerate(lens) for c in range(-(-n // CHUNK))], dtype=torch.long)
    first = [0, *itertools.accumulate(-(-n // CHUNK) for n in lens)]
    at = torch.tensor([first[j] + r // CHUNK for j, r in capture], dtype=torch.long)
    cu, chunk_indices, at = (t.to(device, non_blocking=True) for t in (cu_host, chunks, at))
    return {"cu_seqlens": cu, "cu_seqlens_cpu": cu_host, "chunk_indices": chunk_indices,
            "capture_chunks": at if capture else None}


def capture_exact(x: torch.Tensor, state_dtype: torch.dtype) -> bool:
    """Whether `chunk_rule_varlen` captures states inside a chunk exactly as a chunk ending there
    would leave them in a cache of `state_dtype`: always in the torch form (float32 inside); with
    fla when its per-chunk states (stored in x's dtype) are in the cache's dtype (the bf16 state
    of a bf16 model) and its stages are importable."""
    if not fla_usable(x):
        return True
    return _fla_states is not None and state_dtype == x.dtype


def chunk_rule_varlen(q_PHK, k_PHK, v_PHV, g_PH, beta_PH, lens: list[int], index: dict | None,
                      init_NHKV: torch.Tensor, normalized: bool = False, capture: list[tuple[int, int]] = ()):
    """(outputs [P, H, V] in v's dtype, final states [N, H, K, V] fp32, captured states [M, H, K, V]
    or None). `index`: `varlen_index` of `lens` (the fla kernel's; built here when None).
    `normalized`: q and k are already L2-normalised (the fla kernel only). `capture`: (sequence,
    rows) pairs, rows a multiple of the chunk and inside the sequence: its state after those rows
    (fp32 in the torch form; in v's dtype with fla, see `capture_exact`); `index`, when given, was
    built with the same pairs."""
    assert all(0 < r < lens[j] and r % CHUNK == 0 for j, r in capture), f"bad capture points {capture}"
    if fla_usable(v_PHV):
        index = index or varlen_index(lens, v_PHV.device, capture)
        if capture:
            return _fla_with_states(q_PHK, k_PHK, v_PHV, g_PH, beta_PH, lens, index, init_NHKV, normalized, capture)
        out, final = _fla_chunk(q_PHK[None], k_PHK[None], v_PHV[None], g_PH[None].float(), beta_PH[None],
                                scale=q_PHK.shape[-1] ** -0.5, initial_state=init_NHKV.float(),
                                output_final_state=True, use_qk_l2norm_in_kernel=not normalized,
                                cu_seqlens=index["cu_seqlens"], cu_seqlens_cpu=index["cu_seqlens_cpu"],
                                chunk_indices=index["chunk_indices"])
        return out[0], final, None
    return chunk_rule_torch(q_PHK, k_PHK, v_PHV, g_PH, beta_PH, lens, init_NHKV, capture)


def _fla_with_states(q_PHK, k_PHK, v_PHV, g_PH, beta_PH, lens, index, init_NHKV, normalized, capture):
    """fla's forward stage by stage, as its `chunk_gated_delta_rule` runs them (same kernels, same
    arithmetic), keeping the state it stores at the start of every chunk: sequence j's state after
    r rows is chunk (its first chunk + r / CHUNK)'s."""
    assert _fla_states is not None, "this fla-core has no per-chunk states (capture_exact said so)"
    q, k, v = (t[None].contiguous() for t in (q_PHK, k_PHK, v_PHV))
    if not normalized:
        q, k = _fla_l2norm(q)[0], _fla_l2norm(k)[0]
    cu, chunks = index["cu_seqlens"], index["chunk_indices"]
    g = _fla_cumsum(g_PH[None].float().contiguous(), chunk_size=CHUNK, scale=_RCP_LN2, cu_seqlens=cu,
                    chunk_indices=chunks)
    w, u, _ = _fla_intra(k=k, v=v, g=g, beta=beta_PH[None].contiguous(), cu_seqlens=cu, chunk_size=CHUNK,
                         chunk_indices=chunks)
    h, v_new, final = _fla_states(k=k, w=w, u=u, g=g, initial_state=init_NHKV.float().contiguous(),
                                  output_final_state=True, cu_seqlens=cu, chunk_indices=chunks, chunk_size=CHUNK)
    out = _fla_output(q=q, k=k, v=v_new, h=h, g=g, scale=q_PHK.shape[-1] ** -0.5, cu_seqlens=cu,
                      chunk_size=CHUNK, chunk_indices=chunks)
    return out[0].to(v_PHV.dtype), final, h[0, index["capture_chunks"]]


def chunk_rule_torch(q_PHK, k_PHK, v_PHV, g_PH, beta_PH, lens: list[int], init_NHKV: torch.Tensor | None,
                     capture: list[tuple[int, int]] = ()):
    """The chunked form for N packed sequences at once (the reference; float32 inside); with
    `capture` as `chunk_rule_varlen`'s."""
    out_dtype, num_heads = v_PHV.dtype, v_PHV.shape[-2]
    q, k, v, beta, g = prepare_qkv(q_PHK, k_PHK, v_PHV, beta_PH, g_PH, num_heads)  # [H, P, *]
    H, P, K = k.shape
    V = v.shape[-1]
    N = len(lens)
    chunks = [-(-n // CHUNK) for n in lens]
    L = max(chunks) * CHUNK
    # padded layout [N, L]: row index into the packed rows, P (a zero row) for padding
    pad_idx = torch.full((N, L), P, dtype=torch.long)
    start = 0
    for j, n in enumerate(lens):
        pad_idx[j, :n] = torch.arange(start, start + n)
        start += n
    pad_idx = pad_idx.to(q.device, non_blocking=True)

    def padded(t: torch.Tensor) -> torch.Tensor:  # [H, P, *] -> [N, H, L, *] (zeros past each sequence)
        t = torch.cat([t, t.new_zeros(H, 1, *t.shape[2:])], dim=1)
        return t[:, pad_idx].transpose(0, 1)

    q, k, v, beta, g = (padded(t) for t in (q, k, v, beta, g))
    C = L // CHUNK
    v_beta = (v * beta[..., None]).view(N, H, C, CHUNK, V)
    k_beta = (k * beta[..., None]).view(N, H, C, CHUNK, K)
    q, k = q.view(N, H, C, CHUNK, K), k.view(N, H, C, CHUNK, K)
    g_cum = g.view(N, H, C, CHUNK).cumsum(dim=-1)  # log decay from chunk start to each position
    upper = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).triu(1)
    decay_ij = (g_cum[..., :, None] - g_cum[..., None, :]).masked_fill(upper, float("-inf")).exp()
    # lower-triangular system (I + A) X = B of the WY / UT form of the delta rule inside a chunk
    system = (k_beta @ k.transpose(-1, -2)) * decay_ij
    intra = (q @ k.transpose(-1, -2)) * decay_ij
    u = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta * g_cum.exp()[..., None], upper=False, unitriangular=True)
    S = torch.zeros(N, H, K, V, dtype=torch.float32, device=q.device) if init_NHKV is None else init_NHKV.float()
    out = torch.empty(N, H, C, CHUNK, V, dtype=torch.float32, device=q.device)
    q_dec = q * g_cum.exp()[..., None]
    k_dec = k * (g_cum[..., -1:] - g_cum).exp()[..., None]
    chunk_decay = g_cum[..., -1].exp()[..., None, None]  # [N, H, C, 1, 1]
    captured: list[torch.Tensor | None] = [None] * len(capture)
    for c in range(C):  # padding past a sequence's end: g = 0, k = v = 0, so its state is unchanged
        v_new = u[:, :, c] - w[:, :, c] @ S
        out[:, :, c] = q_dec[:, :, c] @ S + intra[:, :, c] @ v_new
        S = S * chunk_decay[:, :, c] + k_dec[:, :, c].transpose(-1, -2) @ v_new
        for i, (j, r) in enumerate(capture):
            if r == (c + 1) * CHUNK:
                captured[i] = S[j]
    out = out.view(N, H, L, V).transpose(1, 2)  # [N, L, H, V]
    valid = pad_idx < P
    # rows back in packed order (sequence after sequence)
    return out[valid].to(out_dtype), S, torch.stack(captured) if capture else None


if triton is not None:

    @triton.jit(do_not_specialize=["n_prev", "P", "s_taps", "norm_cols"])  # one kernel for any row count
    def _conv_varlen_kernel(PREV, X, TAPS, W, OUT, n_prev, P, C, norm_cols, s_prev, s_x, s_taps, s_w, end0, end1,
                            K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                            NORM: tl.constexpr, HEAD: tl.constexpr):
        """Program (row block, channel block): out[t, c] = silu(sum_m w[c, m] * src[taps[m, t], c]),
        src = the rows of PREV [n_prev, C] then those of X [P, C] (each read where it is); with NORM,
        a block of the first `norm_cols` channels is L2-normalised per head of HEAD. OUT holds the
        column groups [0, end0), [end0, end1), [end1, C) one after another, each [P, width]
        contiguous (a block lies inside one group)."""
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        t_ok, c_ok = offs_t < P, offs_c < C
        ok = t_ok[:, None] & c_ok[None, :]
        acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for m in tl.static_range(K):
            row = tl.load(TAPS + m * s_taps + offs_t, mask=t_ok, other=0).to(tl.int64)
            before = (row < n_prev)[:, None]  # exactly one of the two loads reads
            x = (tl.load(PREV + row[:, None] * s_prev + offs_c[None, :], mask=ok & before, other=0.0).to(tl.float32)
                 + tl.load(X + (row - n_prev)[:, None] * s_x + offs_c[None, :], mask=ok & ~before,
                           other=0.0).to(tl.float32))
            w = tl.load(W + offs_c * s_w + m, mask=c_ok, other=0.0).to(tl.float32)
            acc += x * w[None, :]
        out = acc / (1.0 + tl.exp(-acc))
        if NORM:  # noqa: SIM102 - a compile-time branch around a run-time one
            if tl.program_id(1) * BLOCK_C < norm_cols:
                heads = tl.reshape(out, (BLOCK_T, BLOCK_C // HEAD, HEAD))
                inv = tl.rsqrt(tl.sum(heads * heads, axis=2) + 1e-6)  # as gdn_ops.l2norm
                out = tl.reshape(heads * inv[:, :, None], (BLOCK_T, BLOCK_C))
        c0 = tl.program_id(1) * BLOCK_C
        first = tl.where(c0 >= end1, end1, tl.where(c0 >= end0, end0, 0))  # the block's group: its first column
        width = tl.where(c0 >= end1, C, tl.where(c0 >= end0, end1, end0)) - first
        at = P.to(tl.int64) * first + offs_t[:, None].to(tl.int64) * width + (offs_c[None, :] - first)
        tl.store(OUT + at, out.to(OUT.dtype.element_ty), mask=ok)
