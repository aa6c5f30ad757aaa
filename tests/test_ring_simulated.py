"""The simulated ring (W virtual ranks in one process) against the float64 dense reference."""

import pytest

from tests.ring_cases import cases, check_simulated


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("layout", ["contiguous", "striped", "zigzag"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_simulated_ring_matches_reference(world, layout, backend):
    failures = []
    for case in cases(world, ring_sizes=[None]):
        if case.layout == layout:
            failures += check_simulated(case, world, backend=backend)
    assert not failures, "\n".join(failures[:20])
