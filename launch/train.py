"""The training loop: steps, progress, validation, checkpoints, the non-finite check, the final summary."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch
import torch.distributed as dist

from launch import checkpoint, quiet
from launch.job import Job, init_distributed, make_job
from launch.nonfinite import NonFiniteGuard


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS of this rank


def describe_eval(e: dict, chance: float | None) -> str:
    parts = []
    if e["acc_cross"] is not None:
        parts.append(f"fact on another rank {100 * e['acc_cross']:.1f}% ({e['answers_cross']} answers)")
    if e["acc_same"] is not None:
        parts.append(f"same rank {100 * e['acc_same']:.1f}% ({e['answers_same']})")
    if chance is not None:
        parts.append(f"chance {100 * chance:.1f}%")
    return f"validation loss {e['loss']:.4f}" + (" | recall: " + ", ".join(parts) if parts else "")


def describe_recompute(config) -> str:
    """The activation recompute the built model does, from its TransformerConfig ("" for none)."""
    n = config.recompute_num_layers
    if config.recompute_granularity == "full" and config.recompute_method == "uniform":
        return f" | recompute full (uniform: chunks of {n} layer{'s' if n > 1 else ''})"
    if config.recompute_granularity == "full":
        return f" | recompute full (block: the first {n} of {config.num_layers} layers)"
    if config.recompute_granularity == "selective":
        return f" | recompute selective ({', '.join(config.recompute_modules)})"
    return ""


def describe_selective(model) -> str:
    """" | recompute selective (mlp)" when the built model's MLPs recompute themselves (launch.recompute), with
    how many of them where the others sit in layers recomputed whole."""
    mlps = [m for m in model.modules() if getattr(type(m), "recomputed", False)]
    selective = sum(getattr(m, "recompute_self", True) for m in mlps)
    if not selective:
        return ""
    return " | recompute selective (mlp)" + (f" in {selective} of {len(mlps)} layers" if selective < len(mlps) else "")


def train(args: argparse.Namespace, config: dict) -> None:
    """Start up (process groups, model, engine), load, train, shut down; every rank."""
    device, mpu = init_distributed(args)
    job = make_job(args, config, device, mpu)
    start = checkpoint.load(job.engine, args.load, args.load_tag) if args.load else 0
    run(job, start)
    dist.barrier()
    dist.destroy_process_group()


def _like_attention(args: argparse.Namespace, device: torch.device):
    """The ring's options (causal) and empty q, k shaped like one tensor-parallel rank's attention inputs."""
    from dataclasses import replace

    from ring_sp import RingOptions

    tp = args.tensor_model_parallel_size
    head_dim = args.hidden_size // args.num_attention_heads
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    q = torch.empty(1, 1, args.num_attention_heads // tp, head_dim, device=device, dtype=dtype)
    k = torch.empty(1, 1, (args.num_query_groups or args.num_attention_heads) // tp, head_dim, device=device,
                    dtype=dtype)
    return replace(RingOptions.from_args(args), causal=True), q, k


def describe_kernel(args: argparse.Namespace, device: torch.device) -> str:
    """Which kernel computes the ring's causal blocks on this device (ring_sp.attention_kernel)."""
    from ring_sp import attention_kernel

    opts, q, k = _like_attention(args, device)
    kernel = attention_kernel(opts, q, k)
    if device.type == "cuda" and opts.backend == "auto" and "fa4" not in kernel:
        kernel += " (with `pip install ring_sp[fa4]`, FlashAttention-4 where it loads: faster on Hopper and Blackwell)"
    return kernel


def describe_documents(args: argparse.Namespace, device: torch.device) -> str:
    """How the ring computes the document masks of --reset-attention-mask on this device (ring_sp.document_plan)."""
    from ring_sp import document_plan, schedule

    opts, q, k = _like_attention(args, device)
    if document_plan(opts, q, k) == "whole":
        kernel = "one CPU kernel call per document" if device.type == "cpu" else "cuDNN's ragged attention"
        return f"blocks of several documents kept whole ({kernel})"
    hint = ("; with `pip install ring_sp[cudnn]` (cudnn-frontend) they stay whole, faster"
            if device.type == "cuda" and opts.backend == "auto" and opts.layout != "striped" else "")
    return (f"document grid {schedule.DOCUMENT_GRID}: parts of documents on it unmasked, the rest in blocks masked "
            f"by document{hint}")


def run(job: Job, start: int) -> None:
    """Train from iteration ``start + 1`` to the end: log, validate, save, stop on non-finite values."""
    args, config = job.args, job.config
    rank0 = dist.get_rank() == 0
    stop = min(args.train_iters, args.exit_interval or args.train_iters)
    if rank0:
        pp = args.pipeline_model_parallel_size
        print(f"ranks {dist.get_world_size()} = tensor {args.tensor_model_parallel_size} × "
              + (f"pipeline {pp} × " if pp > 1 else "") + f"ring {job.ring_size} × "
              f"data {job.replicas} | layout {job.layout} | ZeRO stage {job.engine.zero_optimization_stage()} | "
              f"{sum(getattr(p, 'ds_numel', p.numel()) for p in job.engine.module.parameters()) / 1e6:.2f}M "
              f"parameters per tensor-parallel rank" + (" of the first stage" if pp > 1 else "") + " | "
              f"global batch {config['train_batch_size']} × {args.seq_length} tokens"
              + (f" in {job.accum} micro batches" if pp > 1 else "")
              + describe_recompute(job.model_config) + describe_selective(job.engine.module)
              + (f" | resumed after iteration {start}" if start else "")
              + (f" | saving to {args.save}" if args.save else ""), flush=True)
        print(job.recompute_line, flush=True)
        fused = f"liger ({', '.join(job.fused)})" if job.fused else "none (Megatron-core's modules)"
        print(f"fused kernels: {fused}", flush=True)
        if args.ring_attention:
            print(f"attention kernel: {describe_kernel(args, job.device)}", flush=True)
        if args.reset_attention_mask and args.ring_attention:
            print(f"packed documents: {describe_documents(args, job.device)}", flush=True)
    guard = NonFiniteGuard(args.nan_policy, args.nan_skip_limit, args.lr, args.fp16, job.device)
    bar = None
    if rank0 and args.progress:
        from tqdm import tqdm

        bar = tqdm(total=stop, initial=start, desc="train", dynamic_ncols=True, file=sys.stdout)
        quiet.warnings_above(bar)
    say = bar.write if bar is not None else print
    tokens_per_iter = config["train_batch_size"] * args.seq_length
    train_log, eval_log = [], []
    metrics = open(args.metrics_file, "a") if rank0 and args.metrics_file else None

    def record(entry: dict) -> None:
        if metrics:
            metrics.write(json.dumps(entry) + "\n")
            metrics.flush()

    try:
        for iteration in range(start + 1, stop + 1):
            t0, lr = time.perf_counter(), job.engine.get_lr()[0]
            step = job.train_step(iteration - 1)
            dt = time.perf_counter() - t0
            entry = {"iteration": iteration, "loss": step.loss, "grad_norm": step.grad_norm, "lr": lr,
                     "tokens_per_s": tokens_per_iter / dt, "memory_mb": memory_mb(job.device)}
            train_log.append(entry)
            record({"kind": "train", **entry})
            skipped = guard.check(iteration, step.loss, step.grad_norm, step.applied, step.grads_finite)
            if bar is not None:
                bar.set_postfix(loss=f"{step.loss:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}",
                                mem=f"{entry['memory_mb']:.0f}MB", refresh=False)
                bar.update(1)
            elif rank0 and iteration % args.log_interval == 0:
                print(f"iteration {iteration}/{stop} | loss {step.loss:.6f} | {entry['tokens_per_s']:.0f} tokens/s | "
                      f"memory {entry['memory_mb']:.0f} MB", flush=True)
            if skipped and rank0:
                say(skipped)
            if iteration % args.eval_interval == 0 or iteration == stop:
                e = job.evaluate(iteration)
                eval_log.append(e)
                record({"kind": "eval", **e})
                if rank0:
                    say(f"iteration {iteration}: {describe_eval(e, job.chance)}")
            if args.save and (iteration == stop or (args.save_interval and iteration % args.save_interval == 0)):
                checkpoint.save(job.engine, args.save, iteration, job.meta)
    finally:  # an error is printed on a line of its own, not into the bar's
        if bar is not None:
            bar.close()
        if metrics:
            metrics.close()
    if rank0:
        summarize(args, job, train_log, eval_log, stop)


def summarize(args: argparse.Namespace, job: Job, train_log: list[dict], eval_log: list[dict], stop: int) -> None:
    """Rank 0, at the end: the plot and the final validation line."""
    if args.plot and train_log:
        from launch.plot import plot_run

        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot_run(args.plot, train_log, eval_log, job.chance,
                 f"GPT {args.num_layers} layers × {args.hidden_size}, seq {args.seq_length}, ring {job.ring_size} "
                 f"({job.layout}), data {job.replicas}"
                 + ("" if args.ring_reduce_col else ", local attention only (--no-ring-reduce-col)"))
        print(f"plot: {args.plot}", flush=True)
    if eval_log:
        print(f"final ({stop} iterations): {describe_eval(eval_log[-1], job.chance)}", flush=True)
        if job.chance is not None and job.ring_size > 1:
            how = ("this run attends only within each shard (--no-ring-reduce-col), so" if not args.ring_reduce_col
                   else "without ring attention (--no-ring-reduce-col)")
            print(f"An answer whose fact is on another rank needs attention across shards: {how} accuracy on those "
                  f"stays at chance, {100 * job.chance:.1f}%.", flush=True)
