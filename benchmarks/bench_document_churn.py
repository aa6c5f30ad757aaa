"""Packed documents as training sees them: new document lengths every step.

    python benchmarks/bench_document_churn.py --out benchmarks/results/h200-DATE/document_churn

``bench_documents.py`` times the same documents over and over, so whatever a kernel library builds
per shape (cuDNN's execution plans, Triton's compiled variants) is built once and hidden. In training
every batch packs different documents. This script runs ``--steps`` forward+backward passes of the
simulated ring, each on its own document lengths (Megatron-LM's mock data: uniform in [1, 4096), or
log-normal with ``--median``), then the same passes again ("the same again": the same work, with every
plan and compiled variant the first pass built already cached), for each ``--grid`` (``whole``: blocks
of several documents uncut for cuDNN's ragged op, backend ``sdpa_cudnn_ragged``; a number or ``none``: the
document grid under auto, ``ring_sp.schedule.DOCUMENT_GRID``: the parts of documents on it go to cuDNN, the
rest to Triton's masked blocks). Also
PyTorch's ``varlen_attn`` on the same fresh documents. ms per step excludes the first (warm-up) step; results.json
keeps every step's own ms (``each_ms``), which shows whether a cost is paid once (plans built in the first
steps) or every step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_documents as bench  # noqa: E402
from benchmarks.common import env_line, environment, randn, table, write_results  # noqa: E402
from ring_sp import ring_attention_simulated, schedule, split  # noqa: E402


def uniform_lengths(seq: int, seed: int, high: int = 4096) -> list[int]:
    """Megatron-LM's mock documents: lengths uniform in [1, high), packed until ``seq`` is full."""
    g = torch.Generator().manual_seed(seed)
    out, left = [], seq
    while left > 0:
        n = min(int(torch.randint(1, high, (1,), generator=g)), left)
        out.append(n)
        left -= n
    return out


def boundaries(lengths: list[int]) -> list[int]:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


def ring_step(q, k, v, do, world: int, layout: str, cu: list[int], backend: str = "auto") -> None:
    qs, ks, vs, dos = (split(t, layout, world) for t in (q, k, v, do))
    qg, kg, vg = ([t.detach().requires_grad_() for t in ts] for ts in (qs, ks, vs))
    torch.autograd.backward(ring_attention_simulated(qg, kg, vg, causal=True, layout=layout, cu_seqlens=cu,
                                                     backend=backend), dos)


def varlen_step(q, k, v, do, cu: list[int]) -> None:
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    cu_t = torch.tensor(cu, dtype=torch.int32, device=q.device)
    kr, vr = (t.repeat_interleave(bench.HEADS // bench.KV_HEADS, dim=1) for t in (k, v))
    qg, kg, vg = (t[0].detach().requires_grad_() for t in (q, kr, vr))
    longest = max(lengths)
    varlen_attn(qg, kg, vg, cu_t, cu_t, longest, longest, **kw).backward(do[0])


def timed(step, docs: list[list[int]], each: list[float] | None = None) -> float:
    """ms per step over docs[1:] (docs[0] warms up); ``each``: also append every step's own ms (synchronised
    after each step)."""
    step(docs[0])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for cu in docs[1:]:
        begin = time.perf_counter()
        step(cu)
        if each is not None:
            torch.cuda.synchronize()
            each.append((time.perf_counter() - begin) * 1e3)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / (len(docs) - 1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[8192, 131072])
    p.add_argument("--world", type=int, nargs="+", default=[1, 8], help="one per --seq")
    p.add_argument("--layout", default="contiguous")
    p.add_argument("--lengths", choices=["uniform", "lognormal"], default="uniform")
    p.add_argument("--median", type=int, default=3500)
    p.add_argument("--grid", type=bench.grid_value, nargs="+", default=["whole", schedule.DOCUMENT_GRID],
                   help="whole (uncut blocks for cuDNN's ragged op, backend sdpa_cudnn_ragged) or document grids "
                   "(ring_sp.schedule.DOCUMENT_GRID; none: unmasked only where a document fills a whole block)")
    p.add_argument("--backends", nargs="*", default=["sdpa_flash"],
                   help="also these block backends, every document piece a block of its own (grid 1)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-varlen", action="store_true", help="leave out PyTorch's varlen_attn row")
    p.add_argument("--out", default=None)
    opts = p.parse_args(argv)
    env = environment()
    rows, header = [], ["seq", "W", "run", "documents", "ms/step", "TFLOP/s (f+b, useful)"]
    default_grid = schedule.DOCUMENT_GRID
    for seq, world in zip(opts.seq, opts.world):
        make = (lambda s: uniform_lengths(seq, s)) if opts.lengths == "uniform" else (
            lambda s: bench.document_lengths(seq, opts.median, [], s))
        fresh = [boundaries(make(seed)) for seed in range(opts.steps + 1)]
        flops = sum(bench.useful_flops([b - a for a, b in zip(cu, cu[1:])], True) for cu in fresh[1:]) / opts.steps
        q, do = randn(1, seq, bench.HEADS, bench.HEAD_DIM), randn(1, seq, bench.HEADS, bench.HEAD_DIM)
        k, v = randn(1, seq, bench.KV_HEADS, bench.HEAD_DIM), randn(1, seq, bench.KV_HEADS, bench.HEAD_DIM)
        runs = [(f"ring {opts.layout}, {bench.plan_backend(grid)}, grid {grid}", grid, bench.plan_backend(grid))
                for grid in opts.grid]
        runs += [(f"ring {opts.layout}, {backend}, every document its own block", 1, backend)
                 for backend in opts.backends]
        for name, grid, backend in runs:
            bench.use_plan(grid)
            step = lambda cu: ring_step(q, k, v, do, world, opts.layout, cu, backend)  # noqa: E731
            for label, docs in (("fresh each step", fresh), ("the same again", fresh)):
                each: list[float] = []
                ms = timed(step, docs, each)
                rows.append(dict(seq=seq, world=world, run=name, documents=label, ms=ms, tflops=flops / ms / 1e9,
                                 each_ms=[round(t, 1) for t in each]))
                print(rows[-1], flush=True)
        bench.use_plan("whole")
        schedule.DOCUMENT_GRID = default_grid
        if opts.no_varlen:
            continue
        ms = timed(lambda cu: varlen_step(q, k, v, do, cu), fresh)
        rows.append(dict(seq=seq, world=1, run="varlen_attn (flash 2)", documents="fresh each step", ms=ms,
                         tflops=flops / ms / 1e9))
        print(rows[-1], flush=True)
    cells = [[r["seq"], r["world"], r["run"], r["documents"], f"{r['ms']:.1f}", f"{r['tflops']:.0f}"] for r in rows]
    text = "\n".join(["# Packed documents, new lengths every step", "", env_line(env), "",
                      f"Lengths: {opts.lengths}; causal, bf16, {bench.HEADS}/{bench.KV_HEADS} heads, "
                      f"head_dim {bench.HEAD_DIM}; "
                      f"{opts.steps} timed steps after one warm-up. TORCH_CUDNN_SDPA_AVOID_RECOMPILE="
                      f"{os.environ.get('TORCH_CUDNN_SDPA_AVOID_RECOMPILE', '(unset)')} (PyTorch's opt-in: cuDNN "
                      "rounds sequence lengths up to powers of two for BSHD-contiguous inputs, so fewer plans are "
                      "built).", "", *table(header, cells), ""])
    print(text)
    if opts.out:
        write_results(opts.out, text, {"environment": env, "rows": rows}, name="results")


if __name__ == "__main__":
    main()
