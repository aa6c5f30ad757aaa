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
