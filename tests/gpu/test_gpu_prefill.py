"""GPU correctness of the prefill and mixed-step path (skipped without CUDA; run them on a GPU):

* the varlen causal conv kernel against `F.conv1d` per sequence (bf16 in, fp32 reference);
* the varlen chunked gated delta rule (fla-core's kernel where it is installed, else the torch form)
  against the torch chunked form in float32, with initial states and lengths off the chunk grid;
  states captured inside a chunk (prefix caching's snapshots) against calls that end there;
* prompt-chunk attention after cached context (bottom-right causal bias, flash) against the masked
  float32 reference;
* long prompts (8k and 32k tokens, chunked over 2k / 8k steps) on a few-layer real shape in bf16:
  the logits of the first generated tokens against transformers on the same weights, in float32
  (relative error <= 3e-2) and in bf16, top-1 agreement reported (>= 3 of 4 asserted);
* mixed steps (8 prompts chunked 40 tokens a step, so prompt chunks run beside decoding rows) at
  real shape: every step's logits against transformers, the decode path's bounds;
* the graph pieces of prefill and mixed steps (captured, padded to their buckets) in float32: tokens
  identical to the same engine without pieces and to transformers, for every family; the long-prompt
  and mixed-step cases above again with the pieces and the prompt-chunk attention kernel on;
* that kernel against SDPA per chunk (bf16; head dims 64 / 128 / 256).
"""

from __future__ import annotations

import gc
import itertools

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def check_varlen_conv(device: str, dtype: torch.dtype, norm_cols: int, strided: bool,
                      groups: tuple[int, ...] | None = None, lens: tuple[int, ...] = (1, 5, 300, 64, 2)) -> None:
    """The varlen conv kernel against `F.conv1d` per sequence; `strided`: the packed rows are a column
    slice of a wider tensor (as the in_proj output gives them); `groups`: the output as column
    groups (q | k | v), each contiguous where they fall on the kernel's channel blocks; `lens`: the
    sequences (the second, if any, fresh; one sequence alone continues from its conv state, as a
    long prompt's later chunks do)."""
    from epinfer.kernels.gdn_ops import l2norm
    from epinfer.kernels.gdn_prefill import causal_conv_varlen, conv_taps

    torch.manual_seed(0)
    lens, C, K = list(lens), 1000, 4
    with torch.device(device):
        x = torch.randn(sum(lens), C + 24 if strided else C, dtype=dtype)
        x = x[:, 8:8 + C] if strided else x
        prev = torch.randn(len(lens), C, K - 1, dtype=dtype)
        if len(lens) > 1:
            prev[1] = 0  # a fresh sequence
        w = torch.randn(C, K, dtype=dtype)
    taps, rows = (t.to(device) for t in conv_taps(lens, K))
    parts, state = causal_conv_varlen(x, prev, w, taps, rows, norm_cols, 128, groups)
    assert [p.shape[1] for p in parts] == list(groups or (C,))
    if groups and device == "cuda":
        from epinfer.kernels.gdn_prefill import planar_groups
        assert all(p.is_contiguous() for p in parts) == (planar_groups(groups) == groups)
    out = torch.cat(parts, dim=1)
    start = 0
    for j, n in enumerate(lens):
        full = torch.cat([prev[j].float(), x[start:start + n].float().T], dim=1)  # [C, K-1+n]
        ref = F.silu(F.conv1d(full[None], w.float()[:, None, :], groups=C)[0].T)
        if norm_cols:
            ref[:, :norm_cols] = l2norm(ref[:, :norm_cols].reshape(n, -1, 128)).reshape(n, norm_cols)
            assert (out[start:start + n, :norm_cols].float().view(n, -1, 128).norm(dim=-1) - 1).abs().max() < 1e-2
        torch.testing.assert_close(out[start:start + n].float(), ref, atol=3e-2, rtol=2e-2)
        assert torch.equal(state[j], full[:, -(K - 1):].to(state.dtype))
        start += n


@pytest.mark.parametrize("groups", [None, (256, 256, 488), (300, 700)], ids=["one", "planar", "unaligned"])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("norm_cols", [0, 512])
def test_varlen_conv_kernel(norm_cols, strided, groups, monkeypatch):
    """With `norm_cols`, the first channels come out L2-normalised per head of 128 (q and k)."""
    monkeypatch.setenv("EPINFER_MIXED_STEP_KERNELS", "1")
    check_varlen_conv("cuda", torch.bfloat16, norm_cols, strided, groups)


@pytest.mark.parametrize("lens", [(40,), (1,), (2, 7)])
def test_varlen_conv_kernel_continues_one_sequence(lens):
    """A step with one prompt chunk continuing from its conv state (the previous inputs' rows were a
    strided view for a single sequence, and the kernel read them as contiguous)."""
    check_varlen_conv("cuda", torch.bfloat16, 0, True, None, lens)


@pytest.mark.parametrize("lens", [[1024, 700, 33, 1], [64, 65, 8000]])
def test_varlen_chunk_rule(lens):
    from epinfer.kernels import gdn_prefill

    torch.manual_seed(len(lens))
    Hk, Hv, dk, dv = 16, 32, 128, 128  # Qwen3.5 / Qwen3-Next GDN heads
    P, bf = sum(lens), torch.bfloat16
    with torch.device("cuda"):
        q, k = torch.randn(P, Hk, dk, dtype=bf), torch.randn(P, Hk, dk, dtype=bf)
        v = torch.randn(P, Hv, dv, dtype=bf)
        g = -torch.rand(P, Hv) * 0.5
        beta = torch.rand(P, Hv, dtype=bf)
        init = torch.randn(len(lens), Hv, dk, dv) * 0.1
    out, final, _ = gdn_prefill.chunk_rule_varlen(q, k, v, g, beta, lens, None, init)
    if gdn_prefill.fla_usable(v):  # q and k normalised beforehand (as the conv kernel does): the same
        from epinfer.kernels.gdn_ops import l2norm

        pre = gdn_prefill.chunk_rule_varlen(l2norm(q.float()).to(bf), l2norm(k.float()).to(bf), v, g, beta, lens,
                                            None, init, normalized=True)
        torch.testing.assert_close(pre[0], out, atol=2e-3, rtol=2e-2)
        torch.testing.assert_close(pre[1], final, atol=2e-2, rtol=2e-2)
    if gdn_prefill.fla_usable(v):  # our host-built chunk list is the library's
        from fla.ops.utils.index import prepare_chunk_indices

        index = gdn_prefill.varlen_index(lens, v.device)
        assert torch.equal(index["chunk_indices"], prepare_chunk_indices(index["cu_seqlens"], 64))
    ref, ref_final, _ = gdn_prefill.chunk_rule_torch(q.float(), k.float(), v.float(), g, beta.float(), lens, init)
    print(f"fla: {gdn_prefill.fla_usable(v)}; out max err {(out.float() - ref).abs().max():.2e}, "
          f"state max err {(final - ref_final).abs().max():.2e}")
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(final, ref_final, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("normalized", [False, True])
def test_chunk_rule_captures_states(normalized):
    """States captured inside a chunk (prefix caching's snapshots without a cut there): fla's
    forward stage by stage gives the library's outputs and final states bit for bit, and a captured
    state is bit for bit the final state of a call that ends at that row, in the cache's bf16."""
    from epinfer.kernels import gdn_prefill

    if not gdn_prefill.fla_usable(torch.empty(1, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("fla-core is not installed")
    torch.manual_seed(3)
    lens, capture = [1024, 300, 2048, 64 * 5 + 1], [(0, 960), (2, 64), (2, 1984), (3, 320), (0, 64)]
    Hk, Hv, dk, dv, bf = 16, 32, 128, 128, torch.bfloat16
    P = sum(lens)
    with torch.device("cuda"):
        q, k = torch.randn(P, Hk, dk, dtype=bf), torch.randn(P, Hk, dk, dtype=bf)
        if normalized:
            q, k = (torch.nn.functional.normalize(t.float(), dim=-1).to(bf) for t in (q, k))
        v, g = torch.randn(P, Hv, dv, dtype=bf), -torch.rand(P, Hv) * 0.5
        beta, init = torch.rand(P, Hv, dtype=bf), torch.randn(len(lens), Hv, dk, dv) * 0.1
    assert gdn_prefill.capture_exact(v, torch.bfloat16) and not gdn_prefill.capture_exact(v, torch.float32)
    out, final, none = gdn_prefill.chunk_rule_varlen(q, k, v, g, beta, lens, None, init, normalized)
    out2, final2, states = gdn_prefill.chunk_rule_varlen(q, k, v, g, beta, lens, None, init, normalized, capture)
    assert none is None and torch.equal(out, out2) and torch.equal(final, final2)
    starts = [0, *itertools.accumulate(lens)]
    for (j, r), state in zip(capture, states, strict=True):
        rows = slice(starts[j], starts[j] + r)
        _, cut, _ = gdn_prefill.chunk_rule_varlen(q[rows], k[rows], v[rows], g[rows], beta[rows], [r], None,
                                                  init[j:j + 1], normalized)
        assert torch.equal(state, cut[0].to(bf)), (j, r)
    # the torch form's captures are its own cut runs' final states (float32)
    ref_out, _, ref_states = gdn_prefill.chunk_rule_torch(q.float(), k.float(), v.float(), g, beta.float(), lens,
                                                          init, capture)
    for (j, r), state in zip(capture, ref_states, strict=True):
        rows = slice(starts[j], starts[j] + r)
        _, cut, _ = gdn_prefill.chunk_rule_torch(q[rows].float(), k[rows].float(), v[rows].float(), g[rows],
                                                 beta[rows].float(), [r], init[j:j + 1])
        torch.testing.assert_close(state, cut[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state.to(bf).float(), states[capture.index((j, r))].float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("N,context", [(1, 0), (200, 0), (200, 900), (1, 3000), (2048, 6000)])
def test_chunk_attention_after_context(N, context):
    from epinfer.layers.attention import _sdpa

    torch.manual_seed(N)
    H, KVH, hd = 16, 2, 256
    L = N + context
    with torch.device("cuda"):
        q = torch.randn(N, H, hd)
        k, v = torch.randn(L, KVH, hd), torch.randn(L, KVH, hd)
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = _sdpa(q, k, v, context, hd**-0.5)  # float32: boolean mask, heads repeated
    out = _sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), context, hd**-0.5)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("N,context", [(4096, 0), (5000, 0), (4096, 4096), (4100, 6144)])
def test_cudnn_chunk_attention(N, context):
    """`cudnn_attention.chunk_attention` (bf16, the Qwen3.5 attention shape: grouped KV heads, head
    dim 256, rows padded, the context merged by log-sum-exp) against SDPA in float32."""
    from epinfer.kernels import cudnn_attention
    from epinfer.layers.attention import _sdpa

    torch.manual_seed(N + context)
    H, KVH, hd = 16, 2, 256
    with torch.device("cuda"):
        q = torch.randn(N, H, hd)
        k, v = torch.randn(context + N, KVH, hd), torch.randn(context + N, KVH, hd)
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = _sdpa(q, k, v, context, hd**-0.5)
    b = [t.bfloat16() for t in (q, k, v)]
    ctx = (b[1][:context], b[2][:context]) if context else (None, None)
    out = cudnn_attention.chunk_attention(b[0], b[1][context:], b[2][context:], *ctx, hd**-0.5)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("prompt_len,budget,mode", [
    *((n, b, m) for n, b in ((8192, 2048), (32768, 8192)) for m in ("sdpa", "pieces+chunk-kernel")),
    (32768, 8192, "cudnn")])
def test_long_prompt_logits_match_transformers(tmp_path, prompt_len, budget, mode, monkeypatch):
    from epinfer import LLM, SamplingParams
    from epinfer.kernels import cudnn_attention

    # graph pieces and the prompt-chunk attention kernel (the defaults), or SDPA per chunk, eagerly, or
    # the defaults with the chunks of 4,096 rows or more through cuDNN (the 8192-row chunks, fresh and
    # after context)
    fast = mode != "sdpa"
    monkeypatch.setenv("EPINFER_PIECEWISE", "1" if fast else "0")
    monkeypatch.setenv("EPINFER_CHUNK_ATTENTION", "1" if fast else "0")
    monkeypatch.setenv("EPINFER_CUDNN_CHUNKS", "1" if mode == "cudnn" else "0")
    calls = []
    cudnn = cudnn_attention.cudnn
    monkeypatch.setattr(cudnn_attention, "cudnn", lambda q, k, *a: calls.append(k.shape[2]) or cudnn(q, k, *a))
    from tests.gpu.test_gpu_decode import real_shape_folder

    folder, model = real_shape_folder(tmp_path, "qwen3.5-35b-a3b", 4)
    gen = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(0, 150000, (prompt_len,), generator=gen).tolist()
    # (the GDN state in float32: a check of the kernels; the default bf16 state's drift is measured
    # by test_bf16_recurrent_state_logits)
    llm = LLM(str(folder), dtype="bfloat16", device="cuda", max_model_len=prompt_len + 16,
              max_num_batched_tokens=budget, mamba_ssm_cache_dtype="float32")
    steps: list[torch.Tensor] = []
    apply = llm.engine.apply

    def spy(scheduled, logits):
        if logits.shape[0]:  # (a chunk before the prompt's last samples nothing)
            steps.append(logits[-1].float().cpu())
        return apply(scheduled, logits)

    llm.engine.apply = spy
    out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0].token_ids
    del llm.engine.apply, llm  # (the spy and the engine refer to each other: the cycle kept its cache)
    gc.collect()
    torch.cuda.empty_cache()
    mine = torch.stack(steps[-4:])  # the steps that sampled (the last chunk's and 3 decodes)

    def teacher_forced(m) -> torch.Tensor:
        seq = torch.tensor([prompt + out[:-1]], device="cuda")
        with torch.inference_mode():
            return m(seq, logits_to_keep=4).logits[0].float().cpu()

    ref_bf16 = teacher_forced(model)
    # float32 attention takes SDPA's math kernel, whose 32k x 32k scores per head (64 GiB) do not fit
    # beside the model: the memory-efficient kernel instead, with the grouped heads repeated for it
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations import sdpa_attention

    monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa", lambda *a, **k: False)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        exact = teacher_forced(model.float())

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    if mode == "cudnn":  # it ran: every layer's chunks (after the start-up's), after context too
        assert not cudnn_attention._REFUSED and any(k > 8192 for k in calls) and len(calls) > 8, calls[:12]
    else:
        assert not calls
    top1 = (mine.argmax(-1) == exact.argmax(-1)).sum().item()
    print(f"{prompt_len} tokens: rel err vs float32 {rel(mine, exact):.2e} (transformers bf16: "
          f"{rel(ref_bf16, exact):.2e}), vs transformers bf16 {rel(mine, ref_bf16):.2e}, top-1 {top1}/4")
    assert rel(mine, exact) <= 3e-2 and top1 >= 3


@pytest.mark.parametrize("fast", [False, True], ids=["sdpa", "pieces+chunk-kernel"])
@pytest.mark.parametrize("shape,layers", [("qwen3-30b-a3b", 2), ("qwen3.5-35b-a3b", 4)])
def test_bf16_mixed_steps_logits_match_transformers(tmp_path, shape, layers, fast, monkeypatch):
    from tests.gpu.test_gpu_decode import compare_logits, real_shape_folder

    # graph pieces and the prompt-chunk attention kernel (the defaults), or SDPA per chunk, eagerly
    monkeypatch.setenv("EPINFER_PIECEWISE", "1" if fast else "0")
    monkeypatch.setenv("EPINFER_CHUNK_ATTENTION", "1" if fast else "0")

    folder, model = real_shape_folder(tmp_path, shape, layers)
    res = compare_logits(folder, model, "bfloat16", budget=40)
    print(f"{shape} x{layers}, 40-token steps: {res}")
    assert res["rel_err_vs_fp32"] <= 2e-2 and res["top1_vs_fp32"] >= 0.99
    assert res["rel_err"] <= 2e-2 and res["top1"] >= 0.99


@pytest.mark.parametrize("budget", [7, 64])
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_next", "qwen3_5_moe", "qwen2_moe", "olmoe", "mixtral"])
def test_graph_pieces_float32_tokens(family, budget, ckpt_dir):
    from epinfer import LLM, SamplingParams
    from tests.checkpoints import hf_generate_all
    from tests.test_generation import prompts

    path = ckpt_dir(family)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ps = prompts()
    kw = {"dtype": "float32", "device": "cuda", "max_num_batched_tokens": budget, "max_num_seqs": len(ps)}
    llm = LLM(str(path), piecewise_graphs=True, **kw)
    pieces = llm.engine.runner.pieces
    assert pieces is not None and pieces.capture and pieces.graphs, "no captured pieces"
    sizes = []
    run = pieces.run
    pieces.run = lambda batch, caches: sizes.append(batch.num_rows) or run(batch, caches)
    got = [o.token_ids for o in llm.generate(ps, params)]
    assert sizes, "no step ran through the pieces"
    eager = LLM(str(path), piecewise_graphs=False, **kw)
    assert eager.engine.runner.pieces is None
    assert got == [o.token_ids for o in eager.generate(ps, params)]
    for p, tokens, (ref, _) in zip(ps, got, hf_generate_all(path, ps, 24), strict=True):
        assert tokens == ref, f"{family}: prompt of {len(p)} tokens"


def check_prefill_kernel(device: str, dtype: torch.dtype, hd: int, bs: int, heads=(8, 2),
                         pack: int | None = None, lazy: bool = False) -> float:
    """The chunks' attention in one kernel against SDPA per chunk (float32, heads repeated): fresh
    prompts, chunks after cached context, one-row chunks, lengths off the tile grid, scattered
    blocks; rows of other chunks untouched; `pack` query heads a program; `lazy` rescaling (every
    other query 6x larger, so that some rows' maxima grow past 2^8 between key steps and others'
    do not). Returns the largest error."""
    from epinfer.core.forward import aligned_device_rows
    from epinfer.kernels.prefill_attention import prefill_attention, tile_map, tile_rows
    from epinfer.layers.attention import _sdpa

    gen = torch.Generator().manual_seed(hd + bs)
    H, KVH = heads
    chunks = [(0, 70), (37, 1), (130, 64), (5, 129), (0, 1), (200, 3)]  # (cached context, new rows)
    num_blocks, slots = 96, len(chunks) + 1
    k_cache = torch.randn(num_blocks, bs, KVH, hd, generator=gen).to(device, dtype)
    v_cache = torch.randn(num_blocks, bs, KVH, hd, generator=gen).to(device, dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()  # every chunk's blocks scattered
    table = torch.zeros(slots, 40, dtype=torch.int32)
    starts, row = [], 3  # rows 0-2: another kind of row (a decode row, say)
    for c, (ctx, n) in enumerate(chunks):
        need = -(-(ctx + n) // bs)
        table[c + 1, :need] = torch.tensor([perm.pop() for _ in range(need)], dtype=torch.int32)
        starts.append(row)
        row += n
    T = row + 5  # padding rows at the end
    q = torch.randn(T, H, hd, generator=gen)
    if lazy:
        q[::2] *= 6.0
    q = q.to(device, dtype)
    out = torch.full((T, H, hd), 7.0, dtype=dtype, device=device)
    tiles = tile_map([n for _, n in chunks], tile_rows(hd, pack), [c for c, _ in chunks])  # heaviest first
    tiles = aligned_device_rows(list(tiles), torch.device(device))
    meta = aligned_device_rows([starts, [n for _, n in chunks], [c for c, _ in chunks],
                                list(range(1, len(chunks) + 1))], torch.device(device))
    prefill_attention(q, k_cache, v_cache, table.to(device), tiles, meta, hd**-0.5, out, pack, lazy)
    worst = 0.0
    for c, (ctx, n) in enumerate(chunks):
        pages = table[c + 1, :-(-(ctx + n) // bs)].long().to(device)
        keys = k_cache[pages].reshape(-1, KVH, hd)[:ctx + n].float()
        values = v_cache[pages].reshape(-1, KVH, hd)[:ctx + n].float()
        ref = _sdpa(q[starts[c]:starts[c] + n].float(), keys, values, ctx, hd**-0.5)
        got = out[starts[c]:starts[c] + n].float()
        worst = max(worst, (got - ref).abs().max().item())
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    assert (out[:3] == 7.0).all() and (out[row:] == 7.0).all(), "rows outside the chunks were written"
    return worst


@pytest.mark.parametrize("hd,bs,pack,lazy", [(128, 16, None, False), (256, 16, None, False), (64, 32, None, False),
                                             (256, 16, 2, False), (128, 16, 4, False), (256, 16, None, True),
                                             (128, 16, 4, True)])
def test_prefill_attention_kernel(hd, bs, pack, lazy):
    """`pack`: query heads of one KV head in a program (rows = heads x queries); `lazy`: the
    accumulator rescaled only past 2^8 of growth; as a sweep tries them."""
    err = check_prefill_kernel('cuda', torch.bfloat16, hd, bs, pack=pack, lazy=lazy)
    print(f"hd {hd}, block {bs}, pack {pack}, lazy {lazy}: largest error {err:.2e}")


@pytest.mark.parametrize("budget", [40, 4096], ids=["mixed-steps", "whole-prompts"])
def test_bf16_recurrent_state_logits(tmp_path, budget):
    """--mamba-ssm-cache-dtype auto (the GDN state kept in bf16, vLLM's default) at the 4-layer
    Qwen3.5 shape: logits against transformers in float32, prompts in chunks that read the rounded
    state (budget 40) or whole; reports the drift (the float32-state test above runs all 256 experts).
    32 routed experts of 256 (the GDN layers, whose state this is about, at their real size): with
    all 256 the test ran past 150 s on an H200, three times."""
    from tests.gpu.test_gpu_decode import compare_logits, real_shape_folder

    folder, model = real_shape_folder(tmp_path, "qwen3.5-35b-a3b", 4, experts=32)
    res = compare_logits(folder, model, "bfloat16", budget=budget, mamba_ssm_cache_dtype="auto")
    print(f"qwen3.5-35b-a3b x4, bf16 state, budget {budget}: {res}")
    assert res["rel_err_vs_fp32"] <= 3e-2 and res["top1_vs_fp32"] >= 0.97


@pytest.mark.parametrize("rows,inter", [(1, 512), (37, 768), (32768, 512), (300, 96)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_mul_kernel(rows, inter, dtype, monkeypatch):
    """SiLU(gate) * up over the halves of one stacked output (the experts' and the MLP's layout),
    against float32, within one rounding of the output dtype."""
    monkeypatch.setenv("EPINFER_MIXED_STEP_KERNELS", "1")
    from epinfer.kernels import activation
    from epinfer.layers.linear import silu_mul

    torch.manual_seed(0)
    gate_up = torch.randn(rows, 2 * inter + 8, dtype=dtype, device="cuda")[:, 8:]
    gate, up = gate_up.chunk(2, dim=-1)
    assert activation.usable(gate, up)
    got = silu_mul(gate, up)
    ref = F.silu(gate.float()) * up.float()
    torch.testing.assert_close(got.float(), ref, rtol=2 * torch.finfo(dtype).eps, atol=1e-5)
    assert got.shape == (rows, inter) and got.is_contiguous()
