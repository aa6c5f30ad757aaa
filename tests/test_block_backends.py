"""Each block backend on its own against the float64 reference: every band kind, mask, GQA, odd lengths."""

import itertools

import pytest
import torch

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
    for (sq, sk, h, hk, d), masked in itertools.product(SHAPES, [False, True]):
        for bucket in (None, 3):
            errors = check_block("torch", sq=sq, sk=sk, heads=h, kv_heads=hk, head_dim=d, band=band, masked=masked,
                                 dtype=dtype, bucket_size=bucket)
            bad = {k: v for k, v in errors.items() if not v <= BOUND[dtype]}
            assert not bad, f"sq={sq} sk={sk} h={h}/{hk} d={d} mask={masked} bucket={bucket}: {bad}"
