"""Layouts and schedules, checked exhaustively against brute force on global positions."""

import itertools

import pytest
import torch

from ring_sp.layout import LAYOUTS, check_local_seq, local_positions, segments
from ring_sp.schedule import plan
from tests.schedule_cells import cell_counts, visible_cells


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_positions_partition_the_sequence(layout, world):
    seq = 4 * world
    held = torch.cat([local_positions(seq, layout, r, world) for r in range(world)])
    assert sorted(held.tolist()) == list(range(seq))
    for r in range(world):
        pos = local_positions(seq, layout, r, world)
        assert (pos[1:] > pos[:-1]).all(), "local positions must increase with the local index"
        from_segments = torch.cat([s.global_start + s.stride * torch.arange(s.length)
                                   for s in segments(layout, r, world, seq // world)])
        assert torch.equal(pos, from_segments)


def test_layout_formulas():
    assert local_positions(8, "contiguous", 1, 2).tolist() == [4, 5, 6, 7]
    assert local_positions(8, "striped", 1, 2).tolist() == [1, 3, 5, 7]
    assert local_positions(8, "zigzag", 0, 2).tolist() == [0, 1, 6, 7]
    assert local_positions(8, "zigzag", 1, 2).tolist() == [2, 3, 4, 5]


def test_bad_layout_inputs():
    with pytest.raises(ValueError, match="layout='diagonal' is unknown"):
        local_positions(8, "diagonal", 0, 2)
    with pytest.raises(ValueError, match="multiple of 8"):
        local_positions(12, "zigzag", 0, 4)
    with pytest.raises(ValueError, match="must be even"):
        check_local_seq("zigzag", 3, 4)


def _visible_by_schedule(layout, world, n, **kw):
    """count[r][p_local, t_global]: how often the schedule computes query p of rank r against key t."""
    sched = plan(layout, world, n, **kw)
    return sched, cell_counts(sched, layout, world, n, ((0, world * n),))[0][0]


CASES = [
    (layout, world, n, causal, lookback, reduce_col)
    for layout, world, n, causal, lookback, reduce_col in itertools.product(
        LAYOUTS, [1, 2, 3, 4, 5], [2, 4, 6], [False, True], [None, 1, 2, 3, 5, 9, 100], [True, False])
    if causal or lookback is None
]


@pytest.mark.parametrize("layout,world,n,causal,lookback,reduce_col", CASES)
def test_schedule_covers_exactly_the_visible_pairs(layout, world, n, causal, lookback, reduce_col):
    sched, counts = _visible_by_schedule(layout, world, n, causal=causal, lookback=lookback, reduce_col=reduce_col)
    for r in range(world):
        want = visible_cells(layout, world, n, r, causal, lookback, reduce_col)
        assert torch.equal(counts[r], want.long()), f"rank {r}: pairs computed != pairs visible (or computed twice)"
    last = sched.steps[-1]
    assert sched.n_steps == 1 or any(last), "a trailing step carries nothing visible"
    for step in sched.steps:
        for blocks in step:
            assert all(b.area > 0 for b in blocks), "a fully masked block is scheduled"


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_causal_work_is_balanced(layout):
    world, n = 4, 16
    sched = plan(layout, world, n, causal=True)
    work = [sum(b.area for step in sched.steps for b in step[r]) for r in range(world)]
    assert max(work) - min(work) <= n * world, work  # striped: strict blocks lose one diagonal
    contiguous = plan("contiguous", world, n, causal=True)
    c_work = [sum(b.area for step in contiguous.steps for b in step[r]) for r in range(world)]
    assert max(c_work) > 3 * min(c_work)


def test_lookback_skips_ring_passes():
    assert plan("contiguous", 8, 16, causal=True, lookback=16).n_steps == 2
    assert plan("contiguous", 8, 16, causal=True, lookback=17).n_steps == 2
    assert plan("contiguous", 8, 16, causal=True, lookback=18).n_steps == 3
    assert plan("striped", 8, 16, causal=True, lookback=3).n_steps == 3
    assert plan("contiguous", 8, 16, causal=True).n_steps == 8
    assert plan("contiguous", 8, 16, reduce_col=False).n_steps == 1


def test_striped_uses_strictly_causal_blocks():
    sched = plan("striped", 4, 8, causal=True)
    assert sched.steps[1][0][0].band.kind == "strict"
    assert sched.steps[1][1][0].band.kind == "causal"


@pytest.mark.parametrize("layout,world,n,causal,lookback,reduce_col", CASES[::3])
def test_roles_say_which_block_first_and_last_touches_its_rows(layout, world, n, causal, lookback, reduce_col):
    sched = plan(layout, world, n, causal=causal, lookback=lookback, reduce_col=reduce_col)
    for r in range(world):
        roles = sched.roles(r)
        assert [len(x) for x in roles] == [len(step[r]) for step in sched.steps]
        done = [(set(range(b.q_start, b.q_stop)), flags) for step, fl in zip(sched.steps, roles)
                for b, flags in zip(step[r], fl)]
        for i, (rows, (fresh, final)) in enumerate(done):
            before = set().union(*(x for x, _ in done[:i]))
            after = set().union(*(x for x, _ in done[i + 1:]))
            assert fresh == (not rows & before) and final == (not rows & after), (r, i)
        if lookback is None and (world == 1 or layout == "contiguous"):  # every output written by its last block
            assert set().union(*(x for x, (_, final) in done if final)) == set().union(*(x for x, _ in done))
