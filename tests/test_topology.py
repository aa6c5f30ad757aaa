"""Ring groups in DeepSpeed's topology agree with Megatron-core's, and ZeRO scales gradients right."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ring_sp.topology import RingTopology, megatron_groups
from tests import deepspeed_jobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (our axes, as Megatron-core builds them): tp, cp, dp, pp, dp-cp (ZeRO's group), tp-pp (model), tp-cp
AXES = [("model",), ("ring",), ("data",), ("pipe",), ("data", "ring"), ("pipe", "model"), ("ring", "model")]


def factorisations(world: int) -> list[tuple[int, int, int, int]]:
    divs = [d for d in range(1, world + 1) if world % d == 0]
    return [(tp, pp, ring, world // (tp * pp * ring)) for tp in divs for pp in divs for ring in divs
            if world % (tp * pp * ring) == 0]


@pytest.mark.parametrize("world", [8, 16])
def test_topology_matches_megatron_for_every_factorisation(world):
    cases = factorisations(world)
    assert len(cases) == {8: 20, 16: 35}[world]
    for tp, pp, ring, dp in cases:
        topo = RingTopology(world, tensor=tp, pipeline=pp, ring=ring)
        assert (topo.tensor, topo.pipeline, topo.ring, topo.data) == (tp, pp, ring, dp)
        for axes in AXES:
            ours = topo.groups(*axes)
            assert ours == megatron_groups(world, tensor=tp, pipeline=pp, ring=ring, axes=axes), (tp, pp, ring, axes)
            assert sorted(r for g in ours for r in g) == list(range(world))


def test_rings_stay_inside_a_node():
    # 2 nodes × 8 GPUs: whenever tensor × ring divides 8, every ring lives on one node.
    for tp, pp, ring, _ in factorisations(16):
        topo = RingTopology(16, tensor=tp, pipeline=pp, ring=ring)
        if 8 % (tp * ring) == 0:
            assert all(len(nodes) == 1 for nodes in topo.ring_nodes(8)), (tp, pp, ring)
    topo = RingTopology(16, tensor=2, ring=4)
    assert topo.groups("ring") == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert topo.groups("data")[:2] == [[0, 8], [1, 9]]


def test_topology_is_deepspeeds_process_topology():
    # DeepSpeed's PipelineModule gets process_topology(): the same coordinates for every rank.
    for tp, pp, ring, _ in factorisations(16):
        ours = RingTopology(16, tensor=tp, pipeline=pp, ring=ring)
        theirs = ours.process_topology()
        assert [tuple(ours.get_coord(r)) for r in range(16)] == [tuple(theirs.get_coord(r)) for r in range(16)]
        assert ours.groups("pipe") == sorted(theirs.get_axis_comm_lists("pipe"))


def test_topology_imports_deepspeed_only_when_used():
    code = ("import sys; from ring_sp import topology; topology.RingTopology(8, ring=2).groups('ring'); "
            "assert 'deepspeed' not in sys.modules, 'imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_topology_rejects_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="does not divide the world of 8 ranks"):
        RingTopology(8, ring=3)
    with pytest.raises(ValueError, match="tensor=0"):
        RingTopology(8, tensor=0)
    with pytest.raises(ValueError, match="axis 'seq' is unknown"):
        RingTopology(8).groups("seq")


@pytest.mark.parametrize("tensor,ring", [(1, 2), (2, 2), (1, 4)])
def test_mpu_groups_are_megatrons(dist_pool, tensor, ring):
    answers = dist_pool(4).run(deepspeed_jobs.mpu_answers, tensor, 1, ring)
    topo = RingTopology(4, tensor=tensor, ring=ring)
    data = 4 // (tensor * ring)
    for rank, a in enumerate(answers):
        assert a["ring"] == topo.group_of(rank, "ring")
        assert a["data"] == topo.group_of(rank, "data")
        assert a["data_ring"] == topo.group_of(rank, "data", "ring")
        assert a["tensor"] == a["model"] == topo.group_of(rank, "model")
        assert a["sizes"] == (data, ring, data * ring, tensor, tensor, 1)
        coord = topo.get_coord(rank)
        assert a["ranks"][:2] == (coord.data, coord.ring) and a["ranks"][3] == coord.model


@pytest.mark.parametrize("stage,ring,clip", [(1, 2, 0.0), (2, 2, 0.0), (1, 4, 0.0), (2, 2, 1.0), (3, 2, 0.0),
                                             (3, 2, 1.0)])
def test_zero_reduces_over_data_and_ring_with_the_right_scaling(dist_pool, stage, ring, clip):
    # DeepSpeed sums gradients over data × ring and divides by data only; ring_loss makes that the mean.
    # With clipping (DeepSpeed's default is 1.0) the norm must also be taken over the whole model once.
    for err, scale in dist_pool(4).run(deepspeed_jobs.zero_gradient_scaling, stage, ring, clip):
        assert scale > 0.1 and err < 1e-5 * scale, (err, scale)
