"""Moving blocks between the positions of a ring: over torch.distributed, or simulated in one process.

A ring has ``size`` positions. A process *plays* some of them: one (a real rank) or all of them
(the simulated ring, for tests and single-GPU benchmarks). An *item* is a tuple (or NamedTuple)
of tensors, None where a field is absent. ``exchange(sends, hops, buffers)`` sends the item of
each played position p to position p + hops and returns, per played position, the item that
arrived from p − hops (None where nothing is sent). Transfers are posted at once (batched P2P, no
barrier) and completed by ``Pending.wait()``, so the caller computes while they fly. The transport
is an argument of the ring code (``DistributedRing``, ``SimulatedRing`` or a test double), never
looked up globally.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.distributed as dist

Item = tuple  # of Tensor | None


class Pending:
    """Transfers in flight; ``wait()`` returns the received items, one per played position."""

    def __init__(self, items: list[Item | None], requests: Sequence = (), sent: Sequence = ()):
        self._items, self._requests = items, list(requests)
        self._sent = list(sent)  # keep sent tensors (contiguous copies included) alive until done

    def wait(self) -> list[Item | None]:
        for request in self._requests:
            request.wait()
        self._requests, self._sent = [], []
        return self._items


class Ring(Protocol):
    size: int
    positions: list[int]

    def exchange(self, sends: list[Item | None], hops: int,
                 buffers: Callable[[int], Item | None]) -> Pending:
        """Send ``sends[i]`` (played position i's item, or None) ``hops`` positions ahead; receive into
        ``buffers(i)`` (empty tensors shaped like what arrives, None if nothing does)."""


class SimulatedRing:
    """W virtual positions played by this process; an exchange is a rotation of Python lists."""

    def __init__(self, size: int):
        self.size = size
        self.positions = list(range(size))

    def exchange(self, sends: list[Item | None], hops: int, buffers: Callable[[int], Item | None]) -> Pending:
        return Pending([sends[(p - hops) % self.size] for p in self.positions])


class DistributedRing:
    """This rank's position in a ring of a torch.distributed process group.

    The group's ranks (in group order) are cut into consecutive rings of ``size``
    (``size`` must divide the group size); the position inside the ring drives the schedule.
    """

    def __init__(self, group: dist.ProcessGroup, size: int):
        self.group = group
        self.ranks = dist.get_process_group_ranks(group)
        self.size = size
        index = self.ranks.index(dist.get_rank())
        self.first = index - index % size
        self.positions = [index % size]

    def _peer(self, position: int) -> int:
        return self.ranks[self.first + position % self.size]

    def exchange(self, sends: list[Item | None], hops: int, buffers: Callable[[int], Item | None]) -> Pending:
        if hops % self.size == 0:
            return Pending(list(sends))
        (position,), (item,), received = self.positions, sends, buffers(0)
        sent = [] if item is None else [t.contiguous() for t in item if t is not None]
        ops = [dist.P2POp(dist.isend, t, self._peer(position + hops), self.group) for t in sent]
        if received is not None:
            ops += [dist.P2POp(dist.irecv, t, self._peer(position - hops), self.group)
                    for t in received if t is not None]
        return Pending([received], dist.batch_isend_irecv(ops) if ops else (), sent)

def resolve_ring(group, ring_size) -> tuple[dist.ProcessGroup | None, int]:
    """The process group (None: not distributed; default: the world) and the size of the rings it is cut
    into (default: one ring over the whole group); ValueError naming the fix otherwise."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        group_size = 1
    elif not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group was given but torch.distributed is not initialized: call "
                         "torch.distributed.init_process_group first, or pass group=None")
    else:
        group = group if group is not None else dist.group.WORLD
        group_size = dist.get_world_size(group)
    if ring_size is None:
        return group, group_size
    if isinstance(ring_size, bool) or not isinstance(ring_size, int) or ring_size < 1 or group_size % ring_size:
        raise ValueError(f"ring_size={ring_size!r} does not divide the process group of {group_size} ranks: pass a "
                         f"divisor of {group_size}, or None for one ring over the whole group")
    return group, ring_size


def empty_like_rows(item: Item, rows: int) -> Item:
    """Empty tensors shaped like ``item``'s with ``rows`` along dim 1 (receive buffers)."""
    fields = [None if t is None else t.new_empty((t.shape[0], rows, *t.shape[2:])) for t in item]
    return type(item)(*fields) if hasattr(item, "_fields") else tuple(fields)


def gather_signatures(group: dist.ProcessGroup, signature: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every rank's ``signature`` (int tuples of one agreed length), in group order.

    One small all_gather over the group: callers compare the result and raise on every rank
    at once, so a rank with bad input fails the whole group instead of leaving peers hanging.
    On NCCL it runs on a side stream through pinned host memory, so the host waits for this
    exchange only, not for the compute already queued on the current stream.
    """
    world = dist.get_world_size(group)
    if dist.get_backend(group) != "nccl":
        local = torch.tensor(signature, dtype=torch.long)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        return [tuple(int(x) for x in t.tolist()) for t in gathered]
    device = torch.device("cuda", torch.cuda.current_device())
    side = _side_stream(device)
    host = torch.tensor(signature, dtype=torch.long).pin_memory()
    result = torch.empty(world * len(signature), dtype=torch.long).pin_memory()
    with torch.cuda.stream(side):
        local = host.to(device, non_blocking=True)
        gathered = torch.empty(world * len(signature), dtype=torch.long, device=device)
        dist.all_gather_into_tensor(gathered, local, group=group)
        result.copy_(gathered, non_blocking=True)
    side.synchronize()
    return [tuple(int(x) for x in row) for row in result.view(world, -1).tolist()]


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]

