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
                          "--warmup", "1", "--top", "5", "--", *job], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.load(open(tmp_path / "profile.json"))
    assert result["job_argv"] == job and result["wall_ms"] > 0 and result["gpu_busy_ms"] is None  # CPU
    assert len(result["top"]) == 5 and any(r["name"] == "aten::mm" for r in result["top"])
    assert result["recompute"].startswith("recompute: selective")  # the job's own flags took effect
    text = open(tmp_path / "profile.md").read()
    assert "Wall time of the step" in text and "| aten::mm |" in text
