"""Ring attention over a real process group: correctness, scaling beside PyTorch's context parallel,
and peak memory per GPU. One process per GPU (NCCL), or per CPU rank (gloo, tiny sizes):

    torchrun --nproc-per-node 8 benchmarks/multi_gpu_ring.py --out benchmarks/results/h200x8
    torchrun --nproc-per-node 8 benchmarks/multi_gpu_ring.py --parts scaling --tokens 131072 --out ...
    torchrun --nproc-per-node 2 benchmarks/multi_gpu_ring.py --out /tmp/mg      # CPU: gloo, tiny sizes

Each part (``--parts``, default all) writes ``<part>.json`` and ``<part>.md`` under ``--out``;
``results.md`` (and ``results.png`` if matplotlib is there) collect the parts found there, so the
parts can run as separate commands into one folder. Scaling rows of a later run replace those of
the same world size, tokens and variant and keep the others. Exit status: 0 all good, 1 a wrong
result (correctness failure, or PyTorch's context parallel disagreeing with the ring).

correctness
    Every layout (contiguous, striped, zigzag) × causal / full × GQA / MHA × key mask × sliding
    window × sub-rings (every ``ring_size`` dividing W) × ``ring_reduce_col=False``, for each
    ``--dtypes`` and ``--backends``. Each rank builds the same full random inputs from a seed (one
    sequence per sub-ring), keeps its shard (``ring_sp.split``), runs ``ring_sp.ring_attention``
    forward and backward over the group and compares its shard of out, dq, dk, dv with a float64
    dense attention over its ring's full sequence (relative Frobenius error). Bound, per tensor and
    rank: max(F, 2 × the error of PyTorch's ``F.scaled_dot_product_attention`` computed in the same
    dtype on the same device over the full sequence, on the same shard), F = 1e-10 (float64),
    1e-5 (float32), 0 (bf16, fp16).

scaling
    bf16, causal, batch 1, 32 query / 8 KV heads, head_dim 128 (``--heads/--kv-heads/--head-dim``),
    n = 8k, 32k, 128k tokens per GPU (``--tokens``), W = world size, S = W·n tokens in all.
    Variants: our ring (``--layouts`` zigzag, striped; backend auto) and PyTorch's
    ``context_parallel`` (head-tail load balance, which is the zigzag split; ``--cp-rotate``
    allgather, alltoall; cuDNN SDPA, else the next of ``--cp-kernels`` that runs) on the same
    shards, its output checked against the ring's. Forward and forward+backward; the time of a
    variant is the slowest rank's mean over calls run back to back after warm-up (``measure``).

    - per-GPU work: causal attention over S tokens is 4·h·d·S²/2 FLOPs forward (×3.5 with the
      backward); each GPU does 1/W of it, which equals W × the work of causal attention over its own
      n tokens. TFLOP/s per GPU = that work ÷ time.
    - ``÷1 GPU`` = t1 / t with t1 = W × (time of cuDNN causal SDPA over n tokens, same heads, on one
      GPU alone, no communication; all GPUs measure it at once, slowest taken): the fraction of the
      single-GPU throughput each GPU keeps (1.00 = perfect scaling; this is ring-flash-attn's
      "theoretic flash_attn" baseline). The ring computes mostly full blocks, which run a little
      faster than a causal n × n block, so values slightly above 1 are possible at small n.
    - ``÷mono`` (only when S ≤ ``--mono-max``) = (time of one GPU running cuDNN causal SDPA over the
      whole S tokens) / W / t: strict strong scaling.
    - communication hidden (ring only): t_on is the ring as users call it; t_off is the same call
      with every ring transfer replaced by a local copy of the block (``ring_attention(...,
      transport=NoCommRing(...))``, benchmarks/multi_gpu/scaling.py; the per-call agreement
      all_gather stays); t_comm is the same sequence of transfers with no compute (recorded from a
      real call, replayed through ``DistributedRing``). hidden = 1 − clamp((t_on − t_off) / t_comm, 0, 1).
    - peak GiB: ``torch.cuda.max_memory_allocated`` during one forward+backward, inputs included,
      largest over ranks.

memory
    One attention layer forward+backward (ring zigzag, the scaling shapes): n = ``--mem-start``
    tokens per GPU, doubled until it does not fit, the time budget (``--mem-budget-s``, the next
    step predicted at 4× the last) or ``--mem-max`` stops it; peak GiB per GPU for each n. W = 1:
    the failing size is tried and its ``torch.cuda.OutOfMemoryError`` caught. W > 1: a rank that
    runs out of memory mid-ring would leave its peers waiting, so a size is tried only if every rank
    can first allocate its predicted peak (a linear fit of the measured peak reserved memory, +10%);
    a size that fails this check is reported as not fitting, not tried. The same fit extrapolates
    the longest n that fits in the memory PyTorch can use (marked as extrapolated).
    ``--mem-fraction`` caps the memory per GPU, to reach the limit quickly in a test.

Sizes: on CPU, or with ``--dry-run``, every default is tiny. NVLink multicast stays off
(NCCL_NVLS_ENABLE=0). The parts live in benchmarks/multi_gpu/ (one module each).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import plots  # noqa: E402
from benchmarks.common import command_line, env_line, environment, load_json, write_results  # noqa: E402
from benchmarks.multi_gpu import correctness, memory, scaling  # noqa: E402
from benchmarks.multi_gpu.ranks import init  # noqa: E402

PARTS = ("correctness", "scaling", "memory")
MARKDOWN = {"correctness": correctness.markdown, "scaling": scaling.markdown, "memory": memory.markdown}


def write_part(out: str, part: str, data: dict, run: dict) -> None:
    """``<part>.json`` and ``<part>.md`` under ``out``, the runs that made them listed at the end."""
    if part == "scaling":  # keep rows of earlier runs (same world size and GPU) that this run did not redo
        old = load_json(os.path.join(out, "scaling.json"))
        if old and old.get("shapes") == data["shapes"] and old["runs"][-1]["environment"].get("gpu") == \
                run["environment"].get("gpu"):
            done = {(r["world"], r["tokens"], r["variant"]) for r in data["rows"]}
            kept = [r for r in old["rows"] if (r["world"], r["tokens"], r["variant"]) not in done]
            data["rows"] = kept + data["rows"]
            data["runs"] = old["runs"] + [run]
    data.setdefault("runs", [run])
    runs = "\n".join(f"- `{r['command']}` — {env_line(r['environment'])}" + (
        " — **tiny sizes (dry run or CPU): the timings say nothing about performance**" if r.get("tiny") else "")
        for r in data["runs"])
    write_results(out, MARKDOWN[part](data) + "\nRuns:\n" + runs + "\n", data, name=part)


def write_summary(out: str, with_plot: bool = True) -> None:
    """``results.md``: the parts found in ``out``; ``results.png`` if matplotlib is there."""
    text = "# Ring attention over several GPUs (issue 6)\n\nWritten by `benchmarks/multi_gpu_ring.py`; see its " \
           "docstring for every definition.\n\n"
    for p in PARTS:
        if os.path.exists(os.path.join(out, f"{p}.md")):
            with open(os.path.join(out, f"{p}.md")) as f:
                text += f.read() + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    if with_plot:
        with contextlib.suppress(ImportError):  # no matplotlib: no plot
            plot(out)


def _tokens(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.3g}M"
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _memory_panel(ax, data: dict) -> None:
    rows = [r for r in data["rows"] if r.get("peak_gib") is not None]
    ax.plot([r["tokens"] for r in rows], [r["peak_gib"] for r in rows], "o-", label="peak allocated")
    ax.plot([r["tokens"] for r in rows], [r["reserved_gib"] for r in rows], "s-", label="peak reserved")
    if data.get("capacity_gib"):
        ax.axhline(data["capacity_gib"], color="k", ls=":", lw=0.8, label="GPU memory")
    if data.get("fit_gib"):
        fit, top = data["fit_gib"], data["extrapolated_max_tokens"]
        lo, hi = rows[-1]["tokens"], max(top, rows[-1]["tokens"])
        xs = [lo * (hi / lo) ** (i / 32) for i in range(33)]
        ax.plot(xs, [fit["a"] + fit["b_per_token"] * x for x in xs], "--", color="gray",
                label=f"linear extrapolation (limit ~{_tokens(top)})")
    plots.label(ax, xlabel="tokens per GPU", ylabel="peak GiB per GPU", log2=True, legend_size=7,
                title=f"ring zigzag, one layer fwd+bwd, W = {data['world']}")


def _scaling_panel(ax, data: dict, panel: str) -> None:
    rows = [r for r in data["rows"] if f"{panel}_vs_1gpu" in r and not r["variant"].startswith("1 GPU")]
    keys = sorted({(r["world"], r["tokens"]) for r in rows})
    plots.grouped_bars(ax, [f"W={w}\n{_tokens(t)}/GPU" for w, t in keys], {
        var: [next((r[f"{panel}_vs_1gpu"] for r in rows if (r["world"], r["tokens"]) == key and r["variant"] == var),
                   0) for key in keys] for var in dict.fromkeys(r["variant"] for r in rows)})
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.95, color="k", lw=0.8, ls=":")
    plots.label(ax, ylabel="throughput per GPU ÷ one GPU alone", legend_size=7,
                title=f"causal {'forward' if panel == 'fwd' else 'forward+backward'}")


def plot(out: str) -> None:
    """``results.png``: forward and forward+backward ÷1 GPU per variant, and peak memory per size."""
    scaling_data, memory_data = (load_json(os.path.join(out, f"{p}.json")) for p in ("scaling", "memory"))
    has_peaks = bool(memory_data and any(r.get("peak_gib") is not None for r in memory_data["rows"]))
    panels = [p for p in (scaling_data and "fwd", scaling_data and "fwd_bwd", has_peaks and "memory") if p]
    if not panels:
        return
    fig, axes = plots.figure(len(panels), (6.5 * len(panels), 4.5))
    for ax, panel in zip(axes, panels):
        if panel == "memory":
            _memory_panel(ax, memory_data)
        else:
            _scaling_panel(ax, scaling_data, panel)
    plots.save(fig, os.path.join(out, "results.png"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of: " + ", ".join(PARTS))
    p.add_argument("--out", default="benchmarks/results/multi_gpu_latest")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes everywhere (always so on CPU)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="process-group timeout, seconds")
    p.add_argument("--cpu-threads", type=int, default=1)
    g = p.add_argument_group("correctness (defaults: GPU | tiny)")
    g.add_argument("--dtypes", help="bfloat16 | float64,float32,bfloat16 on CPU")
    g.add_argument("--backends", default="auto", help="ring backends to check, e.g. auto,triton,sdpa")
    g.add_argument("--check-local", type=int, help="tokens per rank: 256 | 8")
    g.add_argument("--check-batch", type=int, help="1 | 2")
    g.add_argument("--check-heads", type=int, help="8 | 4")
    g.add_argument("--check-kv-heads", type=int, help="GQA variant's KV heads: 2")
    g.add_argument("--check-head-dim", type=int, help="128 | 8")
    g.add_argument("--check-window", type=int, help="sliding window in tokens: 1.5 × check-local + 1")
    g.add_argument("--check-bucket", type=int, default=4, help="torch backend tile (CPU)")
    g.add_argument("--perturb", type=float, default=0.0, help="negative control: scale the last rank's dq by "
                   "1 + PERTURB before comparing; the check must then fail")
    g = p.add_argument_group("scaling and memory (defaults: GPU | tiny)")
    g.add_argument("--tokens", help="tokens per GPU: 8192,32768,131072 | 64,128")
    g.add_argument("--heads", type=int, help="32 | 4")
    g.add_argument("--kv-heads", type=int, help="8 | 2")
    g.add_argument("--head-dim", type=int, help="128 | 16")
    g.add_argument("--layouts", default="zigzag,striped")
    g.add_argument("--cp-rotate", default="allgather,alltoall", help="PyTorch context_parallel rotate methods ('' "
                   "to skip)")
    g.add_argument("--cp-kernels", default="cudnn,flash,default", help="SDPA kernels for context_parallel, "
                   "first that runs")
    g.add_argument("--cp-tolerance", type=float, default=0.02, help="largest rel diff of CP's output vs the ring's")
    g.add_argument("--mono-max", type=int, help="largest S for the monolithic one-GPU column: 65536 | 512")
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--min-time", type=float, help="seconds of timed calls per measurement: 1.0 | 0.05")
    g.add_argument("--max-reps", type=int, default=20)
    g.add_argument("--mem-start", type=int, help="first tokens/GPU: 8192 | 64")
    g.add_argument("--mem-max", type=int, help="largest tokens/GPU tried: 2**24 | 256")
    g.add_argument("--mem-budget-s", type=float, default=240, help="seconds for the memory part")
    g.add_argument("--mem-fraction", type=float, default=1.0, help="cap on the memory per GPU (tests)")
    args = p.parse_args(argv)
    bad = set(args.parts.split(",")) - set(PARTS)
    if bad:
        p.error(f"--parts: unknown {', '.join(sorted(bad))}; use {', '.join(PARTS)}")
    return args


def resolve_defaults(args: argparse.Namespace, cuda: bool) -> None:
    """Fill the size defaults: full sizes on GPUs, tiny ones on CPU or with --dry-run."""
    tiny = args.dry_run or not cuda
    defaults = dict(
        dtypes="bfloat16" if cuda else "float64,float32,bfloat16",
        check_local=64 if (tiny and cuda) else 256 if cuda else 8, check_batch=1 if cuda else 2,
        check_heads=8 if cuda else 4, check_kv_heads=2, check_head_dim=64 if (tiny and cuda) else 128 if cuda else 8,
        tokens="64,128" if not cuda else "1024,2048" if tiny else "8192,32768,131072",
        heads=4 if not cuda else 32, kv_heads=2 if not cuda else 8, head_dim=16 if not cuda else 128,
        mono_max=512 if not cuda else 65536, min_time=0.05 if tiny else 1.0,
        mem_start=64 if not cuda else 1024 if tiny else 8192, mem_max=256 if not cuda else 8192 if tiny else 2**24,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.check_window is None:
        args.check_window = args.check_local * 3 // 2 + 1
    if tiny:
        args.max_reps = min(args.max_reps, 3)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = init(args)
    resolve_defaults(args, ctx.cuda)
    env = dict(environment(), world=ctx.world, backend=dist.get_backend(), nvls="NCCL_NVLS_ENABLE=0")
    run = dict(command=command_line(), environment=env, tiny=args.dry_run or not ctx.cuda)
    ctx.log(env_line(env))
    if ctx.rank == 0:
        os.makedirs(args.out, exist_ok=True)
    ok = True
    parts = args.parts.split(",")

    def partial(data: dict) -> None:
        if ctx.rank == 0:
            write_part(args.out, "memory", dict(data), run)
            write_summary(args.out, with_plot=False)

    try:
        for part, module in (("correctness", correctness), ("scaling", scaling)):
            if part in parts:
                started = time.perf_counter()
                data, good = module.run(ctx)
                ctx.log(f"{part}: {time.perf_counter() - started:.1f} s")
                ok &= good
                if ctx.rank == 0:
                    write_part(args.out, part, data, run)
                    print(module.summary(data), flush=True)
        if "memory" in parts:
            data, good = memory.run(ctx, partial)
            ok &= good
            partial(data)
            if ctx.rank == 0:
                print(memory.markdown(data), flush=True)
        if ctx.rank == 0:
            write_summary(args.out)
            print(f"results: {os.path.join(args.out, 'results.md')}", flush=True)
        ok = ctx.reduce(1.0 if ok else 0.0, dist.ReduceOp.MIN) > 0
    finally:
        dist.destroy_process_group()
    if ctx.rank > 0:  # rank 0 carries the verdict; the others exiting early would make torchrun kill it
        return 0
    if not ok:
        print("WRONG RESULTS (see the tables above)", file=sys.stderr, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
