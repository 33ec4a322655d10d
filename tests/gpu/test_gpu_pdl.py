"""GPU checks of programmatic dependent launch (`layers/pdl.py`, on by default) and the kernels
that make a decode layer one PDL chain (skipped without CUDA; run them on a GPU):

* that PDL really overlaps launches here (a consumer that skips its wait reads stale data) and that
  waiting restores exact order, eagerly and inside a CUDA graph;
* the add + norm kernel against the reference, launched with and without PDL;
* the whole chain: logits bitwise those of the same kernels launched plainly.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.test_gpu_decode import real_shape_folder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _pdl_capable() -> bool:
    from epinfer.kernels import pdl

    return pdl.SUPPORTED and torch.cuda.get_device_capability()[0] >= 9


def test_pdl_overlaps_and_wait_orders():
    """A producer lets its dependent launch, spins 200 µs, then stores 1. A consumer launched with
    PDL that waits reads 1; one that does not wait reads the old 0, which shows the launches really
    overlap (otherwise the chain's waits are untested). Eagerly and replayed in a CUDA graph."""
    import triton
    import triton.language as tl

    if not _pdl_capable():
        pytest.skip("needs Triton's gdc ops and a Hopper-or-newer GPU")

    @triton.jit
    def producer(FLAG, NS: tl.constexpr):
        tl.extra.cuda.gdc_launch_dependents()
        start = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.uint64, is_pure=False,
                                          pack=1)
        now = start
        while now - start < NS:
            now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.uint64, is_pure=False,
                                            pack=1)
        tl.store(FLAG, 1)

    @triton.jit
    def consumer(FLAG, OUT, WAIT: tl.constexpr):
        if WAIT:
            tl.extra.cuda.gdc_wait()
        tl.store(OUT, tl.load(FLAG, volatile=True))

    def pair(flag, out, wait):
        flag.zero_()
        producer[(1,)](flag, NS=200_000)
        consumer[(1,)](flag, out, WAIT=wait, launch_pdl=True)

    flag, out = torch.zeros(1, dtype=torch.int32, device="cuda"), torch.zeros(1, dtype=torch.int32, device="cuda")
    for wait in (True, False):  # compile both consumers first: a compile between the two launches outlasts the spin
        pair(flag, out, wait)
    torch.cuda.synchronize()
    for wait, expected in ((True, 1), (False, 0)):
        pair(flag, out, wait)
        torch.cuda.synchronize()
        assert out.item() == expected, f"eager, wait={wait}"
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            pair(flag, out, wait)  # (compiled, off the capture)
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, stream=stream):
                pair(flag, out, wait)
        out.fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        assert out.item() == expected, f"graph, wait={wait}"


@pytest.mark.parametrize("T,D,K,zc,launch", [(1, 2048, 0, False, False), (5, 2048, 8, False, True),
                                             (8, 2048, 8, True, True), (3, 1000, 0, True, True),
                                             (64, 2048, 8, False, False), (300, 4096, 10, True, False)])
def test_triton_add_rms_norm(T, D, K, zc, launch):
    """The decode add + norm kernel against `norm.add_rms_norm` (eager and as compiled) in bf16, the
    residual the experts' unsummed [T, K, D] float32 outputs or a plain [T, D] one; with PDL too."""
    from epinfer.kernels import norm_triton, pdl
    from epinfer.layers.norm import add_rms_norm

    if launch and not _pdl_capable():
        pytest.skip("needs Triton's gdc ops and a Hopper-or-newer GPU")
    torch.manual_seed(K + D)
    with torch.device("cuda"):
        x = torch.randn(T, D).bfloat16()
        r = torch.randn(T, K, D) if K else torch.randn(T, D).bfloat16()
        w = torch.randn(D).bfloat16()
    assert norm_triton.usable(x, r, w) and not norm_triton.usable(x, r.float() if not K else r.double(), w)
    assert norm_triton.usable(x[:0], r[:0], w) is False
    was = pdl.ENABLED
    pdl.ENABLED = launch
    try:
        assert pdl.on(x.device) == launch
        nx, out = norm_triton.add_rms_norm(x, r, w, 1e-6, zc)
    finally:
        pdl.ENABLED = was
    if K:  # summed over k in order (as the kernel does), the residual add rounds identically
        in_order = r[:, 0].clone()
        for k in range(1, K):
            in_order += r[:, k]
        rx, rout = add_rms_norm.__wrapped__(x, in_order[:, None], w, 1e-6, zc)
        assert torch.equal(nx, rx)
        torch.testing.assert_close(out.float(), rout.float(), rtol=2e-2, atol=2e-2)
    for ref in (add_rms_norm.__wrapped__, add_rms_norm):
        rx, rout = ref(x, r, w, 1e-6, zc)
        # torch sums over k in another order: the fp32 sum may round to the neighbouring bf16 value
        # (1 element of 1.2M at 300 rows x 4096 x 10, H200), never further
        for got, want, tol in ((nx, rx, 1e-2), (out, rout, 2e-2)):
            far = ~torch.isclose(got.float(), want.float(), rtol=tol, atol=tol)
            assert far.float().mean().item() <= 1e-5, f"{int(far.sum())} of {far.numel()} differ"
            assert (got.float() - want.float()).abs().max().item() <= 0.125


def test_add_forward_routes_the_experts_sum_to_the_kernel(monkeypatch):
    """`RMSNorm.add_forward`: the experts' unsummed [T, K, D] outputs go to the Triton kernel at any
    row count, with or without PDL; a plain [T, D] residual only as a link of the PDL chain (≤ 8 rows)."""
    from epinfer.kernels import norm_triton, pdl
    from epinfer.layers.norm import RMSNorm

    calls: list[int] = []
    kernel = norm_triton.add_rms_norm
    monkeypatch.setattr(norm_triton, "add_rms_norm", lambda x, r, *rest: calls.append(r.dim()) or kernel(x, r, *rest))
    norm = RMSNorm(2048, 1e-6).cuda().bfloat16()
    norm.weight.data.normal_()
    was = pdl.ENABLED
    try:
        for enabled in (False, True):
            pdl.ENABLED = enabled
            for T in (1, 64):
                x = torch.randn(T, 2048, device="cuda").bfloat16()
                calls.clear()
                norm.add_forward(x, torch.randn(T, 8, 2048, device="cuda"))
                assert calls == [3], (enabled, T)
                calls.clear()
                norm.add_forward(x, torch.randn(T, 2048, device="cuda").bfloat16())
                chained = pdl.chain(x.device) and T <= norm_triton.MAX_ROWS
                assert calls == ([2] if chained else []), (enabled, T)
    finally:
        pdl.ENABLED = was


def test_pdl_changes_nothing(tmp_path):
    """Programmatic dependent launch only moves launches earlier: with CUDA graphs,
    at 1 and 8 rows, every decode step's logits are bitwise those of the same kernels launched
    without it (a kernel that read or wrote before its wait would race and differ)."""
    from epinfer import LLM, SamplingParams
    from epinfer.kernels import pdl

    if not _pdl_capable():
        pytest.skip("needs Triton's gdc ops and a Hopper-or-newer GPU")
    folder, model = real_shape_folder(tmp_path, "qwen3-30b-a3b", 2)
    del model
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 150000, (n,), generator=gen).tolist() for n in (40, 7, 90, 3, 25, 60, 11, 33)]

    def run() -> list:
        llm = LLM(str(folder), dtype="bfloat16", device="cuda", max_model_len=256, max_num_seqs=8)
        engine = llm.engine
        steps: list = []
        apply = engine.apply
        engine.apply = lambda scheduled, logits: (steps.append(logits.float().cpu()), apply(scheduled, logits))[1]
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        llm.generate(prompts[:1], params)
        llm.generate(prompts, params)
        assert engine.runner.graphs is not None and engine.runner.graphs.graphs
        del llm
        torch.cuda.empty_cache()
        return steps

    was = pdl.ENABLED
    try:
        pdl.ENABLED, pdl.LAUNCH = True, False  # the same kernels, launched plainly
        plain = run()
        pdl.LAUNCH = True
        assert pdl.on(torch.device("cuda"))
        with_pdl = run()
    finally:
        pdl.ENABLED, pdl.LAUNCH = was, True
    assert len(plain) == len(with_pdl) and all(torch.equal(a, b) for a, b in zip(plain, with_pdl, strict=True))
