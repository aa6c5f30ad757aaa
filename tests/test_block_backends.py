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
