"""benchmarks/profile_step.py: one training step of the job under the profiler (CPU here; the GPU numbers,
busy time and copies, come from the same code on a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def test_busy_time_is_the_union_of_kernel_intervals():
    from benchmarks.profile_step import busy_us

    assert busy_us([]) == 0
    assert busy_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17  # overlaps counted once, gaps not at all


@pytest.mark.slow
def test_profiles_one_step_of_the_job(tmp_path):
    job = ["--seq-length", "64", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
           "--ring-attention", "--recompute-granularity", "selective"]
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "profile_step.py"), "--out", str(tmp_path),
                          "--warmup", "1", "--top", "30", "--", *job], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.load(open(tmp_path / "profile.json"))
    assert result["job_argv"] == job and result["wall_ms"] > 0 and result["gpu_busy_ms"] is None  # CPU
    assert len(result["top"]) == 30 and any(r["name"] == "aten::mm" for r in result["top"])
    # the step's phases, named for the GPU's idle-time split (on CPU: their own Python time)
    assert {"step: forward", "step: backward", "step: optimizer"} <= {r["name"] for r in result["top"]}
    assert result["recompute"].startswith("recompute: selective")  # the job's own flags took effect
    text = open(tmp_path / "profile.md").read()
    assert "Wall time of the step" in text and "| aten::mm |" in text


def test_idle_gaps_are_what_no_kernel_covers_inside_the_step():
    from benchmarks.profile_step import idle_gaps

    assert idle_gaps([], 0, 10) == [(0, 10)]
    assert idle_gaps([(2, 4), (3, 6), (8, 12)], 0, 10) == [(0, 2), (6, 8)]
    assert idle_gaps([(-5, 1), (9, 20)], 0, 10) == [(1, 9)]  # kernels reaching over the step's edges


def test_idle_time_goes_to_the_deepest_host_operator_running_then():
    from benchmarks.profile_step import idle_by_host

    host = [("step: optimizer", 0, 100, 0), ("aten::item", 10, 30, 1), ("aten::_local_scalar_dense", 12, 20, 2),
            ("autograd thread op", 25, 40, 0), ("after", 200, 300, 0)]
    gaps = [(5, 35), (90, 110)]
    got = idle_by_host(gaps, host)
    assert got == {"step: optimizer": 5 + 10, "aten::item": 2 + 5 + 5, "aten::_local_scalar_dense": 8,
                   "autograd thread op": 5, "(no operator)": 10}, got  # 25-30: item (depth 1) over depth 0
    assert sum(got.values()) == 30 + 20  # every moment of every gap, once


def test_host_events_give_every_operator_with_its_depth():
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from benchmarks.profile_step import host_events, idle_by_host

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("step: optimizer"):
            torch.ones(64, 64).mm(torch.ones(64, 64)).sum().item()
    events = host_events(prof)
    depth = {name: d for name, _, _, d in events}
    assert depth["step: optimizer"] == 0 and depth["aten::mm"] == 1 and depth["aten::item"] == 1, depth
    start = min(s for _, s, _, _ in events)
    end = max(e for _, _, e, _ in events)
    split = idle_by_host([(start, end)], events)  # as if the GPU idled through all of it
    assert abs(sum(split.values()) - (end - start)) < 1e-6 and "aten::mm" in split


def test_device_events_are_on_the_host_events_clock():
    """Kineto's event times are absolute, the profiler's host events count from the trace's start: the GPU's
    intervals must be moved onto the host's clock, else every step looks idle (seen on an H100: 451 ms idle
    in a 451 ms step that was 98.7% busy). Checked with the CPU's kineto events, which both lists hold."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from benchmarks.profile_step import device_events, host_events

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("step: forward"):  # a range, not work: never counted as busy
            torch.ones(64, 64).mm(torch.ones(64, 64))
    assert "step: forward" not in {name for name, _, _ in device_events(prof, "CPU")}
    kineto = sorted((s, e) for name, s, e in device_events(prof, "CPU") if name == "aten::mm")
    host = sorted((s, e) for name, s, e, _ in host_events(prof) if name == "aten::mm")
    assert len(kineto) == len(host) == 1
    assert all(abs(a - b) < 1.0 for pair in zip(kineto, host) for a, b in zip(*pair)), (kineto, host)
