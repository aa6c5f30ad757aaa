"""Ring attention over real gloo process groups of 1–4 ranks, every variant, against the float64
reference on the full sequence (each rank checks its own shard of out, dq, dk, dv) and against
the simulated ring."""

import pytest

from tests import ring_cases
from tests.ring_cases import cases

# The simulated ring runs the same schedule with the same backend in the same order.
SIMULATED_GAP = 1e-6


def check_distributed(pool, case_list) -> None:
    """Run ``case_list`` on every rank of ``pool``; assert each rank's errors, the gap to the simulated
    ring, and exact zeros for queries that see no key."""
    per_rank = pool.run(ring_cases.run_distributed, case_list)
    failures = []
    for rank, results in enumerate(per_rank):
        for name, errors, bounds, gap, blind in results:
            for what, err, bound in zip(("out", "dq", "dk", "dv"), errors, bounds):
                if not err <= bound:
                    failures.append(f"rank {rank} {name} {what}: rel err {err:.2e} > {bound:.2e}")
            if not gap <= SIMULATED_GAP:
                failures.append(f"rank {rank} {name}: distributed and simulated rings differ by {gap:.2e}")
            failures += [f"rank {rank} {name}: {x}" for x in blind]
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_distributed_ring_matches_reference(dist_pool, world, dtype):
    check_distributed(dist_pool(world), cases(world, dtypes=(dtype,)))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_zigzag_is_megatrons_context_parallel_split(dist_pool, world):
    assert all(dist_pool(world).run(ring_cases.zigzag_matches_megatron, 8 * world))
