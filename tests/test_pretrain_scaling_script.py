"""benchmarks/pretrain_scaling.py on CPU (2 gloo ranks under the DeepSpeed launcher, tiny model):
it runs the job, reads its metrics, reports a ring run whose losses match the dense run on the
same data, and fails loudly when a run fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "pretrain_scaling.py")
sys.path.insert(0, ROOT)


def _run(out, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, SCRIPT, "--out", str(out), "--nproc", "2", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_scaling_and_loss_overlay(tmp_path):
    run = _run(tmp_path, "--setups", "ring2:ring=2", "--max-seq", "64", "--iters", "3", "--recompute-granularity",
               "selective", "--fused-kernels", "none")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.load(open(tmp_path / "results.json"))
    (row,) = result["scaling"]
    assert (row["name"], row["ring"], row["seq"], row["status"]) == ("ring2", 2, 64, "ok")
    assert len(row["train"]) == 3 and row["tokens_per_s_per_gpu"] > 0 and row["peak_memory_mb"] > 0
    # the flags reached the run, and its log's account of them is kept; no peak FLOP/s on CPU: no MFU
    assert "--recompute-granularity selective --fused-kernels none" in row["command"] and row["mfu"] is None
    assert row["recompute"].startswith("recompute: selective")
    assert row["fused_kernels"].startswith("fused kernels: none")
    assert result["mfu_formula"].startswith("MFU = tokens/s per GPU × (6·N + 6·L·h·s)")
    assert result["mfu_formula"] in open(tmp_path / "results.md").read()
    loss = result["loss"]
    assert loss["setups"] == ["ring2", "dense"] and all(len(r["train"]) == 4 for r in loss["runs"])
    # same data, same global batch: ring attention over 2 ranks reproduces dense attention (seen 6e-8)
    assert loss["max_rel_loss_diff"] < 1e-5
    assert (tmp_path / "scaling.png").exists() and (tmp_path / "loss.png").exists()
    assert row["attention_kernel"] == "sdpa (cpu)"  # the job's start line
    assert "| ring2 | 64 | ok |" in open(tmp_path / "results.md").read()


def test_a_failing_run_is_reported_and_fails_the_script(tmp_path):
    run = _run(tmp_path, "--parts", "scaling", "--setups", "ring3:ring=3", "--max-seq", "64")
    assert run.returncode == 1
    (row,) = json.load(open(tmp_path / "results.json"))["scaling"]
    assert row["status"].startswith("failed") and "cannot be split" in open(tmp_path / row["log"]).read()


def test_model_flops_of_the_1b_model():
    from benchmarks.pretrain_scaling import LLAMA_1B, flops_per_token, mfu_formula

    args = LLAMA_1B.split()
    # per layer: QKV 2048·64·(32 + 2·4) + output 32·64·2048 + SwiGLU 3·2048·5632 = 44,040,192; output layer h·V
    matmul = 22 * 44_040_192 + 2048 * 32000
    assert flops_per_token(args, 4096) == 6 * matmul + 6 * 22 * 4096 * 32 * 64
    assert f"N = {matmul:,} matmul parameters" in mfu_formula(args, 989.0)  # 1,034,804,224


def test_rows_of_an_earlier_call_join_the_report(tmp_path):
    """--previous: a side-by-side split over two calls on one machine reports both calls' rows, marked."""
    from benchmarks.pretrain_scaling import earlier_rows

    row = {"name": "ring1", "seq": 16384, "status": "ok"}
    (tmp_path / "results.json").write_text(json.dumps(
        {"environment": {"gpu": "NVIDIA H200", "date": "2026-12-07T18:00:00+00:00"},
         "scaling": [row, {**row, "seq": 32768}]}))
    now = [{"name": "ring1", "seq": 32768, "status": "ok"}, {"name": "megatron-lm", "seq": 16384, "status": "ok"}]
    assert earlier_rows(str(tmp_path / "results.json"), now) == [
        {**row, "previous": "NVIDIA H200, 2026-12-07T18:00:00+00:00"}]


def test_runs_of_one_length_with_different_attention_kernels_are_flagged():
    """Megatron-LM set up without FlashAttention-4 beside our job with it compares kernels, not jobs."""
    from benchmarks.pretrain_scaling import kernel_mismatches

    ours = {"name": "ring1", "status": "ok", "attention_kernel": "sdpa (fa4)"}
    theirs = {"name": "megatron-lm", "status": "ok", "attention_kernel": "sdpa (fa4)"}
    rows = [{**ours, "seq": 16384}, {**theirs, "seq": 16384}, {**ours, "seq": 32768},
            {**theirs, "seq": 32768, "attention_kernel": "sdpa (cudnn)"},
            {**ours, "seq": 65536}, {**theirs, "seq": 65536, "status": "out of memory", "attention_kernel": None}]
    assert kernel_mismatches(rows) == ["seq 32768: ring1 sdpa (fa4), megatron-lm sdpa (cudnn)"]


def test_no_setups_without_megatron_lm_is_refused(tmp_path):
    run = _run(tmp_path, "--parts", "scaling", "--setups")
    assert run.returncode != 0 and "--setups: none given and no --megatron-lm" in run.stderr
