"""Moving a tensor between its full and its sharded form along the sequence, for a layout.

``split``/``merge`` are pure (lists of W shards, for one process). ``shard``/``unshard`` are
the distributed pair, each the other's adjoint as in Megatron's sequence-parallel mappings:
``shard`` keeps this rank's positions (backward: gather the gradient from the ring), and
``unshard`` gathers the full tensor from the ring (backward: sum the gradients of every rank
and keep this rank's positions).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ring_sp.comm import DistributedRing, resolve_ring
from ring_sp.layout import check_seq_len, local_positions


def _check_dim(x: Tensor, dim: int) -> int:
    if not isinstance(x, Tensor):
        raise ValueError(f"expected a tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def split(x: Tensor, layout: str, world: int, dim: int = 1) -> list[Tensor]:
    """The W shards of ``x`` (full sequence along ``dim``) under ``layout``, in ring order."""
    dim = _check_dim(x, dim)
    check_seq_len(layout, x.shape[dim], world)
    return [x.index_select(dim, local_positions(x.shape[dim], layout, r, world).to(x.device)) for r in range(world)]


def merge(shards: list[Tensor], layout: str, dim: int = 1) -> Tensor:
    """The full tensor whose shards (in ring order) under ``layout`` are ``shards``."""
    world = len(shards)
    dim = _check_dim(shards[0], dim)
    seq = shards[0].shape[dim] * world
    check_seq_len(layout, seq, world)
    order = torch.cat([local_positions(seq, layout, r, world) for r in range(world)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(seq)
    return torch.cat(shards, dim).index_select(dim, inverse.to(shards[0].device))


def _ring(group, ring_size) -> DistributedRing | None:
    group, size = resolve_ring(group, ring_size)
    return DistributedRing(group, size) if group is not None and size > 1 else None


def _gather(ring: DistributedRing, x: Tensor, layout: str, dim: int) -> Tensor:
    """All positions' shards of ``x``, merged, by W − 1 hops around the ring."""
    (position,) = ring.positions
    pieces = {position: x}
    item = (x.contiguous(),)
    for hop in range(1, ring.size):
        (item,) = ring.exchange([item], 1, lambda _, like=item[0]: (torch.empty_like(like),)).wait()
        pieces[(position - hop) % ring.size] = item[0]
    return merge([pieces[r] for r in range(ring.size)], layout, dim)


def _reduce_scatter(ring: DistributedRing, x: Tensor, layout: str, dim: int) -> Tensor:
    """Σ over the ring's ranks of their full ``x``, at this rank's positions."""
    (position,) = ring.positions
    parts = split(x, layout, ring.size, dim)
    partial = parts[(position - 1) % ring.size].contiguous()
    for hop in range(1, ring.size):
        ((partial,),) = ring.exchange([(partial,)], 1, lambda _, like=partial: (torch.empty_like(like),)).wait()
        partial = partial + parts[(position - hop - 1) % ring.size]
    return partial


class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ring, layout, dim):
        ctx.ring, ctx.layout, ctx.dim = ring, layout, dim
        (position,) = ring.positions
        return split(x, layout, ring.size, dim)[position].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _gather(ctx.ring, grad, ctx.layout, ctx.dim), None, None, None


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ring, layout, dim):
        ctx.ring, ctx.layout, ctx.dim = ring, layout, dim
        return _gather(ring, x, layout, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(ctx.ring, grad, ctx.layout, ctx.dim), None, None, None


def shard(x: Tensor, layout: str = "contiguous", *, dim: int = 1, group=None, ring_size: int | None = None) -> Tensor:
    """This rank's shard of ``x``, which holds the full sequence along ``dim`` on every rank.

    Backward gathers the shards' gradients from the ring into the full gradient.
    """
    dim = _check_dim(x, dim)
    ring = _ring(group, ring_size)
    world = 1 if ring is None else ring.size
    check_seq_len(layout, x.shape[dim], world)
    return x if ring is None else _Shard.apply(x, ring, layout, dim)


def unshard(x: Tensor, layout: str = "contiguous", *, dim: int = 1, group=None, ring_size: int | None = None) -> Tensor:
    """The full sequence along ``dim``, gathered from this rank's ring; ``x`` is this rank's shard.

    Backward sums the full gradients of the ring's ranks and keeps this rank's positions.
    """
    dim = _check_dim(x, dim)
    ring = _ring(group, ring_size)
    return x if ring is None else _Unshard.apply(x, ring, layout, dim)
