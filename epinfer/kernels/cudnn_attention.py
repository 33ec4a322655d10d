"""Long prompt chunks' attention through cuDNN, in shapes from a small fixed set.

cuDNN's fused attention (through PyTorch) ran a long chunk's causal attention 22-35 % faster than the
prompt-chunk kernel of `prefill_attention` on an H200 at the Qwen3.5 shape (RESULTS.md, kernel
sweeps), but plans a kernel for every new shape (about 40 ms each), and prompt chunks come in every
length. So a chunk takes this path only in shapes that repeat:

- its own rows, padded at the end to a multiple of `PAD` (a padded query comes after every real
  one, so under the causal mask no real query sees a padded key; padded rows' outputs are dropped);
- its cached context, when it has one, a multiple of `ALIGN` tokens up to `MAX_CONTEXT`: the
  scheduler cuts a long prompt's chunks at multiples of `ALIGN` where that costs little of the
  step's budget, and rather than start one with a sliver of a step, it waits (`engine.scheduler`);
- at most `MAX_SHAPES` distinct (rows, context) shapes in a process (two plans each at most, the
  causal one shared by every context): past them, new shapes take the Triton kernel.

A chunk after context is two calls, its own keys causal and the context's unmasked, merged by their
log-sum-exps (`merge`). The context's keys are gathered from the paged cache into one dense copy.
Chunks of `MIN_ROWS` or more take this path unless EPINFER_CUDNN_CHUNKS=0 (the long-context profile:
49,941 against 46,357 tok/s on an H200, RESULTS.md); the rest of the step stays on
`prefill_attention`. The engine's start-up runs one chunk of each kind (`warm_up`): the merge's
compilation and a refusal (an old cuDNN, say) happen there.

Shape suffixes: N a chunk's rows, P padded rows, C context tokens, H query heads, KVH key/value heads.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from epinfer.core.env import SWITCHES
from epinfer.core.untrusted import one_line
from epinfer.kernels.fused import fused
from epinfer.kernels.paged_attention import cached_tokens

PAD = 512  # a chunk's rows padded to a multiple of this: 64 shapes up to 32,768 rows
ALIGN = 2048  # long prompts are cut at multiples of this many tokens, so their contexts come in few sizes
MIN_ROWS = 4096  # chunks this long take cuDNN (fresh chunks of 4,096 rows: 529 against 336 TFLOP/s)
MAX_CONTEXT = 65536  # longer contexts stay on the Triton kernel (the dense copy of the context's keys)
MAX_SHAPES = 64  # (rows, context) shapes a process plans at most (about 40 ms a plan)

# (q [1, H, P, hd], k [1, KVH, L, hd], v, causal, scale) -> (out [1, H, P, hd], log-sum-exp [1, H, P] float32)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple[torch.Tensor, torch.Tensor]]


_REFUSED: list[str] = []  # why cuDNN failed once: the path is off for the rest of the run
_SHAPES: set[tuple[int, int]] = set()  # (padded rows, context tokens) planned so far


def usable(q_THd: torch.Tensor) -> bool:
    return (SWITCHES.cudnn_chunks and not _REFUSED and q_THd.is_cuda and q_THd.dtype in (torch.bfloat16, torch.float16)
            and torch.backends.cudnn.is_available())


def alignment(probe: torch.Tensor, budget: int) -> tuple[int, int]:
    """The scheduler's (rows, prompt length) cut rule while this path runs (`usable` for the compute
    dtype's `probe`, and a step `budget` that holds a chunk of `MIN_ROWS`), else (0, 0): none."""
    return (ALIGN, MIN_ROWS) if budget >= MIN_ROWS and usable(probe) else (0, 0)


def give_up(exc: Exception) -> None:
    """After cuDNN failed: a one-line note, and every later chunk on `prefill_attention`."""
    _REFUSED.append(one_line(exc))
    print(f"epinfer: note: cuDNN attention failed ({_REFUSED[0]}); prompt chunks take the Triton kernel",
          file=sys.stderr)


def eligible(num_new: int, context_len: int) -> bool:
    """Whether a chunk's shapes come from the fixed set, counting them as planned if so."""
    if num_new < MIN_ROWS or context_len % ALIGN or context_len > MAX_CONTEXT:
        return False
    shape = (-(-num_new // PAD) * PAD, context_len)
    if shape not in _SHAPES:
        if len(_SHAPES) >= MAX_SHAPES:
            return False
        _SHAPES.add(shape)
    return True


def cudnn(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                   scale=scale)[:2]
    return out, lse.reshape(out.shape[:3])


def reference(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`cudnn`'s result in float32 torch (shared KV heads repeated): tests, and devices without cuDNN."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    s = q.float() @ k.transpose(-1, -2) * scale
    if causal:
        P, L = s.shape[-2:]
        s = s.masked_fill(torch.ones(P, L, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (torch.softmax(s, -1) @ v).to(q.dtype), lse


@fused
def merge(o1, lse1, o2, lse2):
    """Two attentions of the same queries over disjoint keys, as one: each weighted by its share of
    the total exp-sum (float32)."""
    lse = torch.logaddexp(lse1, lse2)
    return (o1.float() * torch.exp(lse1 - lse)[..., None] + o2.float() * torch.exp(lse2 - lse)[..., None]).to(o1.dtype)


def heads_first(x_NHd: torch.Tensor, rows: int) -> torch.Tensor:
    """[N, H, hd] as [1, H, rows, hd], from a contiguous [rows, H, hd] (cuDNN plans by strides too):
    a view of x when that is one, else a copy zero-padded at the end."""
    if x_NHd.shape[0] != rows or not x_NHd.is_contiguous():
        padded = x_NHd.new_zeros(rows, *x_NHd.shape[1:])
        padded[:x_NHd.shape[0]] = x_NHd
        x_NHd = padded
    return x_NHd.transpose(0, 1)[None]


def context(k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor, tokens: int):
    """A sequence's first `tokens` cached keys and values, dense: ([C, KVH, hd], [C, KVH, hd])."""
    return (None, None) if tokens == 0 else cached_tokens(k_cache, v_cache, block_ids, tokens)


def chunk_attention(q_NHd: torch.Tensor, k_NKd: torch.Tensor, v_NKd: torch.Tensor, ctx_k_CKd: torch.Tensor | None,
                    ctx_v_CKd: torch.Tensor | None, scale: float, attend: Attend | None = None) -> torch.Tensor:
    """A chunk's causal attention [N, H, hd]: its N queries over the C context keys (all visible)
    and its own N keys (causal). `attend`: `cudnn` unless given."""
    attend = attend or cudnn
    N = q_NHd.shape[0]
    P = -(-N // PAD) * PAD
    q = heads_first(q_NHd, P)
    out, lse = attend(q, heads_first(k_NKd.to(q.dtype), P), heads_first(v_NKd.to(q.dtype), P), True, scale)
    if ctx_k_CKd is not None:
        C = ctx_k_CKd.shape[0]
        o2, lse2 = attend(q, heads_first(ctx_k_CKd.to(q.dtype), C), heads_first(ctx_v_CKd.to(q.dtype), C), False, scale)
        out = merge(out, lse, o2, lse2)
    return out[0, :, :N].transpose(0, 1)


def warm_up(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
    """One chunk of `MIN_ROWS` rows after `ALIGN` of context and one fresh: their plans, the merge's
    compilation, and a refusal (`give_up`) before the first request."""
    q = torch.zeros(MIN_ROWS, heads, head_dim, dtype=dtype, device=device)
    k = torch.zeros(MIN_ROWS + ALIGN, kv_heads, head_dim, dtype=dtype, device=device)
    try:
        for context in (ALIGN, 0):
            if eligible(MIN_ROWS, context):
                chunk_attention(q, k[:MIN_ROWS], k[:MIN_ROWS], *((k[MIN_ROWS:],) * 2 if context else (None, None)),
                                head_dim**-0.5)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        give_up(exc)
