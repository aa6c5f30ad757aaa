"""The pretraining job's loop on the gloo worker pool: the real Megatron-core GPT and DeepSpeed engine, and
training data we control (an inf planted in the loss mask of chosen micro steps)."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from tests.deepspeed_jobs import megatron_groups


class PlantedInf:
    """The job's data, with inf in the loss mask of the training batches of the given micro steps."""

    def __init__(self, data, micro_steps):
        self.data, self.micro_steps = data, set(micro_steps)

    def __getattr__(self, name: str):
        return getattr(self.data, name)

    def batch(self, step: int, replica: int, micro_batch: int, replicas: int, split: int = 0) -> dict:
        b = self.data.batch(step, replica, micro_batch, replicas, split)
        if split == 0 and step in self.micro_steps:
            b["loss_mask"][0, -1] = float("inf")  # the last position is a question: it is scored
        return b


@contextmanager
def job_world(argv: list[str]):
    """Check ``argv`` as the job does, in the pool's gloo world with Megatron's groups: yields
    (args, a ``make_job`` for them on the CPU)."""
    from launch.args import parse_and_check
    from launch.job import make_job
    from ring_sp import topology

    rank = str(dist.get_rank())  # what a launcher would have set
    os.environ.update(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=str(dist.get_world_size()))
    topology.init_distributed("gloo")
    args, config = parse_and_check(argv)
    with megatron_groups(tensor=args.tensor_model_parallel_size, pipeline=args.pipeline_model_parallel_size,
                         ring=args.context_parallel_size) as mpu:
        yield args, lambda: make_job(args, config, torch.device("cpu"), mpu)


def fused_after_resume(argv: list[str], directory: str) -> list:
    """Build the job, make its AdamW groups say ``fused: None`` (as a checkpoint saved before the job's AdamW was
    fused says), save; build the job again and load: the resumed groups' ``fused`` and the optimizer's class."""
    from launch import checkpoint

    with job_world(argv) as (_, build):
        job = build()
        for group in checkpoint.base_optimizer(job.engine).param_groups:
            group["fused"] = None
        checkpoint.save(job.engine, directory, 1, job.meta)
        resumed = build()
        checkpoint.load(resumed.engine, directory, checkpoint.tag_for(1))
        base = checkpoint.base_optimizer(resumed.engine)
        return [type(base).__name__, *(group["fused"] for group in base.param_groups)]


def run_job(argv: list[str], planted: list[int]) -> dict:
    """Check ``argv`` as the job does, build its job (any pipeline size), load ``--load``, and train (launch.train.run).

    Returns {"error": None}, or the error the run ended with as launch.errors reports it: message, exit
    code, whether every rank agreed on it (a JobError; a ValueError is bad input, exit code 2)."""
    from launch import checkpoint, train
    from launch.errors import JobError

    with job_world(argv) as (args, build):
        job = build()
        job.data = PlantedInf(job.data, planted)
        try:
            start = checkpoint.load(job.engine, args.load, args.load_tag) if args.load else 0
            train.run(job, start)
        except (JobError, ValueError) as error:
            return {"error": str(error), "exit_code": getattr(error, "exit_code", 2),
                    "agreed": getattr(error, "agreed", False)}
    return {"error": None}
