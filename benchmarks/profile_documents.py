"""Where a step of the simulated ring goes when every step packs new documents.

    python benchmarks/profile_documents.py --out benchmarks/results/h100-DATE/profile_documents

For each plan (``--runs``: ``whole`` = whole blocks through ``backend="sdpa_cudnn_ragged"``; ``whole_dense`` = the
same with every single-document block on PyTorch's dense cuDNN op, as before 2026-12-07's fix; ``grid`` = auto's
document grid), after ``--warmup`` fresh steps, times ``--steps`` more fresh steps one by one and
records, per step: ms (synchronised), the new graphs in cudnn-frontend's cache, and the distinct shapes of
PyTorch's dense cuDNN calls not seen before (each new shape builds a cuDNN plan). Then the host side of two
fresh steps under cProfile (top functions by own time) and a torch profile of one (top ops by CPU and by
CUDA time). Same workload as ``bench_document_churn.py`` (128k, ring of 8, log-normal documents).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import os
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_document_churn import boundaries, ring_step  # noqa: E402
from benchmarks.bench_documents import HEAD_DIM, HEADS, KV_HEADS, document_lengths, use_plan  # noqa: E402
from benchmarks.common import env_line, environment, randn, write_results  # noqa: E402
from ring_sp import schedule  # noqa: E402
from ring_sp.kernels import sdpa_backend  # noqa: E402


class DenseShapes:
    """Stands in for ``torch.ops.aten`` inside the sdpa backend and records each cuDNN call's shapes."""

    def __init__(self):
        self.seen: set[tuple] = set()
        self.new = 0

    def __getattr__(self, name):
        op = getattr(torch.ops.aten, name)
        if "cudnn" not in name:
            return op

        def call(*args, **kwargs):
            key = (name, *(tuple(a.shape) for a in args[:3]), args[6] if "backward" not in name else args[14])
            if key not in self.seen:
                self.seen.add(key)
                self.new += 1
            return op(*args, **kwargs)

        return call


def frontend_graphs() -> int:
    try:
        import cudnn.sdpa.fwd.torch_op as frontend
    except Exception:
        return 0
    return len(frontend._graph_cache)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=131072)
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--layout", default="contiguous")
    p.add_argument("--median", type=int, default=3500)
    p.add_argument("--runs", nargs="+", default=["whole_dense", "whole", "grid"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default=None)
    opts = p.parse_args(argv)
    env = environment()
    print(env_line(env), flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of the script itself
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    q, do = (randn(1, opts.seq, HEADS, HEAD_DIM, device=device) for _ in range(2))
    k, v = (randn(1, opts.seq, KV_HEADS, HEAD_DIM, device=device) for _ in range(2))
    spy = DenseShapes()
    sdpa_backend.aten = spy
    seeds = iter(range(1000, 100000))
    report, rows = [], []
    for run in opts.runs:
        whole = run.startswith("whole")
        backend = "sdpa_cudnn_ragged" if whole and device == "cuda" else "auto"
        use_plan("whole" if whole else schedule.DOCUMENT_GRID)
        op = sdpa_backend.OPS["cudnn_ragged"]
        if run == "whole_dense":
            sdpa_backend.OPS["cudnn_ragged"] = dataclasses.replace(op, forward=sdpa_backend._cudnn_fwd,
                                                                   backward=sdpa_backend._cudnn_bwd)

        def step() -> None:
            ring_step(q, k, v, do, opts.world, opts.layout, boundaries(document_lengths(opts.seq, opts.median, [],
                                                                                          next(seeds))), backend)

        for _ in range(opts.warmup):
            step()
        sync()
        for i in range(opts.steps):
            graphs, spy.new = frontend_graphs(), 0
            begin = time.perf_counter()
            step()
            sync()
            rows.append(dict(run=run, step=i, ms=round((time.perf_counter() - begin) * 1e3, 1),
                             new_frontend_graphs=frontend_graphs() - graphs, new_dense_cudnn_shapes=spy.new))
            print(rows[-1], flush=True)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(2):
            step()
        sync()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        report += [f"## {run}: cProfile of two fresh steps, by own time", "", "```", text.getvalue().strip(), "```",
                   ""]
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tp:
            step()
            sync()
        for sort in ("self_cpu_time_total", "self_device_time_total"):
            report += [f"## {run}: torch profile of one fresh step, by {sort}", "", "```",
                       tp.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=70), "```", ""]
        use_plan("whole")
        sdpa_backend.OPS["cudnn_ragged"] = op
    text = "\n".join(["# One fresh-documents step, profiled", "", env_line(env), "", "Per step:", "", "```",
                      *map(str, rows), "```", "", *report])
    print(text)
    if opts.out:
        write_results(opts.out, text, {"environment": env, "rows": rows}, name="results")


if __name__ == "__main__":
    main()
