"""GPU: every backend through the whole ring (simulated ring of W = 2, 4, 8 on one GPU) against the
float64 reference, bf16 and fp16; errors no worse than 2× PyTorch's own SDPA error against the
same reference. Skipped without CUDA; run on an H100 and recorded in benchmarks/results/."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from ring_sp import kernels, merge, ring_attention_simulated, schedule, split
from ring_sp.documents import document_ids
from ring_sp.kernels import Visibility
from tests.reference import reference_grads, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LOCAL, HEADS, WINDOW = 128, 8, 300


def _problem(world, dtype, kv_heads, head_dim, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = world * LOCAL
    q = torch.randn(1, seq, HEADS, head_dim, generator=g)
    k, v = (torch.randn(1, seq, kv_heads, head_dim, generator=g) for _ in range(2))
    do = torch.randn(1, seq, HEADS, head_dim, generator=g)
    mask = (torch.arange(seq) % 7 != 3)[None] if masked else None  # every query keeps a visible key
    cast = [t.to("cuda", dtype) for t in (q, k, v, do)]
    return (*cast[:3], None if mask is None else mask.cuda(), cast[3])


def _visible(seq, causal, window):
    pos = torch.arange(seq, device="cuda")
    vis = torch.ones(seq, seq, dtype=torch.bool, device="cuda")
    if causal:
        vis &= pos[:, None] >= pos[None, :]
    if window:
        vis &= pos[:, None] - pos[None, :] < window
    return vis


def _sdpa_errors(q, k, v, mask, do, vis, ref):
    """PyTorch's own SDPA on the full sequence, in the inputs' dtype, against the reference."""
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    allowed = vis[None, None] if mask is None else vis[None, None] & mask[:, None, None, :]
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed, enable_gqa=True)
    out.backward(do.transpose(1, 2))
    got = [out.transpose(1, 2), qt.grad.transpose(1, 2), kt.grad.transpose(1, 2), vt.grad.transpose(1, 2)]
    return [rel_err(a, b) for a, b in zip(got, ref)]


def _needs_cudnn_frontend():
    """Skip unless NVIDIA's cudnn-frontend SDPA ops load here."""
    from ring_sp.kernels import sdpa_backend

    try:
        sdpa_backend._cudnn_frontend_ops()
    except ImportError as error:
        pytest.skip(str(error))


VARIANTS = [  # (causal, masked, window)
    (False, False, None), (True, False, None), (True, True, None), (True, False, WINDOW), (False, True, None)]
SDPA_NAMES = ("sdpa", "sdpa_fa4", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient")


@pytest.mark.parametrize("backend", ["auto", "triton", *SDPA_NAMES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("world", [2, 4, 8])
def test_ring_on_gpu_matches_reference(backend, dtype, world):
    failures, ran = [], 0
    for (causal, masked, window), layout, (kv_heads, head_dim) in itertools.product(
            VARIANTS, ("contiguous", "striped", "zigzag"), ((2, 128), (8, 64))):
        if backend in SDPA_NAMES and (masked or window):
            continue  # the fused ops take no key mask or window: auto sends those blocks to triton
        q, k, v, mask, do = _problem(world, dtype, kv_heads, head_dim, masked)
        if backend.startswith("sdpa_") and kernels.get(backend).unsupported(q, k, Visibility()):
            pytest.skip(f"{backend} is not available on this GPU for {dtype}")
        vis = _visible(world * LOCAL, causal, window)
        ref = reference_grads(q, k, v, do, mask=mask, visible_pairs=vis)
        bounds = [2 * e for e in _sdpa_errors(q, k, v, mask, do, vis, ref)]
        shards = [split(t, layout, world) for t in (q, k, v)]
        qs, ks, vs = ([t.clone().requires_grad_() for t in s] for s in shards)
        outs = ring_attention_simulated(qs, ks, vs, masks=None if mask is None else split(mask, layout, world),
                                        causal=causal, layout=layout, max_lookback_seq_len=window, backend=backend)
        torch.autograd.backward(outs, split(do, layout, world))
        got = [merge(outs, layout)] + [merge([t.grad for t in ts], layout) for ts in (qs, ks, vs)]
        ran += 1
        for name, g_, r, bound in zip(("out", "dq", "dk", "dv"), got, ref, bounds):
            err = rel_err(g_, r)
            if not err <= bound:
                failures.append(f"{layout} causal={causal} mask={masked} window={window} kv={kv_heads} "
                                f"d={head_dim} {name}: {err:.2e} > 2 x SDPA's {bound / 2:.2e}")
    assert ran and not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("backend", ["auto", "auto_grid", "triton", "sdpa_cudnn_ragged"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("world,grid", [(2, 64), (8, 64), (2, None), (8, None)])
def test_documents_on_gpu_match_reference(backend, dtype, world, grid, monkeypatch):
    """Packed documents (lengths 1 to 300). With sdpa_cudnn_ragged (and auto where cudnn-frontend is installed)
    under contiguous and zigzag, blocks of several documents stay whole for cuDNN's ragged op; with striped, with
    triton, and with auto_grid (auto with whole blocks refused, as without cudnn-frontend), the parts of long
    documents on the grid get their own blocks (cuDNN under auto), the rest grouped and masked per document in the
    Triton kernel; grid None: only documents filling a whole block go unmasked."""
    from ring_sp import attention

    monkeypatch.setattr(schedule, "DOCUMENT_GRID", grid)
    if backend == "sdpa_cudnn_ragged":
        _needs_cudnn_frontend()
    if backend == "auto_grid":
        monkeypatch.setattr(attention, "_takes_whole", lambda *args: False)
        backend = "auto"
    seq, failures = world * LOCAL, []
    g = torch.Generator().manual_seed(world)
    bounds = [0]
    while bounds[-1] < seq:
        bounds.append(min(seq, bounds[-1] + int(torch.randint(1, 300, (1,), generator=g))))
    for causal, layout, (kv_heads, head_dim) in itertools.product(
            (True, False), ("contiguous", "striped", "zigzag"), ((2, 128), (8, 64))):
        if backend == "sdpa_cudnn_ragged" and layout == "striped":
            continue  # striped documents are off the diagonal: grid blocks masked by document, which it cannot take
        q, k, v, mask, do = _problem(world, dtype, kv_heads, head_dim, False)
        ids = document_ids(bounds, torch.arange(seq, device="cuda"))
        vis = _visible(seq, causal, None) & (ids[:, None] == ids[None, :])
        ref = reference_grads(q, k, v, do, visible_pairs=vis)
        bounds_err = [2 * max(e, 1e-3) for e in _sdpa_errors(q, k, v, None, do, vis, ref)]
        shards = [split(t, layout, world) for t in (q, k, v)]
        qs, ks, vs = ([t.clone().requires_grad_() for t in s] for s in shards)
        outs = ring_attention_simulated(qs, ks, vs, causal=causal, layout=layout, backend=backend, cu_seqlens=bounds)
        torch.autograd.backward(outs, split(do, layout, world))
        got = [merge(outs, layout)] + [merge([t.grad for t in ts], layout) for ts in (qs, ks, vs)]
        for name, g_, r, bound in zip(("out", "dq", "dk", "dv"), got, ref, bounds_err):
            err = rel_err(g_, r)
            if not err <= bound:
                failures.append(f"{layout} causal={causal} kv={kv_heads} d={head_dim} {name}: {err:.2e} > {bound:.2e}")
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
@pytest.mark.parametrize("layout", ["contiguous", "striped"])
def test_one_token_shards_on_gpu(backend, layout):
    """One token per rank: every block is 1 x 1, which cuDNN's backward refuses (s_q = s_kv = 1), so the sdpa
    backend takes the next fused op for it."""
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, 4, 4, 64, generator=g).to("cuda", torch.bfloat16) for _ in range(4))
    for causal in (True, False):
        ref = reference_grads(q, k, v, do, visible_pairs=_visible(4, causal, None))
        qs, ks, vs = ([t.clone().requires_grad_() for t in split(x, layout, 4)] for x in (q, k, v))
        outs = ring_attention_simulated(qs, ks, vs, causal=causal, layout=layout, backend=backend)
        torch.autograd.backward(outs, split(do, layout, 4))
        got = [merge(outs, layout)] + [merge([t.grad for t in ts], layout) for ts in (qs, ks, vs)]
        errors = {name: rel_err(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}
        assert max(errors.values()) < 2e-2, (causal, errors)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cudnn_ragged_op_takes_document_blocks(dtype):
    """cuDNN's ragged attention (through cudnn-frontend, where it is installed) runs here and agrees with the
    dense op on each document, so sdpa_cudnn_ragged and auto keep blocks of several documents whole for it;
    sdpa_cudnn (PyTorch's op alone) does not."""
    from ring_sp import attention
    from ring_sp.kernels import sdpa_backend
    from ring_sp.options import RingOptions

    _needs_cudnn_frontend()
    q = torch.randn(1, 64, 8, 128, device="cuda", dtype=dtype)
    k = torch.randn(1, 64, 2, 128, device="cuda", dtype=dtype)
    assert sdpa_backend._available(sdpa_backend.OPS["cudnn_ragged"], q, ragged=True)
    for backend, plan in (("sdpa_cudnn_ragged", "whole"), ("auto", "whole"), ("sdpa_cudnn", "grid")):
        assert attention.document_plan(RingOptions(causal=True, backend=backend), q, k) == plan, backend


def test_liger_kernels_match_megatrons_modules_on_gpu(dist_pool):
    """liger's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy (--fused-kernels liger) against Megatron's own
    modules on the same weights and tokens: float32 tight, bfloat16 within its rounding."""
    pytest.importorskip("liger_kernel")
    pytest.importorskip("megatron.core")
    from tests import fused_jobs

    for dtype, bound in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        (result,) = dist_pool(1).run(fused_jobs.liger_matches_plain, "RMSNorm", "cuda", dtype, timeout=600)
        assert result["modules"] == ["LigerLossGPTModel", "LigerMegatronRMSNorm", "LigerSwiGLUMLP"], result
        assert result["rope_calls"] == 2 * 2, result  # q and k of both layers through liger's RoPE
        assert result["loss"] < bound * 10, (dtype, result["loss"])  # a loss of about 4.2
        assert max(result["grads"].values()) < bound, (dtype, result["grads"])


def test_a_training_step_makes_no_host_sync_on_gpu(dist_pool):
    """A 3-layer ring GPT (ring of 1) on the GPU: its second forward and backward run under
    torch.cuda.set_sync_debug_mode("error") and read no tensor value back to the host."""
    pytest.importorskip("megatron.core")
    from tests import sync_jobs

    (reads,) = dist_pool(1).run(sync_jobs.host_reads_per_step, 1, 3, False, "cuda", True, timeout=600)
    assert reads == []


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_ragged_op_reuses_plans_across_lengths(causal):
    """backend sdpa_cudnn_ragged sends a call whose lengths are not powers of two through cudnn-frontend (one
    sequence per batch element): it agrees with PyTorch's cuDNN op, and new lengths rounding up to the same powers
    of two build no new plan (whole-block plans cut new lengths from every batch of documents)."""
    from ring_sp.kernels import sdpa_backend

    _needs_cudnn_frontend()
    import cudnn.sdpa.fwd.torch_op as frontend

    op, dense = sdpa_backend.OPS["cudnn_ragged"], sdpa_backend.OPS["cudnn"]
    g = torch.Generator().manual_seed(5)

    def run(sq, sk, want_dense):
        q, do = (torch.randn(2, 8, sq, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(2, 2, sk, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
        out, lse = op.forward(q, k, v, causal, 0.1)
        grads = op.backward(do, q, k, v, out, lse, causal, 0.1)
        if want_dense:
            w_out, w_lse = dense.forward(q, k, v, causal, 0.1)
            wants = dense.backward(do, q, k, v, w_out, w_lse, causal, 0.1)
            for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (w_out, w_lse, *wants)):
                assert a.shape == b.shape and rel_err(a, b) < 2e-2, (name, sq, sk, rel_err(a, b))

    run(300, 200, True)  # rows ≥ keys under causal: every row sees a key
    run(77, 60, True)
    before = len(frontend._graph_cache)
    run(290, 210, False)
    run(270, 230, True)
    assert len(frontend._graph_cache) == before
