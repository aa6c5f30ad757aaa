"""``python -m megatron_patch check`` against real Megatron-LM checkouts: every release from core 0.16 to
main builds its GPT through its own ``pretrain_gpt.py`` with ring attention in every layer, for the
default builder with the dense and the MoE layer specs and for ``--spec megatron_patch ring_gpt_layer_spec``.

Megatron-LM is not installed here and CI cannot fetch it: these tests skip unless checkouts are found
in ``MEGATRON_LM_CHECKOUTS`` (paths joined by os.pathsep) or under the repository's git-ignored
``.megatron/`` (one folder per version, e.g. ``git archive core_v0.19.0 megatron pretrain_gpt.py
gpt_builders.py model_provider.py``). Core 0.18 and later need Python 3.12 (``typing.override``):
``MEGATRON_LM_PYTHON`` names the interpreter for the builds (default: this one).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = os.environ.get("MEGATRON_LM_PYTHON", sys.executable)


def _checkouts() -> list[Path]:
    listed = os.environ.get("MEGATRON_LM_CHECKOUTS")
    paths = [Path(p) for p in listed.split(os.pathsep)] if listed else sorted((ROOT / ".megatron").glob("*"))
    return [p for p in paths if (p / "pretrain_gpt.py").is_file()]


def _minor(path: Path) -> int:
    text = (path / "megatron" / "core" / "package_info.py").read_text()
    return int(re.search(r"^MINOR\s*=\s*(\d+)", text, re.M).group(1))


def _python_version() -> tuple[int, int]:
    out = subprocess.run([PYTHON, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True)
    return tuple(int(x) for x in out.stdout.split())


VARIANTS = {
    "dense": [],
    "moe": ["--ring-only", "--", "--num-experts", "2", "--moe-router-topk", "2",
            "--moe-token-dispatcher-type", "allgather"],
    "spec": ["--ring-only", "--", "--spec", "megatron_patch", "ring_gpt_layer_spec"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("checkout", _checkouts() or [None], ids=lambda p: getattr(p, "name", "none"))
def test_check_passes_on_megatron_lm(checkout, variant):
    if checkout is None:
        pytest.skip("no Megatron-LM checkout (set MEGATRON_LM_CHECKOUTS or put them under .megatron/)")
    if _minor(checkout) >= 18 and _python_version() < (3, 12):
        pytest.skip(f"Megatron-LM core 0.{_minor(checkout)} needs Python 3.12: set MEGATRON_LM_PYTHON")
    run = subprocess.run([PYTHON, "-m", "megatron_patch", "check", str(checkout), *VARIANTS[variant]], cwd=ROOT,
                         capture_output=True, text=True, timeout=1800,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    report = run.stdout
    assert run.returncode == 0, report + run.stderr[-3000:]
    ring = report.split("with --ring-attention:")[1]
    assert "core attention: RingCoreAttention x2\n" in ring, report
    assert "RoPE: LayoutRotaryEmbedding" in ring, report
    assert "get_batch_on_this_cp_rank: megatron_patch's" in ring, report
    if variant == "moe":  # Megatron's MoE router needs CUDA to run
        assert "forward + backward on CPU: not run: a module of this model needs CUDA" in ring, report
    else:
        assert "ring attention ran in 2 of 2 layers" in ring, report
    if variant == "dense":
        assert "core attention: DotProductAttention x2" in report.split("without --ring-attention:")[1], report
    assert report.strip().splitlines()[-1].startswith("OK: --ring-attention replaces every layer")
