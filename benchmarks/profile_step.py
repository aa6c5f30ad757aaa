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
- the GPU's idle time in the step split by what the host was doing meanwhile: by phase (DeepSpeed's forward,
  backward, optimizer step, the rest of ``train_step``; ranges this script names, the job is unchanged) and by
  the innermost host operator running (time the GPU waited for the host to launch its next kernel);
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
STEP = "step: other (batch, loss read, logging)"  # the profiled step's range; its phases are named "step: ..."


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def idle_gaps(busy: list[tuple[float, float]], start: float, end: float) -> list[tuple[float, float]]:
    """The intervals of [start, end] that no interval of ``busy`` covers (when the GPU ran nothing)."""
    gaps, reach = [], start
    for s, e in sorted(busy):
        if s > reach:
            gaps.append((reach, min(s, end)))
        reach = max(reach, e)
        if reach >= end:
            break
    if reach < end:
        gaps.append((reach, end))
    return [(s, e) for s, e in gaps if e > s]


def idle_by_host(gaps: list[tuple[float, float]], host: list[tuple[str, float, float, int]]) -> dict[str, float]:
    """Split the GPU's idle ``gaps`` by what the host was running: each moment of a gap goes to the deepest
    host operator (``(name, start, end, depth)``, any thread) running then, or to "(no operator)". µs by name.

    One sweep over every start and end (a GPU step has tens of thousands of host operators)."""
    totals: dict[str, float] = {}
    points = sorted({t for g in gaps for t in g} | {t for h in host for t in h[1:3]})
    opens: dict[float, list[int]] = {}
    for n, h in enumerate(host):
        opens.setdefault(h[1], []).append(n)
    gaps = sorted(gaps)
    running: set[int] = set()
    g = 0
    for a, b in zip(points, points[1:]):
        running |= set(opens.get(a, ()))
        running = {n for n in running if host[n][2] > a}
        while g < len(gaps) and gaps[g][1] <= a:
            g += 1
        if g < len(gaps) and gaps[g][0] <= a:  # [a, b) lies inside gap g (points include every gap edge)
            name = host[max(running, key=lambda n: (host[n][3], host[n][1], -n))][0] if running else "(no operator)"
            totals[name] = totals.get(name, 0.0) + (b - a)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def host_events(prof) -> list[tuple[str, float, float, int]]:
    """(name, start µs, end µs, depth) of every host operator the profiler recorded (depth 0: outermost)."""
    out = []
    for event in prof.events():
        if event.device_type.name != "CPU" or event.name in SYNCS:
            continue
        depth, parent = 0, event.cpu_parent
        while parent is not None:
            depth, parent = depth + 1, parent.cpu_parent
        out.append((event.name, event.time_range.start, event.time_range.end, depth))
    return out


def labelled_phases(engine) -> None:
    """Name the phases of a DeepSpeed step in the profile (forward, backward, optimizer step) by wrapping the
    ``engine``'s methods in ``record_function`` ranges (this process only: the job itself is unchanged)."""
    from torch.profiler import record_function

    for method, label in (("forward", "step: forward"), ("backward", "step: backward"), ("step", "step: optimizer")):
        inner = getattr(engine, method)

        def labelled(*args, _inner=inner, _label=label, **kwargs):
            with record_function(_label):
                return _inner(*args, **kwargs)

        setattr(engine, method, labelled)


def device_events(prof, device: str = "CUDA") -> list[tuple[str, float, float]]:
    """(name, start µs, end µs) of every kernel, copy and memset the GPU ran (``device``: the profiler's device
    type), on the clock of ``host_events`` and the step's window: µs since the trace began (kineto's own times
    are absolute). Not the GPU's copies of ``record_function`` ranges: they span kernels and the gaps between."""
    from torch.autograd import DeviceType

    results = prof.profiler.kineto_results
    origin = results.trace_start_ns()
    out = []
    for e in results.events():
        annotation = e.is_user_annotation() or "user_annotation" in e.activity_type()  # kineto: gpu_user_annotation
        if e.device_type() == getattr(DeviceType, device) and not annotation:
            start = (e.start_ns() - origin) / 1e3
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


def summarize(prof, wall_ms: float, gpu: bool, top: int, window: tuple[float, float] | None = None) -> dict:
    """The numbers of the docstring from a finished profile; ``window``: the step's (start, end) in the
    profiler's µs (default: from the first to the last event)."""
    averages = prof.key_averages()
    if gpu:
        events = device_events(prof)
        busy = busy_us([(s, e) for _, s, e in events]) / 1e3
        host = host_events(prof)
        if window is None:
            window = (min(h[1] for h in host), max(h[2] for h in host))
        gaps = idle_gaps([(s, e) for _, s, e in events], *window)
        phases = [h for h in host if h[0].startswith("step: ")]
        idle = {"ms": sum(e - s for s, e in gaps) / 1e3, "gaps": len(gaps),
                "by_phase_ms": {k: v / 1e3 for k, v in idle_by_host(gaps, [(n, s, e, 0) for n, s, e, _ in phases]
                                                                      ).items()},
                "by_operator_ms": {k: v / 1e3 for k, v in list(idle_by_host(gaps, host).items())[:top]}}
        kernels = sorted(averages, key=lambda a: -a.self_device_time_total)
        rows = [{"name": a.key, "calls": a.count, "ms": a.self_device_time_total / 1e3,
                 "share": a.self_device_time_total / 1e3 / busy if busy else 0.0}
                for a in kernels if a.self_device_time_total > 0 and not a.key.startswith("step: ")][:top]
        to_host = sum(1 for name, _, _ in events if "DtoH" in name)
        syncs = sum(a.count for a in averages if a.key in SYNCS)
        return {"wall_ms": wall_ms, "gpu_busy_ms": busy, "gpu_busy_share": busy / wall_ms, "kernels": len(events),
                "device_to_host_copies": to_host, "host_syncs": syncs, "syncs_by_caller": sync_callers(prof),
                "gpu_idle": idle, "top": rows}
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
                  *(f"- {n} x {chain}" for chain, n in summary["syncs_by_caller"].items()), ""]
        idle = summary["gpu_idle"]
        lines += [f"GPU idle in the step: {idle['ms']:.1f} ms in {idle['gaps']} gaps. By the phase the host was in "
                  "(DeepSpeed's forward, backward and optimizer step):", "",
                  *(f"- {name.removeprefix('step: ')}: {ms:.2f} ms" for name, ms in idle["by_phase_ms"].items()), "",
                  "By the innermost host operator running while the GPU had nothing to run:", "",
                  *table(["host operator", "GPU idle ms"],
                         [[n[:90].replace("|", "/"), f"{ms:.2f}"] for n, ms in idle["by_operator_ms"].items()]),
                  "", "Top kernels by GPU time:", ""]
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
    from torch.profiler import ProfilerActivity, profile, record_function

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
    labelled_phases(job.engine)
    sync()
    with profile(activities=activities) as prof:
        with record_function(STEP):
            start = time.perf_counter()
            job.train_step(opts.warmup)
            sync()
            wall_ms = (time.perf_counter() - start) * 1e3
    if rank == 0:
        whole = next(e for e in prof.events() if e.name == STEP)
        summary = summarize(prof, wall_ms, gpu, opts.top, (whole.time_range.start, whole.time_range.end))
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
