import pytest
import torch

from tests.dist_pool import DistPool

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
