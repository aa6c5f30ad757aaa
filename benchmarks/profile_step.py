"""One training step of the job (launch/pretrain_gpt.py) under PyTorch's profiler: where the time goes and
whether the GPU stays busy.

    python benchmarks/profile_step.py --out benchmarks/results/h200-DATE/profile -- \\
        --seq-length 32768 --num-layers 22 --hidden-size 2048 ... --deepspeed_config deepspeed_configs/x.json
    python benchmarks/profile_step.py --out /tmp/profile -- --seq-length 64 --num-layers 2 --hidden-size 32

Everything after ``--`` is the job's own command line (its flags, its checks). The job is built in this
process (a world of one, or every rank under a launcher: rank 0 writes), runs ``--warmup`` steps, then one
profiled step. Writes ``profile.md`` and ``profile.json`` to ``--out`` (``trace.json``, the Chrome/Perfetto
trace, with ``--trace``):

- wall time of the step (host clock, the GPU synchronised before and after);
- GPU busy time: the union of the intervals in which a kernel or copy runs on the GPU, and busy / wall,
  the share of the step the GPU has work (1.0 = the host never makes it wait);
- device-to-host copies and host synchronisations the step made (each one stalls the host until the GPU
  drains its queue);
- the top kernels by GPU time (on CPU: the top operators by CPU time, and no GPU numbers).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import command_line, env_line, environment, table, write_results  # noqa: E402

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def device_events(prof) -> list[tuple[str, float, float]]:
    """(name, start µs, end µs) of every kernel, copy and memset the GPU ran."""
    from torch.autograd import DeviceType

    out = []
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == DeviceType.CUDA:
            start = e.start_ns() / 1e3
            out.append((e.name(), start, start + e.duration_ns() / 1e3))
    return out


def sync_callers(prof) -> dict[str, int]:
    """How many host synchronisations each chain of enclosing operators made ("outer < inner < sync")."""
    import collections

    seen: collections.Counter = collections.Counter()
    for event in prof.events():
        if event.name in SYNCS:
            chain, parent = [event.name], event.cpu_parent
            while parent is not None and len(chain) < 5:
                chain.append(parent.name)
                parent = parent.cpu_parent
            seen[" < ".join(reversed(chain))] += 1
    return dict(seen.most_common())


def summarize(prof, wall_ms: float, gpu: bool, top: int) -> dict:
    """The numbers of the docstring from a finished profile."""
    averages = prof.key_averages()
    if gpu:
        events = device_events(prof)
        busy = busy_us([(s, e) for _, s, e in events]) / 1e3
        kernels = sorted(averages, key=lambda a: -a.self_device_time_total)
        rows = [{"name": a.key, "calls": a.count, "ms": a.self_device_time_total / 1e3,
                 "share": a.self_device_time_total / 1e3 / busy if busy else 0.0}
                for a in kernels[:top] if a.self_device_time_total > 0]
        to_host = sum(1 for name, _, _ in events if "DtoH" in name)
        syncs = sum(a.count for a in averages if a.key in SYNCS)
        return {"wall_ms": wall_ms, "gpu_busy_ms": busy, "gpu_busy_share": busy / wall_ms, "kernels": len(events),
                "device_to_host_copies": to_host, "host_syncs": syncs, "syncs_by_caller": sync_callers(prof),
                "top": rows}
    ops = sorted(averages, key=lambda a: -a.self_cpu_time_total)
    rows = [{"name": a.key, "calls": a.count, "ms": a.self_cpu_time_total / 1e3,
             "share": a.self_cpu_time_total / 1e3 / wall_ms} for a in ops[:top]]
    return {"wall_ms": wall_ms, "gpu_busy_ms": None, "gpu_busy_share": None, "top": rows}


def sync_stacks(step) -> str:
    """Run ``step()`` under ``torch.cuda.set_sync_debug_mode("warn")``: every synchronising CUDA call with
    the Python frames that made it (innermost last), counted, as markdown."""
    import collections
    import traceback
    import warnings

    import torch

    seen: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings.py" not in f.filename]
        seen["\n".join(f"    {f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in frames[-12:])
             + f"\n    -> {str(message)[:100]}"] += 1

    torch.cuda.synchronize()
    shown = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.set_sync_debug_mode("default")
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = shown
    lines = [f"# Host synchronisations in one training step: {sum(seen.values())}", ""]
    for stack, count in seen.most_common():
        lines += [f"## {count} x", "", stack, ""]
    return "\n".join(lines)


def report(summary: dict, env: dict, job_argv: list[str], recompute_line: str, fused: list[str]) -> str:
    gpu = summary["gpu_busy_ms"] is not None
    lines = ["# One training step under the profiler", "", env_line(env), "", f"Command: `{command_line()}`", "",
             recompute_line, "", f"fused kernels: {', '.join(fused) if fused else 'none'}", "",
             f"Wall time of the step: {summary['wall_ms']:.1f} ms."]
    if gpu:
        lines += [f"GPU busy: {summary['gpu_busy_ms']:.1f} ms = {100 * summary['gpu_busy_share']:.1f}% of the wall "
                  f"time ({summary['kernels']} kernels and copies); device-to-host copies in the step: "
                  f"{summary['device_to_host_copies']}, host synchronisations: {summary['host_syncs']}.", "",
                  "Host synchronisations by enclosing operators:", "",
                  *(f"- {n} x {chain}" for chain, n in summary["syncs_by_caller"].items()), "",
                  "Top kernels by GPU time:", ""]
        header = ["kernel", "calls", "GPU ms", "share of GPU busy"]
    else:
        lines += ["No GPU: the top operators by CPU time.", ""]
        header = ["operator", "calls", "CPU ms", "share of wall"]
    rows = [[r["name"][:90].replace("|", "/"), r["calls"], f"{r['ms']:.2f}", f"{100 * r['share']:.1f}%"]
            for r in summary["top"]]
    return "\n".join([*lines, *table(header, rows), ""])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--warmup", type=int, default=2, help="training steps before the profiled one")
    p.add_argument("--top", type=int, default=25, help="rows of the kernel table")
    p.add_argument("--trace", action="store_true", help="also write the Chrome/Perfetto trace (large at long seqs)")
    p.add_argument("--sync-stacks", action="store_true", help="then one more step under CUDA's sync debug mode: "
                   "where each host synchronisation comes from (syncs.md)")
    opts = p.parse_args(argv[:cut])
    job_argv = argv[cut + 1:]

    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from launch import quiet
    from launch.args import parse_and_check

    rank = int(os.environ.get("RANK", "0"))
    args, config = parse_and_check([*job_argv, "--no-progress"])
    quiet.configure(args.verbose, rank)
    from launch.job import init_distributed, make_job

    device, mpu = init_distributed(args)
    job = make_job(args, config, device, mpu)  # a PipelineJob with --pipeline-model-parallel-size > 1
    gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    for i in range(opts.warmup):
        job.train_step(i)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        job.train_step(opts.warmup)
        sync()
        wall_ms = (time.perf_counter() - start) * 1e3
    if rank == 0:
        summary = summarize(prof, wall_ms, gpu, opts.top)
        env = environment()
        markdown = report(summary, env, job_argv, job.recompute_line, job.fused)
        write_results(opts.out, markdown, {"environment": env, "command": command_line(), "job_argv": job_argv,
                                           "recompute": job.recompute_line, "fused_kernels": job.fused, **summary},
                      name="profile")
        if opts.trace:
            prof.export_chrome_trace(os.path.join(opts.out, "trace.json"))
        print(markdown, flush=True)
    if gpu and opts.sync_stacks:
        stacks = sync_stacks(lambda: job.train_step(opts.warmup + 1))
        if rank == 0:
            with open(os.path.join(opts.out, "syncs.md"), "w") as f:
                f.write(stacks)
            print(stacks, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
