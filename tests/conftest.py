import os

# One thread per process: make test runs two workers (pytest-xdist) beside multi-process jobs on two cores,
# and with more threads than free cores every tiny op waits on OpenMP's barrier (seen: 5 ms instead of
# 0.06 ms per einsum on a loaded machine; test_block_backends.py 208 s -> 11 s). Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# Without a GPU, Triton kernels run in Triton's CPU interpreter; it must be chosen before
# triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.dist_pool import DistPool  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dist_pool():
    """dist_pool(world) -> a DistPool of that many gloo ranks, shared by the tests of one module. Not by the
    whole session: process groups that jobs create and destroy keep their gloo threads in the workers (seen:
    420 threads in a worker late in a session, each idle worker at 18% of a core, load average near 100 on
    2 cores, and the last modules' torchrun jobs timing out), so each module's workers exit with it."""
    pools: dict[int, DistPool] = {}

    def get(world: int) -> DistPool:
        if world not in pools or pools[world].broken:
            pools[world] = DistPool(world)
        return pools[world]

    yield get
    for pool in pools.values():
        if not pool.broken:
            pool.close()
