"""Each block backend on its own against the float64 reference: every band kind, mask, GQA, odd lengths."""

import itertools

import pytest
import torch

from ring_sp.kernels import Band
from tests.block_check import BANDS, check_block

BOUND = {torch.float64: 1e-10, torch.float32: 1e-5}

SHAPES = [  # (sq, sk, heads, kv_heads, head_dim)
    (7, 5, 2, 2, 16),
    (16, 16, 4, 1, 8),
    (13, 21, 4, 2, 32),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("band", BANDS, ids=str)
def test_torch_backend_block(dtype, band):
    for (sq, sk, h, hk, d), masked, documents in itertools.product(SHAPES, [False, True], [False, True]):
        for bucket in (None, 3):
            errors = check_block("torch", sq=sq, sk=sk, heads=h, kv_heads=hk, head_dim=d, band=band, masked=masked,
                                 dtype=dtype, bucket_size=bucket, documents=documents)
            bad = {k: v for k, v in errors.items() if not v <= BOUND[dtype]}
            assert not bad, f"sq={sq} sk={sk} h={h}/{hk} d={d} mask={masked} docs={documents} bucket={bucket}: {bad}"


SDPA_BANDS = [b for b in BANDS if b.hi is None and (b.lo is None or b.lo >= 0)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("band", SDPA_BANDS, ids=str)
def test_sdpa_backend_block_on_cpu(dtype, band):
    """PyTorch's CPU flash kernel through the sdpa backend: merging, the shift for strict blocks, GQA."""
    for sq, sk, h, hk, d in SHAPES:
        errors = check_block("sdpa", sq=sq, sk=sk, heads=h, kv_heads=hk, head_dim=d, band=band, masked=False,
                             dtype=dtype)
        bad = {k: v for k, v in errors.items() if not v <= BOUND[dtype]}
        assert not bad, f"sq={sq} sk={sk} h={h}/{hk} d={d}: {bad}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("band", [Band(), Band(lo=0)], ids=str)
def test_sdpa_backend_documents_block_on_cpu(dtype, band):
    """A block of several documents listed by their runs (the schedule's WHOLE blocks) through the ragged
    op (on the CPU one kernel call per document): continuing a state, writing the output, the backward."""
    shapes = [(16, 16, 4, 1, 8), (13, 13, 4, 2, 32)] + ([(13, 21, 4, 2, 32), (9, 6, 2, 2, 16)] if band.lo is None
                                                        else [])
    for seed, (sq, sk, h, hk, d) in itertools.product(range(3), shapes):
        errors = check_block("sdpa", sq=sq, sk=sk, heads=h, kv_heads=hk, head_dim=d, band=band, masked=False,
                             dtype=dtype, documents="runs", seed=seed)
        bad = {k: v for k, v in errors.items() if not v <= BOUND[dtype]}
        assert not bad, f"seed={seed} sq={sq} sk={sk} h={h}/{hk} d={d}: {bad}"


def test_sdpa_backend_refuses_what_it_cannot_compute():
    from ring_sp import kernels
    from ring_sp.kernels import Band, BlockDocuments, Visibility

    sdpa = kernels.get("sdpa")
    q = torch.randn(1, 8, 2, 16)
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]], dtype=torch.int32)
    assert "key mask" in sdpa.unsupported(q, q, Visibility(Band(), torch.ones(1, 8, dtype=torch.bool)))
    assert "document" in sdpa.unsupported(q, q, Visibility(Band(lo=0), None, BlockDocuments(ids, ids)))
    # with runs: causal blocks only where each document is its own causal square; no rows without keys
    square = ((3, 3), (2, 2), (3, 3))
    assert sdpa.unsupported(q, q, Visibility(Band(lo=0), None, BlockDocuments(ids, ids, square))) is None
    assert "causal square" in sdpa.unsupported(q, q, Visibility(Band(lo=0), None, BlockDocuments(ids, ids,
                                                                                                 ((3, 2), (5, 6)))))
    assert "causal square" in sdpa.unsupported(q, q, Visibility(Band(lo=1), None, BlockDocuments(ids, ids, square)))
    assert "without keys" in sdpa.unsupported(q, q, Visibility(Band(), None, BlockDocuments(ids, ids,
                                                                                            ((3, 0), (5, 8)))))
    assert "full and causal" in sdpa.unsupported(q, q, Visibility(Band(lo=0, hi=3)))
    assert "full and causal" in sdpa.unsupported(q, q, Visibility(Band(lo=-2)))
    # auto falls back to another backend for those blocks
    assert kernels.choose("auto", q, q, Visibility(Band(lo=0, hi=3))).name in ("torch", "triton")
    assert kernels.choose("auto", q, q, Visibility(Band(lo=0), None, BlockDocuments(ids, ids))).name == "torch"
    assert kernels.choose("auto", q, q, Visibility(Band(lo=1))).name == "sdpa"


def test_ragged_bounds_let_plans_recur():
    """cuDNN builds a plan per document count and length bound: a block's documents are padded to a power-of-two
    count with empty ones and carry one power-of-two bound for rows and columns, so new lengths in the same
    buckets reuse a plan; the backward's packed tensors are padded with zero rows to one power of two."""
    from ring_sp.kernels import sdpa_backend
    from ring_sp.kernels.visibility import ragged

    docs = ragged(((3, 5), (10, 2), (1, 1)), torch.device("cpu"))
    assert docs.runs == ((3, 5), (10, 2), (1, 1), (0, 0))
    assert (docs.max_q, docs.max_k) == (16, 16)
    assert docs.cu_q.tolist() == [0, 3, 13, 14, 14] and docs.cu_k.tolist() == [0, 5, 7, 8, 8]
    assert ragged(((9, 16),), torch.device("cpu"))[3:] == (16, 16)  # the same plan as above but for the count
    x = torch.randn(5, 2, 4)
    padded = sdpa_backend._pad_rows(x, 8)
    assert padded.shape == (8, 2, 4) and torch.equal(padded[:5], x) and not padded[5:].any()
    assert sdpa_backend._pad_rows(x, 5) is x
    # PyTorch's op keeps the lengths that recur (multiples of 256 and the one-token shift of them)
    assert sdpa_backend._recurring(16384, 8192) and sdpa_backend._recurring(16383, 16383)
    assert not sdpa_backend._recurring(16384, 3000) and not sdpa_backend._recurring(300, 256)


def _counting(op, calls):
    """``op`` on the CPU under the name fa4, counting its forward calls by (rows, keys, causal)."""
    import dataclasses

    def forward(q, k, v, causal, scale):
        calls.append((q.shape[2], k.shape[2], causal))
        return op.forward(q, k, v, causal, scale)

    return dataclasses.replace(op, name="fa4", forward=forward, square_causal=True)


def test_an_op_with_a_bottom_right_causal_mask_gets_square_causal_calls_only(monkeypatch):
    """FlashAttention-4 aligns causal masks bottom-right: the sdpa backend gives it full calls and square causal
    calls, and computes other causal calls with the next op, with the same result."""
    from ring_sp.kernels import SdpaBackend, State, Visibility, sdpa_backend

    calls = []
    monkeypatch.setitem(sdpa_backend.OPS, "fa4", _counting(sdpa_backend.OPS["cpu"], calls))
    monkeypatch.setattr(sdpa_backend, "_AVAILABLE", {})
    assert sdpa_backend.SdpaBackend()._op(torch.zeros(1, 2, 4, 16, dtype=torch.float64)).name == "fa4"  # tried once
    g = torch.Generator().manual_seed(0)
    for sq, sk, band, want in ((16, 16, Band(lo=0), [(16, 16, True)]), (13, 21, Band(), [(13, 21, False)]),
                               (16, 16, Band(lo=1), [(15, 15, True)]), (13, 21, Band(lo=0), [(13, 13, True)]),
                               (21, 13, Band(lo=0), [])):
        q = torch.randn(1, sq, 4, 16, generator=g, dtype=torch.float64)
        k, v = (torch.randn(1, sk, 2, 16, generator=g, dtype=torch.float64) for _ in range(2))
        calls.clear()
        state = State.empty(q)
        SdpaBackend().forward(q, k, v, state, Visibility(band), 0.25)
        assert calls == want, (sq, sk, band)
        reference = State.empty(q)
        SdpaBackend("cpu").forward(q, k, v, reference, Visibility(band), 0.25)
        assert torch.allclose(state.output(), reference.output())


def test_an_op_that_disagrees_with_float32_math_is_not_used(monkeypatch, caplog):
    """Each op is tried once against float32 math (forward, lse and gradients, causal, GQA) before use; one that
    is installed but fails is left out with a warning."""
    import dataclasses

    from ring_sp import kernels
    from ring_sp.kernels import Visibility, sdpa_backend

    def off(q, k, v, causal, scale):
        out, lse = sdpa_backend._cpu_fwd(q, k, v, causal, scale)
        return out, lse + 0.5

    monkeypatch.setitem(sdpa_backend.OPS, "fa4", dataclasses.replace(sdpa_backend.OPS["cpu"], name="fa4",
                                                                       forward=off))
    monkeypatch.setattr(sdpa_backend, "_AVAILABLE", {})
    q = torch.randn(1, 8, 2, 16)
    with caplog.at_level("WARNING", logger=sdpa_backend.log.name):
        assert not sdpa_backend._available(sdpa_backend.OPS["fa4"], q)
    assert any("sdpa op fa4 not used" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert sdpa_backend._available(sdpa_backend.OPS["cpu"], q)
    assert sdpa_backend.SdpaBackend()._op(q).name == "cpu"
    assert "no fused op" in kernels.get("sdpa_fa4").unsupported(q, q, Visibility())


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_an_op_first_tried_without_autograd_is_still_used(monkeypatch, mode):
    """Megatron's full recompute runs a layer's first forward under no_grad: the op's trial (which checks gradients
    against float32 autograd) must not fail there and rule the op out for the whole process."""
    from ring_sp import RingOptions, attention_kernel
    from ring_sp.kernels import sdpa_backend

    monkeypatch.setattr(sdpa_backend, "_AVAILABLE", {})
    q, k = torch.empty(1, 8, 4, 16), torch.empty(1, 8, 2, 16)
    with getattr(torch, mode)():
        assert attention_kernel(RingOptions(causal=True), q, k) == "sdpa (cpu)"
        assert not torch.is_grad_enabled()  # the trial restores the caller's mode
    assert attention_kernel(RingOptions(causal=True), q, k) == "sdpa (cpu)"
    assert sdpa_backend._AVAILABLE == {("cpu", q.device, q.dtype, 16, False): True}


def test_flash_attn_4_alone_does_not_register_the_flash_attn_2_backend(tmp_path, monkeypatch):
    """flash-attn-4 installs the namespace package flash_attn holding only flash_attn.cute."""
    import importlib.util
    import sys

    from ring_sp import kernels

    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    try:
        assert importlib.util.find_spec("flash_attn") is not None
        assert not kernels._installed("flash_attn.flash_attn_interface")
        assert not kernels._installed("no_such_package.module")
    finally:
        sys.modules.pop("flash_attn", None)


def test_attention_kernel_names_the_backend_and_its_fused_op(monkeypatch):
    """ring_sp.attention_kernel: what computes a ring's blocks for given options and inputs (the job and
    megatron_patch's guard print it), so an optional kernel that failed to load is not a silent fallback."""
    from ring_sp import RingOptions, attention_kernel
    from ring_sp.kernels import sdpa_backend

    q, k = torch.empty(1, 8, 4, 16), torch.empty(1, 8, 2, 16)
    assert attention_kernel(RingOptions(causal=True), q, k) == "sdpa (cpu)"
    assert attention_kernel(RingOptions(backend="torch"), q, k) == "torch"
    monkeypatch.setitem(sdpa_backend.OPS, "fa4", _counting(sdpa_backend.OPS["cpu"], []))
    monkeypatch.setattr(sdpa_backend, "_AVAILABLE", {})
    assert attention_kernel(RingOptions(causal=True), q, k) == "sdpa (fa4)"
    assert attention_kernel(RingOptions(causal=True), q.double(), k.double()) == "sdpa (fa4)"


def test_a_ragged_op_whose_dense_form_disagrees_with_float32_math_is_not_used(monkeypatch):
    """The ragged trial compares each document with the op's own dense call: a dense form that is off (and a
    ragged form off the same way, which agrees with it) must not pass."""
    import dataclasses

    from ring_sp.kernels import sdpa_backend

    cpu = sdpa_backend.OPS["cpu"]

    def off(q, k, v, causal, scale):
        out, lse = cpu.forward(q, k, v, causal, scale)
        return out * 2, lse

    def ragged_off(q, k, v, docs, causal, scale):
        out, lse = cpu.ragged_forward(q, k, v, docs, causal, scale)
        return out * 2, lse

    monkeypatch.setitem(sdpa_backend.OPS, "cpu", dataclasses.replace(cpu, forward=off, ragged_forward=ragged_off))
    monkeypatch.setattr(sdpa_backend, "_AVAILABLE", {})
    q = torch.randn(1, 8, 2, 16)
    assert sdpa_backend._try_ragged(sdpa_backend.OPS["cpu"], q)  # agrees with its own dense form ...
    assert not sdpa_backend._available(sdpa_backend.OPS["cpu"], q, ragged=True)  # ... which is wrong
    monkeypatch.setattr(sdpa_backend, "_AVAILABLE", {})
    monkeypatch.setitem(sdpa_backend.OPS, "cpu", cpu)
    assert sdpa_backend._available(sdpa_backend.OPS["cpu"], q, ragged=True)
