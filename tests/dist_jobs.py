"""Jobs for the gloo worker pool (importable functions, run on every rank)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ring_sp import ring_attention, shard, split, unshard
from ring_sp.compat import ring_flash_attn_cuda
from tests.reference import reference_grads, rel_err


def disagreeing_shapes(kind: str) -> str:
    """Every rank calls ring_attention, rank 1 with something different; returns the error text."""
    rank = dist.get_rank()
    seq = 4 if not (kind == "seq" and rank == 1) else 6
    q = torch.randn(1, seq, 2, 8)
    kv = torch.randn(1, seq, 2, 8)
    kwargs = {}
    if kind == "causal" and rank == 1:
        kwargs["causal"] = True
    if kind == "bad_input" and rank == 1:
        kv = torch.randn(1, seq, 3, 8)  # 2 heads not divisible by 3 kv heads: rejected locally
    if kind == "ring_size" and rank == 1:
        kwargs["ring_size"] = 1
    try:
        ring_attention(q, kv, kv, **kwargs)
    except ValueError as e:
        # The group must still be usable: every rank made the same collectives.
        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == dist.get_world_size()
        return str(e)
    return "no error"


def shard_unshard_adjoint(layout: str, ring_size: int | None) -> list[float]:
    """shard and unshard against their definitions, and <shard(x), y> == <x, shard^T(y)>."""
    world, rank = dist.get_world_size(), dist.get_rank()
    size = ring_size or world
    position = rank % size
    seq = 4 * size
    g = torch.Generator().manual_seed(0)
    full = torch.randn(2, seq, 3, generator=g, dtype=torch.float64)
    errors = []
    # shard: this rank's positions; its backward gathers the ring's gradients.
    x = full.clone().requires_grad_()
    local = shard(x, layout, ring_size=ring_size)
    errors.append((local - split(full, layout, size)[position]).abs().max().item())
    grads = torch.randn(size, 2, seq // size, 3, generator=g, dtype=torch.float64)
    local.backward(grads[position])
    expected = torch.zeros_like(full)
    for r in range(size):
        expected += torch.zeros_like(full).index_copy(1, _positions(seq, layout, r, size), grads[r])
    errors.append((x.grad - expected).abs().max().item())
    # unshard: the full tensor; its backward sums every rank's gradient at this rank's positions.
    part = split(full, layout, size)[position].clone().requires_grad_()
    whole = unshard(part, layout, ring_size=ring_size)
    errors.append((whole - full).abs().max().item())
    upstream = torch.randn(size, *full.shape, generator=g, dtype=torch.float64)
    whole.backward(upstream[position])
    errors.append((part.grad - split(upstream.sum(0), layout, size)[position]).abs().max().item())
    return errors


def _positions(seq, layout, rank, world):
    from ring_sp import local_positions

    return local_positions(seq, layout, rank, world)


def compat_matches(striped: bool, reduce_col: bool) -> list[float]:
    """ring_flash_attn_cuda against the dense reference (float64, causal, masked, GQA)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = "striped" if striped else "contiguous"
    g = torch.Generator().manual_seed(3)
    seq = 5 * world
    q = torch.randn(2, seq, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, seq, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, seq, 2, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(2, seq, generator=g) > 0.2
    do = torch.randn(2, seq, 4, 8, generator=g, dtype=torch.float64)
    pos = torch.arange(seq)
    vis = pos[:, None] >= pos[None, :]
    if not reduce_col:
        owner = torch.empty(seq, dtype=torch.long)
        for r in range(world):
            owner[_positions(seq, layout, r, world)] = r
        vis &= owner[:, None] == owner[None, :]
    ref = reference_grads(q, k, v, do, mask=mask, visible_pairs=vis)
    mine = [split(t, layout, world)[rank] for t in (q, k, v, mask, do)]
    ql, kl, vl = (t.clone().requires_grad_() for t in mine[:3])
    out = ring_flash_attn_cuda(ql, kl, vl, mine[3], True, 3, reduce_col, striped)
    out.backward(mine[4])
    return [rel_err(a, split(b, layout, world)[rank]) for a, b in zip((out, ql.grad, kl.grad, vl.grad), ref)]
