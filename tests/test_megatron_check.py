"""``python -m megatron_patch check`` end to end in CI, on ``tests/stand_in_megatron_lm`` (a stand-in for
Megatron-LM's ``pretrain_gpt.py`` and ``megatron.training`` over the installed megatron-core): a
Megatron-LM whose builder sets the core attention back to DotProductAttention still gets ring
attention (exit 0), one that swaps the core attention after the build is reported (exit 1); and the
verdict of the reports. Real Megatron-LM checkouts: tests/test_megatron_lm_checkouts.py."""

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_patch.check import verdict

ROOT = Path(__file__).resolve().parents[1]
STAND_IN = ROOT / "tests" / "stand_in_megatron_lm"


def _check(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "megatron_patch", "check", str(STAND_IN), *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)


def test_check_reports_ring_attention_despite_a_builder_override():
    run = _check("--", "--stand-in-override-core-attention")
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    plain, ring = run.stdout.split("without --ring-attention:")[1].split("with --ring-attention:")
    assert "core attention: DotProductAttention x2" in plain and "PROBLEM" not in plain, run.stdout
    for line in ["built through: model_provider", "core attention: RingCoreAttention x2", "RoPE: LayoutRotaryEmbedding",
                 "get_batch_on_this_cp_rank: megatron_patch's", "ring attention ran in 2 of 2 layers"]:
        assert line in ring, run.stdout
    assert "megatron.core.transformer.attention.Attention.__init__" in run.stdout
    assert run.stdout.strip().splitlines()[-1].startswith("OK:")


def test_check_reports_a_core_attention_swapped_after_the_build():
    run = _check("--ring-only", "--", "--stand-in-swap-after-build")
    assert run.returncode == 1, run.stdout + run.stderr[-3000:]
    assert "without --ring-attention:" not in run.stdout
    assert "PROBLEM: decoder.layers.1.self_attention.core_attention is DotProductAttention, not RingCoreAttention" \
        in run.stdout
    assert run.stdout.strip().splitlines()[-1].startswith("NOT OK:")


def _report(**overrides):
    report = {"error": None, "problems": [], "forward_ok": True}
    return {**report, **overrides}


@pytest.mark.parametrize("plain, ring, status", [
    (_report(), _report(), 0),
    (None, _report(forward_ok=None), 0),  # the forward needs CUDA (MoE): structure only
    (_report(problems=["x is RingCoreAttention but --ring-attention is not set"]), _report(), 1),
    (_report(), _report(problems=["x is DotProductAttention, not RingCoreAttention"]), 1),
    (_report(), _report(forward_ok=False), 1),
    (_report(error="ImportError: cannot import name 'override' from 'typing'"), _report(), 2),
])
def test_verdict(plain, ring, status):
    assert verdict(plain, ring)[0] == status


def test_check_refuses_a_folder_without_pretrain_gpt(tmp_path):
    run = subprocess.run([sys.executable, "-m", "megatron_patch", "check", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and "holds no pretrain_gpt.py" in run.stderr
