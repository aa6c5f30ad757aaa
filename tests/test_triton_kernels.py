"""Triton kernels against the float64 reference: on the GPU when there is one, else in Triton's
CPU interpreter (TRITON_INTERPRET=1, set by conftest). The interpreter's bf16 dot products are
unreliable (FACTS.md), so on CPU the kernels are checked in fp16 and fp32; bf16 runs on the GPU
(tests/test_gpu.py)."""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

from tests.block_check import BANDS, check_block  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BOUND = {torch.float32: 1e-5, torch.float16: 2e-3}


def _check(dtype, **kw):
    errors = check_block("triton", dtype=dtype, device=DEVICE, **kw)
    bad = {k: v for k, v in errors.items() if not v <= BOUND[dtype]}
    assert not bad, f"{kw}: {bad}"


# Every band with and without a key mask; the dtype alternates so that each band runs in both (the
# interpreter is slow: the full product doubles the suite's Triton time for no new code path).
BAND_CASES = [(band, masked, (torch.float32, torch.float16)[(i + masked) % 2])
              for i, band in enumerate(BANDS) for masked in (False, True)]


@pytest.mark.parametrize("band,masked,dtype", BAND_CASES, ids=str)
def test_every_band_kind(dtype, band, masked):
    # Lengths that are not multiples of the tiles (16 in the interpreter); GQA with groups of 2.
    _check(dtype, sq=40, sk=33, heads=4, kv_heads=2, head_dim=32, band=band, masked=masked)
    _check(dtype, sq=7, sk=5, heads=2, kv_heads=2, head_dim=16, band=band, masked=masked)


@pytest.mark.parametrize("band,masked,dtype", BAND_CASES, ids=str)
def test_documents_in_a_block(dtype, band, masked):
    """Blocks spanning several documents (different per batch element): masked in the kernel, and tiles
    that share no document skipped (lengths over several 16-tiles, so whole tiles are skipped)."""
    _check(dtype, sq=70, sk=53, heads=4, kv_heads=2, head_dim=32, band=band, masked=masked, documents=True)
    _check(dtype, sq=7, sk=5, heads=2, kv_heads=2, head_dim=16, band=band, masked=masked, documents=True)


@pytest.mark.parametrize("head_dim", [16, 48, 64, 96, 128, 256])
def test_head_dims(head_dim):
    _check(torch.float16, sq=20, sk=18, heads=2, kv_heads=1, head_dim=head_dim, band=BANDS[1], masked=True)


def test_megatron_strides_without_copies():
    """q, k, v as (seq, batch, heads, dim) tensors seen through .transpose(0, 1)."""
    from ring_sp import kernels
    from ring_sp.kernels import State, Visibility

    g = torch.Generator().manual_seed(0)
    q_sbhd = torch.randn(24, 2, 4, 32, generator=g).to(DEVICE, torch.float16)
    k_sbhd = torch.randn(24, 2, 2, 32, generator=g).to(DEVICE, torch.float16)
    v_sbhd = torch.randn(24, 2, 2, 32, generator=g).to(DEVICE, torch.float16)
    q, k, v = (t.transpose(0, 1) for t in (q_sbhd, k_sbhd, v_sbhd))
    assert not q.is_contiguous()
    outs = []
    for name, args in (("triton", (q, k, v)), ("torch", (q.contiguous(), k.contiguous(), v.contiguous()))):
        state = State.empty(q)
        kernels.get(name).forward(*args, state, Visibility(BANDS[1]), 32 ** -0.5)
        outs.append(state.output())
    assert ((outs[0] - outs[1]).norm() / outs[1].norm()).item() < 2e-3


def test_simulated_ring_on_triton():
    """The whole ring (forward and backward) with every block on the Triton backend."""
    from ring_sp import ring_attention_simulated, split
    from tests.reference import make_inputs, reference_grads, rel_err

    for layout in ("zigzag", "striped"):
        q, k, v, mask, do = make_inputs(1, 48, 4, 2, 16, torch.float16, masked=True, seed=1, device=DEVICE)
        ref = reference_grads(q, k, v, do, causal=True, mask=mask, lookback=20)
        qs, ks, vs = ([t.clone().requires_grad_() for t in split(x, layout, 3)] for x in (q, k, v))
        outs = ring_attention_simulated(qs, ks, vs, masks=split(mask, layout, 3), causal=True, layout=layout,
                                        max_lookback_seq_len=20, backend="triton")
        torch.autograd.backward(outs, split(do, layout, 3))
        from ring_sp import merge

        got = [merge(outs, layout)] + [merge([t.grad for t in ts], layout) for ts in (qs, ks, vs)]
        for name, g_, r in zip(("out", "dq", "dk", "dv"), got, ref):
            assert rel_err(g_, r) < 3e-3, (layout, name, rel_err(g_, r))


def test_fused_merge_matches_the_torch_merge():
    """The sdpa backend's one-pass merge kernel (CUDA) against its torch formula, -inf rows included."""
    from ring_sp.kernels import State
    from ring_sp.kernels.sdpa_backend import _merge_triton, merge

    g = torch.Generator().manual_seed(0)
    b, s, h, d = 2, 70, 3, 40
    q = torch.zeros(b, s, h, d, device=DEVICE)
    states = [State.empty(q), State.empty(q)]
    acc, m = torch.randn(b, s, h, d, generator=g), torch.randn(b, h, s, generator=g)
    lse = m + torch.rand(b, h, s, generator=g)
    m[0, 0, :5] = lse[0, 0, :5] = float("-inf")
    acc[0, :5, 0] = 0
    for st in states:
        st.acc.copy_(acc)
        st.m.copy_(m)
        st.lse.copy_(lse)
    o = torch.randn(b, s, h, d, generator=g).half().to(DEVICE)
    lse_b = torch.randn(b, h, s, generator=g).to(DEVICE)
    lse_b[1, 1, 3] = float("-inf")
    merge_torch = merge if DEVICE == "cpu" else None
    if merge_torch is None:  # on CUDA, merge() is the Triton kernel: compare with the torch formula on CPU
        cpu = State(states[0].acc.cpu(), states[0].m.cpu(), states[0].lse.cpu())
        merge(cpu, o.cpu(), lse_b.cpu())
        states[0] = cpu
    else:
        merge(states[0], o, lse_b)
    _merge_triton(states[1], o, lse_b)
    for a, c in zip((states[0].acc, states[0].m, states[0].lse), (states[1].acc, states[1].m, states[1].lse)):
        c = c.cpu()
        assert torch.equal(torch.isinf(a), torch.isinf(c))
        assert (a - c).nan_to_num().abs().max().item() < 1e-5


def test_fused_accumulate_adds_strided_half_precision_into_float32():
    """The sdpa backend's fp32 += bf16/fp16 kernel, on strided (b, h, s, d)-transposed sources."""
    import triton

    from ring_sp.kernels.triton_kernels import accumulate_kernel

    g = torch.Generator().manual_seed(0)
    dst = torch.randn(2, 30, 3, 40, generator=g).to(DEVICE)
    src = torch.randn(2, 3, 30, 40, generator=g).half().to(DEVICE).transpose(1, 2)
    want = dst + src.float()
    b, s, h, d = src.shape
    accumulate_kernel[(triton.cdiv(s, 64), b * h)](
        dst, src, dst.stride(0), dst.stride(1), dst.stride(2), src.stride(0), src.stride(1), src.stride(2), h, s, d,
        BLOCK_S=64, BLOCK_D=64)
    assert torch.equal(dst, want)
