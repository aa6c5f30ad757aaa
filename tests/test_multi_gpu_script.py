"""benchmarks/multi_gpu_ring.py under torchrun on CPU (2 gloo ranks, tiny sizes): the correctness
part passes and prints its table, the scaling and memory parts run in dry-run mode and write their
files, and a perturbed gradient (negative control) makes the script fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "multi_gpu_ring.py")


def _torchrun(out: str, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", SCRIPT,
               "--device", "cpu", "--out", out, *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="session")
def full_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("multi_gpu"))
    return out, _torchrun(out, "--tokens", "32", "--mem-max", "128", "--min-time", "0.01", "--warmup", "1")


def test_correctness_passes_and_prints_the_table(full_run):
    out, run = full_run
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "## Correctness" in run.stdout and "**all passed**" in run.stdout
    rows = json.load(open(os.path.join(out, "correctness.json")))["rows"]
    assert {r["layout"] for r in rows} == {"contiguous", "striped", "zigzag"}
    assert {r["dtype"] for r in rows} == {"float64", "float32", "bfloat16"}
    assert {r["ring_size"] for r in rows} == {None, 1} and any(r["window"] for r in rows)
    assert any(r["masked"] for r in rows) and any(not r["reduce_col"] for r in rows)
    assert all(r["status"] == "ok" and max(r["ratios"]) <= 1 for r in rows)


def test_scaling_and_memory_dry_run(full_run):
    out, run = full_run
    assert run.returncode == 0
    for name in ("correctness", "scaling", "memory"):
        assert os.path.exists(os.path.join(out, f"{name}.md")) and os.path.exists(os.path.join(out, f"{name}.json"))
    assert "## Scaling" in open(os.path.join(out, "results.md")).read()
    scaling = json.load(open(os.path.join(out, "scaling.json")))
    rings = [r for r in scaling["rows"] if r["variant"].startswith("ring")]
    assert {(r["tokens"], r["variant"]) for r in rings} == {(32, "ring zigzag"), (32, "ring striped")}
    for r in rings:  # comm on, off, and alone were all measured; W = 2: K/V once forward; with the backward
        # K/V again and dK/dV straight back to their owner: 1 + 1 + 1
        assert min(r["fwd_s"], r["fwd_bwd_s"], r["fwd_off_s"], r["fwd_bwd_off_s"], r["fwd_bwd_comm_s"]) > 0
        assert (r["fwd_transfers"], r["fwd_bwd_transfers"]) == (1, 3)
    cp = [r for r in scaling["rows"] if r["variant"].startswith("torch cp")]
    assert cp and all("needs CUDA" in r["unavailable"] for r in cp)
    memory = json.load(open(os.path.join(out, "memory.json")))
    assert [r["tokens"] for r in memory["rows"]] == [64, 128] and "attempting" not in memory


def test_a_wrong_gradient_fails_the_run(tmp_path):
    run = _torchrun(str(tmp_path), "--parts", "correctness", "--dtypes", "float64", "--perturb", "0.01")
    assert run.returncode != 0
    rows = json.load(open(tmp_path / "correctness.json"))["rows"]
    assert rows and all(r["status"] == "FAIL" and r["ratios"][1] > 1 for r in rows)
    assert "FAILED" in run.stdout
