"""The training job's pieces: process groups, the Megatron-core GPT, AdamW and its schedule, the DeepSpeed engine.

:class:`Job` holds what a training step needs and does one (``train_step``) or an evaluation
(``evaluate``); ``launch/train.py`` drives it.
"""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

from launch import data, recompute
from launch.args import run_meta, uses_gpu
from launch.model import build_model, fused_kernels, padded_vocab, transformer_config
from ring_sp import topology
from ring_sp.topology import ring_loss


def init_distributed(args) -> tuple[torch.device, object]:
    """Process group (gloo on CPU, NCCL on GPU) and Megatron-core's groups; returns (device, mpu)."""
    if "RANK" not in os.environ:  # plain `python launch/pretrain_gpt.py`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank or 0))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    gpu = uses_gpu(args)
    device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    else:  # share the cores among this node's ranks instead of oversubscribing them
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    timeout = timedelta(minutes=args.distributed_timeout_minutes)
    topology.init_distributed(args.distributed_backend or ("nccl" if gpu else "gloo"), timeout)
    mpu = topology.initialize(tensor=args.tensor_model_parallel_size, pipeline=args.pipeline_model_parallel_size,
                              ring=args.context_parallel_size, timeout=timeout)
    return device, mpu


def cpu_recompute_rng() -> None:
    """Let Megatron-core's activation recompute run on CPU.

    ``megatron.core.tensor_parallel.checkpoint`` saves the CPU and the CUDA RNG state before a
    checkpointed forward and restores both for its recompute, so that dropout draws the same
    masks again; the CUDA half calls torch.cuda unconditionally ("Torch not compiled with CUDA
    enabled" on a CPU-only torch; megatron's model_parallel_cuda_manual_seed fails the same way).
    On CPU only the CPU generator draws, and megatron saves and restores that one itself: the
    CUDA half becomes a no-op. Process-wide; call it only when the job's device is the CPU."""
    from megatron.core.tensor_parallel import random as megatron_random

    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: None
    megatron_random._set_cuda_rng_state = lambda *args, **kwargs: None


def build_optimizer(args, model):
    """AdamW (no decay on biases and norms) and a warmup + decay schedule stepped once per iteration.

    AdamW is PyTorch's fused one (one kernel per step on CUDA and on the CPU), not its default for-each form,
    which runs about ten passes over the float32 states: 24 ms of a 1.3 s step of the 1B model on an H200."""
    def matrix(p) -> bool:  # ZeRO-3 leaves an empty p.data and keeps the shape in ds_shape
        return len(getattr(p, "ds_shape", p.shape)) > 1

    decay = [p for p in model.parameters() if p.requires_grad and matrix(p)]
    rest = [p for p in model.parameters() if p.requires_grad and not matrix(p)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=args.lr,
                                  betas=(args.adam_beta1, args.adam_beta2), fused=True)

    def factor(step: int) -> float:  # step = iterations done; Megatron's schedule: the first iteration runs at 0
        if step < args.lr_warmup_iters:
            return step / args.lr_warmup_iters
        progress = min(1.0, (step - args.lr_warmup_iters) / max(1, args.train_iters - args.lr_warmup_iters))
        shape = {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}
        low = args.min_lr / args.lr
        return low + (1.0 - low) * shape[args.lr_decay_style]

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; from pinned memory onto a GPU, so that the copy does not wait for the GPU's queue
    (a copy from pageable memory synchronises the stream first)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class Step(NamedTuple):
    """What one optimizer step gave: the loss over the global batch, DeepSpeed's gradient norm (None
    without ZeRO, bf16 or fp16), whether the gradients the job checked itself were finite, and whether
    the optimizer applied the step (DeepSpeed drops one with non-finite gradients)."""

    loss: float
    grad_norm: float | None
    grads_finite: bool
    applied: bool


class Job:
    """The pieces a training step needs: engine, groups, data, and how to shard a batch."""

    def __init__(self, args, config, device, mpu):
        self.args, self.config, self.device, self.mpu = args, config, device, mpu
        self.rank = dist.get_rank()
        self.ring_group = mpu.get_sequence_parallel_group()
        self.ring_size, self.ring_rank = mpu.get_sequence_parallel_world_size(), mpu.get_sequence_parallel_rank()
        self.zero_group = mpu.get_sequence_data_parallel_group()
        self.replicas, self.replica = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
        self.accum = config["gradient_accumulation_steps"]
        self.layout = args.ring_layout if args.ring_attention else "contiguous"
        if args.data_path:
            self.data = data.IndexedTokens(args.data_path, args.seq_length, args.vocab_size)
            self.chance = None
        else:
            self.data = data.RecallTask(args.seq_length, args.recall_keys, args.recall_values, seed=args.seed,
                                        documents=args.recall_documents)
            self.chance = self.data.chance
        if args.vocab_size and args.vocab_size < self.data.vocab_size:
            raise ValueError(f"--vocab-size {args.vocab_size}: the recall task needs {self.data.vocab_size} tokens; "
                             "give at least that many, or leave it out")
        # the recall task in a larger vocabulary: its FLOPs
        vocab = padded_vocab(max(self.data.vocab_size, args.vocab_size or 0), args.tensor_model_parallel_size)
        stage = config.get("zero_optimization", {}).get("stage", 0)
        # ZeRO-3 gathers a module's weights when its forward runs: the fused loss never runs the output layer's.
        # Pipeline stages compute their loss in their own head (launch.gpt_pipe): liger's layers, not its loss.
        self.fused_loss = stage != 3
        pipeline = args.pipeline_model_parallel_size > 1
        fused = (("swiglu",) if pipeline else ("swiglu", "cross_entropy")) if args.fused_kernels == "liger" else ()
        shape = recompute.Shape.from_args(args, vocab, stage, dist.get_world_size(self.zero_group), fused=fused)
        self.recompute_line = recompute.resolve(args, shape, device)  # every rank alike, before the model
        if args.recompute_granularity and device.type == "cpu":
            cpu_recompute_rng()
        self.model_config = transformer_config(args)
        torch.manual_seed(args.seed)
        self.engine = self.build_engine(vocab)
        self.fused = fused_kernels(args, self.engine.module)
        self.meta = run_meta(args, dist.get_world_size())

    def build_engine(self, vocab_size: int):
        """The GPTModel in a DeepSpeed engine (one pipeline stage)."""
        import deepspeed

        model = build_model(self.args, vocab_size, self.fused_loss)
        if self.config.get("zero_optimization", {}).get("stage", 0) == 3:
            topology.partition_for_zero3(model, self.mpu, self.config)  # over data × ring, not data alone
        optimizer, scheduler = build_optimizer(self.args, model)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                          config=self.config, mpu=self.mpu)
        # DeepSpeed wraps the optimizer (ZeRO, bf16, fp16) and checks the gradients, or hands it them unchecked
        self.unchecked_gradients = engine.optimizer is optimizer
        return engine

    def batch(self, micro_step: int, split: int = 0) -> dict[str, torch.Tensor]:
        """This rank's shard of its replica's micro batch number ``micro_step`` (global count); with
        --reset-attention-mask its ``attention_mask`` is the document mask (kept on the CPU)."""
        from megatron_patch import reset_position_ids, shard_batch

        args = self.args
        full = self.data.batch(micro_step, self.replica, args.micro_batch_size, self.replicas, split)
        documents = full.pop("documents")
        if args.reset_position_ids:
            full["position_ids"] = reset_position_ids(documents, args.seq_length)
        if args.eod_mask_loss:
            full["loss_mask"] = full["loss_mask"] * data.not_last_of_documents(documents, args.seq_length)
        local = shard_batch(full, self.layout, self.ring_group,
                            documents=documents if args.reset_attention_mask else None)
        return {k: v if k == "attention_mask" else to_device(v, self.device) for k, v in local.items()}

    def sum_over_replicas(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        """Sum float64 values over data × ring (tensor-parallel ranks hold copies, so not over them)."""
        t = torch.as_tensor(values, dtype=torch.float64, device=self.device).clone()
        dist.all_reduce(t, group=self.zero_group)
        return t

    def train_step(self, iteration: int) -> Step:
        """One optimizer step (all micro batches)."""
        args, engine = self.args, self.engine
        torch.manual_seed(hash((args.seed, iteration, self.rank)) % 2**31)  # resumable: no RNG state to save
        engine.train()
        total, grads_finite = torch.zeros((), dtype=torch.float64, device=self.device), True
        for m in range(self.accum):
            b = self.batch(iteration * self.accum + m)
            per_token = engine(b["tokens"], b["position_ids"], b.get("attention_mask"),
                               labels=b["labels"])  # (batch, local_seq)
            loss = ring_loss(per_token, b["loss_mask"], self.ring_group)
            total += loss.detach()
            # a non-finite loss makes every gradient NaN, so that the optimizer's own check drops the step;
            # decided on the device: reading the loss here would stall the host between forward and backward
            loss = loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
            engine.backward(loss)
            if m == self.accum - 1 and self.unchecked_gradients:  # ZeRO 0, fp32: the full gradients are here
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                grads_finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
            engine.step()
        norm = engine.get_global_grad_norm()
        return Step(loss=self.sum_over_replicas(total / self.accum).item() / self.replicas,
                    grad_norm=None if norm is None else float(norm), grads_finite=grads_finite,
                    applied=engine.was_step_applied())

    def full_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """(batch, seq, vocab / tensor) shards of the tensor-parallel ranks → (batch, seq, vocab).

        Megatron's own gather allocates on CUDA, so this one is plain all_gather (gloo or NCCL)."""
        group = self.mpu.get_tensor_model_parallel_group()
        if dist.get_world_size(group) == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, logits.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def evaluate(self, iteration: int) -> dict:
        """Validation loss on scored tokens and, for the recall task, same- and cross-shard accuracy."""
        self.engine.eval()
        sums = torch.zeros(6, dtype=torch.float64)
        for i in range(self.args.eval_iters):
            b = self.batch(i, split=1)
            logits = self.full_vocab(self.engine(b["tokens"], b["position_ids"], b.get("attention_mask")).float())
            token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(),
                                                           reduction="none").view_as(b["labels"])
            sums[0] += (token_loss * b["loss_mask"]).sum().item()
            sums[1] += b["loss_mask"].sum().item()
            if "answer_source" in b:
                cross = data.shard_sources(b["answer_source"].cpu(), self.layout, self.ring_rank, self.ring_size)
                sums[2:] += data.recall_accuracy(logits.argmax(-1).cpu(), b["labels"].cpu(), cross)
        return self.eval_result(iteration, self.sum_over_replicas(sums.tolist()).cpu())

    @staticmethod
    def eval_result(iteration: int, s: torch.Tensor) -> dict:
        """The validation entry from the sums over every replica: scored loss, scored tokens, then
        launch.data.recall_accuracy's counts (correct same-shard, same-shard, correct cross-shard, cross-shard)."""
        out = {"iteration": iteration, "loss": (s[0] / s[1]).item(), "acc_same": None, "acc_cross": None,
               "answers_same": int(s[3]), "answers_cross": int(s[5])}
        if s[3] > 0:
            out["acc_same"] = (s[2] / s[3]).item()
        if s[5] > 0:
            out["acc_cross"] = (s[4] / s[5]).item()
        return out


def make_job(args, config, device, mpu) -> Job:
    """The job for the flags: a Job, or with --pipeline-model-parallel-size > 1 a PipelineJob."""
    if args.pipeline_model_parallel_size > 1:
        from launch.pipeline_job import PipelineJob

        return PipelineJob(args, config, device, mpu)
    return Job(args, config, device, mpu)
