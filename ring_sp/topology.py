"""Ring groups inside the tensor / pipeline / data topology, shared by DeepSpeed and Megatron-core.

Ranks are laid out on a grid with axes ``pipe × data × ring × model`` (the order of DeepSpeed's
``ProcessTopology``, last axis fastest):

    rank = model + ring·TP + data·TP·RING + pipe·TP·RING·DP

which is Megatron-core's default order ``tp-cp-ep-dp-pp`` (first axis fastest) with the ring as
its context-parallel axis. So the groups ``parallel_state.initialize_model_parallel`` builds are
exactly this grid's: one set of process groups serves Megatron (tensor parallelism, the
context-parallel group the ring attention runs over, pipeline stages) and DeepSpeed (ZeRO over
data × ring, its pipeline engine's stages).

Placement. Tensor-parallel ranks are consecutive and the ring comes next, so a ring is
``RING`` ranks at stride ``TP`` inside a block of ``TP·RING`` consecutive ranks. Launchers number
ranks node by node (``deepspeed --hostfile``, ``torchrun --nnodes``), hence a ring stays inside
one node whenever ``TP·RING`` divides the GPUs per node; the traffic that crosses nodes is then
ZeRO's gradient reduction over data and the pipeline's sends between stages. Example, 2 nodes ×
8 GPUs, TP 2, ring 4, data 2: rings are {0,2,4,6}, {1,3,5,7} on node 0 and {8,10,12,14},
{9,11,13,15} on node 1; data groups {0,8}, {1,9}, …

:class:`RingMPU` is the ``mpu`` object ``deepspeed.initialize(..., mpu=...)`` takes: data,
model (tensor × pipeline), tensor, pipeline, sequence (the ring) and sequence × data getters.
With it DeepSpeed reduces gradients over data × ring and divides by the data size only, so each
rank's loss must be its share of its ring's loss: (sum over its tokens) / (tokens of the whole
ring sequence). :func:`ring_loss` does that.

DeepSpeed is imported only by the functions that use it (it is an optional extra):
``RingTopology`` and ``ring_loss`` are plain index maths and PyTorch.
"""

from __future__ import annotations

from collections import namedtuple
from datetime import timedelta
from itertools import product

import torch
import torch.distributed as dist

AXES = ("pipe", "data", "ring", "model")
# Megatron-core's RankGenerator token for each of our axes.
MEGATRON_TOKEN = {"pipe": "pp", "data": "dp", "ring": "cp", "model": "tp"}
Coord = namedtuple("Coord", AXES)


class RingTopology:
    """The grid pipe × data × ring × model (model fastest), laid out as DeepSpeed's ``ProcessTopology``.

    ``data`` is whatever is left: world_size // (tensor · pipeline · ring). :meth:`process_topology`
    gives DeepSpeed's own object (what its ``PipelineModule`` takes).
    """

    def __init__(self, world_size: int, *, tensor: int = 1, pipeline: int = 1, ring: int = 1):
        for name, size in (("world_size", world_size), ("tensor", tensor), ("pipeline", pipeline), ("ring", ring)):
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"{name}={size!r} must be a positive integer")
        model = tensor * pipeline * ring
        if world_size % model:
            raise ValueError(
                f"tensor ({tensor}) × pipeline ({pipeline}) × ring ({ring}) = {model} does not divide the "
                f"world of {world_size} ranks: choose sizes whose product divides {world_size}"
            )
        self.tensor, self.pipeline, self.ring, self.data = tensor, pipeline, ring, world_size // model
        self.world_size = world_size
        self.dims = (pipeline, self.data, ring, tensor)

    def get_dim(self, axis: str) -> int:
        return self.dims[self._axis(axis)]

    def get_coord(self, rank: int) -> Coord:
        """The coordinates of ``rank`` (``.pipe``, ``.data``, ``.ring``, ``.model``)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is not in the world of {self.world_size} ranks")
        coord = []
        for size in reversed(self.dims):
            rank, c = divmod(rank, size)
            coord.append(c)
        return Coord(*reversed(coord))

    def get_rank(self, **coord: int) -> int:
        """The rank at the given coordinates (all four axes)."""
        rank = 0
        for axis, size in zip(AXES, self.dims):
            rank = rank * size + coord[axis]
        return rank

    def groups(self, *axes: str) -> list[list[int]]:
        """Rank lists that vary along ``axes`` together (all other coordinates fixed), sorted.

        ``groups("ring")`` are the rings; ``groups("data", "ring")`` the ZeRO groups.
        """
        for a in axes:
            self._axis(a)
        out = []
        for fixed in product(*(range(self.get_dim(a)) for a in AXES if a not in axes)):
            match = dict(zip([a for a in AXES if a not in axes], fixed))
            varying = product(*(range(self.get_dim(a)) for a in axes))
            out.append(sorted(self.get_rank(**match, **dict(zip(axes, v))) for v in varying))
        return sorted(out)

    def group_of(self, rank: int, *axes: str) -> list[int]:
        """The ranks of ``rank``'s group along ``axes``."""
        return next(g for g in self.groups(*axes) if rank in g)

    def ring_nodes(self, gpus_per_node: int) -> list[list[int]]:
        """For each ring, the node indices its ranks live on (ranks numbered node by node)."""
        return [sorted({r // gpus_per_node for r in ring}) for ring in self.groups("ring")]

    def process_topology(self):
        """DeepSpeed's ``ProcessTopology`` with the same axes and sizes (imports DeepSpeed)."""
        from deepspeed.runtime.pipe.topology import ProcessTopology

        return ProcessTopology(axes=list(AXES), dims=list(self.dims))

    def _axis(self, axis: str) -> int:
        if axis not in AXES:
            raise ValueError(f"axis {axis!r} is unknown: use {', '.join(AXES)}")
        return AXES.index(axis)

    def __str__(self) -> str:
        return (f"RingTopology(world_size={self.world_size}, pipe={self.pipeline}, data={self.data}, "
                f"ring={self.ring}, model={self.tensor})")


def megatron_groups(world_size: int, *, tensor: int = 1, pipeline: int = 1, ring: int = 1,
                    axes: tuple[str, ...] = ("ring",)) -> list[list[int]]:
    """The rank lists Megatron-core's ``initialize_model_parallel`` builds for ``axes``, sorted.

    Computed by Megatron's own ``RankGenerator`` (default order ``tp-cp-ep-dp-pp``), without
    creating any process group: lets the placement be checked for any world size.
    """
    from megatron.core.parallel_state import RankGenerator

    data = world_size // (tensor * pipeline * ring)
    gen = RankGenerator(tp=tensor, ep=1, dp=data, pp=pipeline, cp=ring, order="tp-cp-ep-dp-pp")
    token = "-".join(MEGATRON_TOKEN[a] for a in axes)
    return sorted(sorted(g) for g in gen.get_ranks(token))


def _ranks(group) -> list[int]:
    return dist.get_process_group_ranks(group)


class RingMPU:
    """The ``mpu`` DeepSpeed asks about parallel groups; answers from Megatron-core's ``parallel_state``.

    ``model`` = tensor × pipeline (what DeepSpeed sums gradient norms over and names checkpoint
    files by), ``sequence`` = the ring (Megatron's context-parallel group), ``sequence_data`` =
    data × ring (ZeRO's reduction and partition group).
    """

    def __init__(self, topology: RingTopology):
        from megatron.core import parallel_state as ps

        self.topology = topology
        self._ps = ps

    # data: replicas holding different samples
    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return _ranks(self.get_data_parallel_group())

    # model: tensor × pipeline
    def get_model_parallel_group(self):
        return self._ps.get_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.get_model_parallel_group())

    # tensor
    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    # pipeline (DeepSpeed's pipeline engine asks for the "pipe" spelling)
    def get_pipeline_model_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()

    get_pipe_parallel_group = get_pipeline_model_parallel_group

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._ps.get_pipeline_model_parallel_rank()

    # sequence: the ring
    def get_sequence_parallel_group(self):
        return self._ps.get_context_parallel_group()

    def get_sequence_parallel_world_size(self) -> int:
        return self._ps.get_context_parallel_world_size()

    def get_sequence_parallel_rank(self) -> int:
        return self._ps.get_context_parallel_rank()

    # sequence × data: ZeRO's group
    def get_sequence_data_parallel_group(self):
        return self._ps.get_data_parallel_group(with_context_parallel=True)

    def get_sequence_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_sequence_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank(with_context_parallel=True)


def init_distributed(backend: str | None = None, timeout: timedelta | None = None) -> None:
    """``deepspeed.init_distributed`` (NCCL with GPUs, gloo on CPU), or adopt an existing default group.

    On CPU, DeepSpeed would JIT-compile its shared-memory all-reduce on first use (minutes on a
    fresh machine) although only its inference all-reduce uses it: it is marked unavailable first.
    """
    import deepspeed
    import deepspeed.ops

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "gloo":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # DeepSpeed keeps edits to this dict
    kwargs = {} if timeout is None else {"timeout": timeout}
    deepspeed.init_distributed(dist_backend=backend, **kwargs)


def initialize(*, tensor: int = 1, pipeline: int = 1, ring: int = 1,
               timeout: timedelta | None = None) -> RingMPU:
    """Build Megatron-core's groups for (tensor, pipeline, ring) and return the matching ``RingMPU``.

    Needs ``torch.distributed`` initialised. Checks, on this rank, that every group Megatron
    built is the one :class:`RingTopology` places it in (so DeepSpeed and Megatron agree).
    """
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialized: call deepspeed.init_distributed() first")
    topo = RingTopology(dist.get_world_size(), tensor=tensor, pipeline=pipeline, ring=ring)
    kwargs = {} if timeout is None else {"distributed_timeout_minutes": timeout.total_seconds() / 60}
    ps.initialize_model_parallel(tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
                                 context_parallel_size=ring, create_gloo_process_groups=False, **kwargs)
    mpu = RingMPU(topo)
    rank = dist.get_rank()
    built = {
        ("model",): mpu.get_tensor_model_parallel_group(),
        ("ring",): mpu.get_sequence_parallel_group(),
        ("data",): mpu.get_data_parallel_group(),
        ("data", "ring"): mpu.get_sequence_data_parallel_group(),
        ("pipe",): mpu.get_pipeline_model_parallel_group(),
        ("pipe", "model"): mpu.get_model_parallel_group(),
    }
    for axes, group in built.items():
        if sorted(_ranks(group)) != topo.group_of(rank, *axes):
            raise RuntimeError(f"Megatron-core's {'×'.join(axes)} group {_ranks(group)} for rank {rank} is not "
                               f"{topo.group_of(rank, *axes)} as {topo} places it: the rank order changed")
    return mpu


def partition_for_zero3(module: torch.nn.Module, mpu: RingMPU, config: dict) -> None:
    """Partition ``module``'s parameters for ZeRO-3 over data × ring, in place, before ``deepspeed.initialize``.

    Left to itself DeepSpeed (0.19.8) partitions them over ``mpu.get_data_parallel_group()`` (data
    only) while its optimizer reduces over data × ring, and the ranks of a ring drift apart. The
    config must also say ``"reduce_scatter": false``: DeepSpeed's reduce-scatter path averages over
    data × ring, its all-reduce path (the one taken then) sums the ring and averages the data.
    """
    import deepspeed

    if config.get("zero_optimization", {}).get("reduce_scatter", True) and mpu.get_sequence_parallel_world_size() > 1:
        raise ValueError('ZeRO-3 with a ring needs "zero_optimization": {"reduce_scatter": false}: DeepSpeed\'s '
                         "reduce-scatter path averages gradients over the ring instead of summing them")
    deepspeed.zero.Init(module=module, data_parallel_group=mpu.get_sequence_data_parallel_group(),
                        config_dict_or_path=config, mpu=mpu)


def ring_loss(token_losses: torch.Tensor, loss_mask: torch.Tensor, ring_group=None) -> torch.Tensor:
    """This rank's share of its ring's mean loss: sum(local losses · mask) / (mask summed over the ring).

    token_losses, loss_mask: (batch, local_seq). Summed over the ring (as DeepSpeed's gradient
    reduction over sequence × data does) the shares give the mean over the whole sequence. The
    token count is all-reduced without gradient.
    """
    mask = loss_mask.to(token_losses.dtype)
    count = mask.sum().detach().clone()
    if ring_group is not None and dist.get_world_size(ring_group) > 1:
        dist.all_reduce(count, group=ring_group)
    return (token_losses * mask).sum() / count.clamp(min=1)
