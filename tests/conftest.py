import os

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter; it must be chosen before
# triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.dist_pool import DistPool  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def dist_pool():
    """dist_pool(world) -> a DistPool of that many gloo ranks, shared by the whole session."""
    pools: dict[int, DistPool] = {}

    def get(world: int) -> DistPool:
        if world not in pools or pools[world].broken:
            pools[world] = DistPool(world)
        return pools[world]

    yield get
    for pool in pools.values():
        if not pool.broken:
            pool.close()
