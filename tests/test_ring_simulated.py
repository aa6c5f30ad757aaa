"""The simulated ring (W virtual ranks in one process) against the float64 dense reference."""

import pytest

from tests.ring_cases import DTYPES, cases, check_simulated

# The distributed test runs ``auto`` over W = 1–4 and checks the simulated ring against it; here:
# larger rings with ``auto``, and the reference torch backend through the whole ring.
WORLDS = [("auto", 5), ("auto", 8), ("torch", 1), ("torch", 2), ("torch", 3), ("torch", 4)]


@pytest.mark.parametrize("backend,world", WORLDS)
@pytest.mark.parametrize("layout", ["contiguous", "striped", "zigzag"])
def test_simulated_ring_matches_reference(world, layout, backend):
    failures = []
    # W = 5 and 8 add schedule shapes, not arithmetic: float32 only (every dtype runs at W = 1-4).
    dtypes = ("float32",) if world > 4 else tuple(DTYPES)
    for case in cases(world, ring_sizes=[None], dtypes=dtypes):
        if case.layout == layout:
            failures += check_simulated(case, world, backend=backend)
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("backend,made", [("sdpa", 0), ("torch", 2)])
def test_backward_computes_delta_only_for_backends_that_read_it(monkeypatch, backend, made):
    """rowsum(do · out) is a float32 pass over do and out per position: the fused ops (sdpa, flash_attn) make their
    own, so the ring makes it only for torch / triton (once per position, not per block)."""
    import torch

    import ring_sp.attention as attention
    from ring_sp import ring_attention_simulated

    calls = []
    original = attention._row_dot
    monkeypatch.setattr(attention, "_row_dot", lambda *a, **k: calls.append(1) or original(*a, **k))
    g = torch.Generator().manual_seed(0)
    qs, ks, vs = ([torch.randn(1, 8, heads, 16, generator=g, requires_grad=True) for _ in range(2)]
                  for heads in (4, 2, 2))
    outs = ring_attention_simulated(qs, ks, vs, causal=True, backend=backend)
    sum((o * o).sum() for o in outs).backward()
    assert len(calls) == made and all(q.grad is not None and q.grad.abs().sum() > 0 for q in qs)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("causal", [True, False])
def test_a_ring_of_one_keeps_gradients_in_the_inputs_dtype_bit_for_bit(monkeypatch, dtype, causal):
    """W = 1 with a one-call backend (sdpa): dq, dk, dv accumulate in the inputs' dtype, not float32, and are
    the same bits as through float32 accumulators (0 + x is exact). Not at W = 2, nor with the torch backend."""
    import torch

    import ring_sp.attention as attention
    from ring_sp import ring_attention_simulated

    dt = getattr(torch, dtype)
    seen = []
    original = attention._sole_block
    monkeypatch.setattr(attention, "_sole_block", lambda *a: seen.append(original(*a)) or seen[-1])

    def grads(world: int, backend: str, sole: bool = True):
        g = torch.Generator().manual_seed(1)
        qs, ks, vs = ([torch.randn(1, 16 // world, heads, 16, generator=g).to(dt).requires_grad_(True)
                       for _ in range(world)] for heads in (4, 2, 2))
        if not sole:
            monkeypatch.setattr(attention, "_sole_block", lambda *a: False)
        outs = ring_attention_simulated(qs, ks, vs, causal=causal, backend=backend)
        torch.autograd.backward(outs, [torch.ones_like(o) * torch.arange(o.numel()).view_as(o).sin() for o in outs])
        return [t.grad for t in (*qs, *ks, *vs)]

    fast = grads(1, "sdpa")
    assert seen == [True]
    slow = grads(1, "sdpa", sole=False)
    assert all(torch.equal(a, b) and a.dtype == dt for a, b in zip(fast, slow))
    monkeypatch.setattr(attention, "_sole_block", lambda *a: seen.append(original(*a)) or seen[-1])
    seen.clear()
    grads(2, "sdpa")
    grads(1, "torch")
    assert seen == [False, False, False]
