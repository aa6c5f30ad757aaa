"""Jobs for the gloo worker pool that build Megatron-core's groups and a DeepSpeed engine."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d


@contextlib.contextmanager
def megatron_groups(**sizes):
    """ring_sp.topology.initialize(**sizes) for one job; afterwards the groups it made are destroyed
    (Megatron's destroy_model_parallel only forgets them: in a long-lived pool their threads pile up)."""
    from megatron.core import parallel_state as ps

    from ring_sp import topology

    before = set(c10d._world.pg_map)
    try:
        yield topology.initialize(**sizes)
    finally:
        ps.destroy_model_parallel()
        for group in set(c10d._world.pg_map) - before:
            dist.destroy_process_group(group)


def mpu_answers(tensor: int, pipeline: int, ring: int) -> dict:
    """Build the groups with ring_sp.topology.initialize and report what the mpu says on this rank."""
    with megatron_groups(tensor=tensor, pipeline=pipeline, ring=ring) as mpu:
        ranks = dist.get_process_group_ranks
        return {
            "ring": sorted(ranks(mpu.get_sequence_parallel_group())),
            "data": sorted(ranks(mpu.get_data_parallel_group())),
            "data_ring": sorted(ranks(mpu.get_sequence_data_parallel_group())),
            "tensor": sorted(ranks(mpu.get_tensor_model_parallel_group())),
            "model": sorted(ranks(mpu.get_model_parallel_group())),
            "sizes": (mpu.get_data_parallel_world_size(), mpu.get_sequence_parallel_world_size(),
                      mpu.get_sequence_data_parallel_world_size(), mpu.get_model_parallel_world_size(),
                      mpu.get_tensor_model_parallel_world_size(), mpu.get_pipeline_model_parallel_world_size()),
            "ranks": (mpu.get_data_parallel_rank(), mpu.get_sequence_parallel_rank(),
                      mpu.get_sequence_data_parallel_rank(), mpu.get_tensor_model_parallel_rank()),
        }


def zero_gradient_scaling(stage: int, ring: int, clip: float) -> list[float]:
    """One SGD step (lr 1) of a linear model under DeepSpeed ZeRO with the ring mpu.

    Each data replica holds its own sequence of 8 tokens, sharded over its ring; the loss is the
    mean over the replica's tokens of a per-token loss (ring_loss), so the update must equal the
    gradient of the mean over replicas of the full-sequence mean: computed here in float64 in one
    process; with gradient clipping at ``clip`` (0: off) the reference is scaled to that norm.
    Returns the largest difference from the reference and the reference's largest entry.
    """
    import deepspeed

    from ring_sp import split, topology

    rank = str(dist.get_rank())  # what a launcher would have set
    os.environ.update(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=str(dist.get_world_size()))
    topology.init_distributed("gloo")
    with megatron_groups(ring=ring) as mpu:
        data, pos = mpu.get_data_parallel_world_size(), mpu.get_sequence_parallel_rank()
        g = torch.Generator().manual_seed(0)
        model = torch.nn.Linear(3, 2, bias=True)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        seqs = torch.randn(data, 1, 8, 3, generator=g)  # (replica, batch, seq, features)
        mask = (torch.rand(data, 1, 8, generator=g) > 0.3).float()
        ref = _reference_update(model, seqs, mask)
        if clip:
            ref *= min(1.0, clip / ref.norm().item())
        start = [p.detach().clone() for p in model.parameters()]
        zero = {"stage": stage, **({"reduce_scatter": False} if stage == 3 else {})}
        cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": zero,
               "zero_allow_untested_optimizer": True, "gradient_clipping": clip}
        if stage == 3:
            topology.partition_for_zero3(model, mpu, cfg)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                          config=cfg, mpu=mpu)
        replica = mpu.get_data_parallel_rank()
        x = split(seqs[replica], "zigzag", ring)[pos]
        m = split(mask[replica], "zigzag", ring)[pos]
        token_losses = engine(x).pow(2).sum(-1)  # (batch, local_seq)
        loss = topology.ring_loss(token_losses, m, mpu.get_sequence_parallel_group())
        engine.backward(loss)
        engine.step()
        with deepspeed.zero.GatheredParameters(list(model.parameters())):  # whole again under ZeRO-3
            update = torch.cat([(s - p.detach()).flatten() for s, p in zip(start, model.parameters())])
        return [(update.double() - ref).abs().max().item(), ref.abs().max().item()]


def _reference_update(model: torch.nn.Module, seqs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    params = [p.detach().double().clone().requires_grad_() for p in model.parameters()]
    w, b = params
    per_token = (seqs.double() @ w.T + b).pow(2).sum(-1)  # (replica, batch, seq)
    per_replica = (per_token * mask).sum((1, 2)) / mask.sum((1, 2))
    per_replica.mean().backward()
    return torch.cat([p.grad.flatten() for p in params])
