"""Moving blocks around a ring: over torch.distributed, or simulated in one process.

A ring has ``size`` positions. A process *plays* some of them: one (a real rank) or all of them
(the simulated ring, for tests and single-GPU benchmarks). ``shift(items, hops)`` sends the
item of each played position p to position p + hops and returns, per played position, the item
that arrived from p − hops. Transfers are posted at once (batched P2P to the two peers, no
barrier) and completed by ``Pending.wait()``, so the caller computes while they fly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

Item = list[Tensor]


class Pending:
    """Transfers in flight; ``wait()`` returns the received items, one per played position."""

    def __init__(self, items: list[Item], requests: Sequence = ()):
        self._items, self._requests = items, list(requests)

    def wait(self) -> list[Item]:
        for request in self._requests:
            request.wait()
        self._requests = []
        return self._items


class SimulatedRing:
    """W virtual positions played by this process; a shift is a rotation of Python lists."""

    def __init__(self, size: int):
        self.size = size
        self.positions = list(range(size))

    def shift(self, items: list[Item], hops: int) -> Pending:
        return Pending([items[(p - hops) % self.size] for p in self.positions])


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

    def shift(self, items: list[Item], hops: int) -> Pending:
        hops %= self.size
        if hops == 0:
            return Pending(items)
        (position,), (item,) = self.positions, items
        received = [torch.empty_like(t) for t in item]
        ops = [dist.P2POp(dist.isend, t, self._peer(position + hops), self.group) for t in item]
        ops += [dist.P2POp(dist.irecv, t, self._peer(position - hops), self.group) for t in received]
        return Pending([received], dist.batch_isend_irecv(ops))


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
