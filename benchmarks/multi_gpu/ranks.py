"""This rank of a multi-GPU run: the process group, collectives, timing over ranks, the scaling inputs."""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from benchmarks.common import GIB, randn, sdpa_kernel


@dataclass
class Ctx:
    rank: int
    world: int
    device: torch.device
    args: argparse.Namespace

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def barrier(self) -> None:
        """All ranks here, and this rank's device idle."""
        self.sync()
        flag = torch.zeros(1, device=self.device)
        dist.all_reduce(flag)
        self.sync()

    def reduce(self, value: float, op=dist.ReduceOp.MAX) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return float(t.item())

    def gather(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def log(self, *msg) -> None:
        if self.rank == 0:
            print(*msg, flush=True)


def init(args: argparse.Namespace) -> Ctx:
    """Join the process group (torchrun's env, or a group of one when run with plain python)."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    timeout = timedelta(seconds=args.timeout)
    if use_cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, args.cpu_threads))
        dist.init_process_group("gloo", timeout=timeout)
    return Ctx(dist.get_rank(), dist.get_world_size(), device, args)


def measure(ctx: Ctx, fn: Callable[[], object], *, peak: bool = False) -> float | tuple[float, float | None]:
    """Seconds per call of ``fn`` (run on every rank at once), the slowest rank's.

    Warm-up first (cuDNN plans, Triton compilation): ``--warmup`` calls, fewer if they take more
    than ``--min-time``. Then, from a barrier, calls back to back (as in training, the host may run
    ahead of the GPU): at least two, enough for about ``--min-time`` seconds, at most
    ``--max-reps``; their mean. ``peak``: also return the peak GiB allocated during those calls
    (largest over ranks; None on CPU).
    """
    args = ctx.args
    started, last = time.perf_counter(), 0.0
    for i in range(max(1, args.warmup)):
        if i and ctx.reduce(time.perf_counter() - started) > args.min_time:
            break
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        last = time.perf_counter() - t0
    reps = max(2, min(args.max_reps, math.ceil(args.min_time / max(ctx.reduce(last), 1e-6))))
    if peak and ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    ctx.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    ctx.sync()
    seconds = ctx.reduce((time.perf_counter() - t0) / reps)
    if not peak:
        return seconds
    return seconds, ctx.reduce(torch.cuda.max_memory_allocated() / GIB) if ctx.cuda else None


def inputs(ctx: Ctx, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q, k, v, do of n tokens in the scaling shapes (bf16, batch 1), from ``seed``."""
    a = ctx.args
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    shape_q, shape_kv = (1, n, a.heads, a.head_dim), (1, n, a.kv_heads, a.head_dim)
    return tuple(randn(*s, device=ctx.device, generator=g) for s in (shape_q, shape_kv, shape_kv, shape_q))


def fwd_and_fwd_bwd(attn: Callable, q: Tensor, k: Tensor, v: Tensor, do: Tensor) -> tuple[Callable, Callable]:
    """Two steps to time: ``attn(q, k, v)`` without autograd, and forward+backward on fresh gradients."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def fwd():
        with torch.no_grad():
            attn(q, k, v)

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        attn(*leaves).backward(do)

    return fwd, fwd_bwd


def causal_sdpa(ctx: Ctx, q: Tensor, k: Tensor, v: Tensor, kernel: str = "cudnn") -> Tensor:
    """One GPU, no communication: causal SDPA on (batch, heads, seq, head_dim) tensors.

    cuDNN is what backend auto uses for plain blocks on GPUs, and the fastest on H100 (see
    benchmarks/results/h100-2026-11-24); on CPU PyTorch picks.
    """
    with sdpa_kernel(kernel if ctx.cuda else "default"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
