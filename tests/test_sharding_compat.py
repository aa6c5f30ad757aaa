"""shard/unshard over gloo (sub-rings included) and the ring-attention-pytorch compat signature."""

import inspect

import pytest

from ring_sp.compat import ring_flash_attn_cuda
from tests import dist_jobs


@pytest.mark.parametrize("layout", ["contiguous", "striped", "zigzag"])
@pytest.mark.parametrize("world,ring_size", [(2, None), (3, None), (4, 2)])
def test_shard_and_unshard_are_adjoint(dist_pool, layout, world, ring_size):
    for errors in dist_pool(world).run(dist_jobs.shard_unshard_adjoint, layout, ring_size):
        assert max(errors) < 1e-12, errors


def test_compat_signature_is_the_seeds():
    params = inspect.signature(ring_flash_attn_cuda).parameters
    assert list(params) == ["q", "k", "v", "mask", "causal", "bucket_size", "ring_reduce_col", "striped_ring_attn",
                            "max_lookback_seq_len", "ring_size"]
    defaults = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    assert defaults == dict(mask=None, causal=False, bucket_size=1024, ring_reduce_col=False,
                            striped_ring_attn=False, max_lookback_seq_len=None, ring_size=None)


@pytest.mark.parametrize("striped", [False, True])
@pytest.mark.parametrize("reduce_col", [False, True])
def test_compat_matches_reference(dist_pool, striped, reduce_col):
    for errors in dist_pool(3).run(dist_jobs.compat_matches, striped, reduce_col):
        assert max(errors) < 1e-10, errors
