"""benchmarks/megatron_lm_versions.py without a GPU: it reads Megatron-LM's training log lines (the format
of megatron/training/training.py's training_log, core 0.16 to main) and megatron_patch's guard line,
and writes the table with the loss difference and speed-up of ring against Megatron's local attention."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("megatron_lm_versions", ROOT / "benchmarks" / "megatron_lm_versions.py")
versions = importlib.util.module_from_spec(spec)
spec.loader.exec_module(versions)


def _log(ms: float, losses: list[float], ring: bool) -> str:
    lines = ["building GPT model ...",
             "megatron_patch: guard passed after the model was built: core attention: 4 x "
             f"{'RingCoreAttention' if ring else 'DotProductAttention'}; RoPE: LayoutRotaryEmbedding"]
    for i, loss in enumerate(losses, 1):
        lines.append(
            f" [2026-12-02 04:00:0{i % 10}.123456] iteration {i:8d}/{len(losses):8d} | consumed samples: {i:12d} | "
            f"elapsed time per iteration (ms): {ms * (20 if i == 1 else 1):.1f} | learning rate: 1.000000E-04 | "
            f"global batch size:     1 | lm loss: {loss:.6E} | loss scale: 1.0 | grad norm: 3.210 | "
            "number of skipped iterations:   0 | number of nan iterations:   0 |")
    return "\n".join(lines)


def test_parse_log_reads_steps_and_guard():
    parsed = versions.parse_log(_log(455.0, [10.4, 10.2, 9.9, 9.7, 9.5, 9.3, 9.2, 9.0], ring=False))
    assert [s["iteration"] for s in parsed["steps"]] == list(range(1, 9))
    assert parsed["steps"][0] == {"iteration": 1, "ms": 9100.0, "loss": 10.4}
    assert parsed["guard"] == "core attention: 4 x DotProductAttention; RoPE: LayoutRotaryEmbedding"
    assert versions.step_ms(parsed["steps"]) == 455.0  # the slow first step is left out
    assert parsed["kernel"] is None and parsed["max_allocated_mb"] is None  # a run without those lines
    assert versions.parse_log("Traceback ...\nRingAttentionNotApplied: ...") == {
        "steps": [], "guard": None, "kernel": None, "max_allocated_mb": None}


def test_parse_log_reads_the_attention_kernel_and_peak_memory():
    """As Megatron-LM core 0.16 prints them (training.py's report_memory) and megatron_patch's first-step guard."""
    text = "\n".join([
        _log(455.0, [10.4, 10.2], ring=True),
        "megatron_patch: guard passed after the first step: RoPE table: from LayoutRotaryEmbedding; data split: "
        "megatron_patch's; attention kernel: sdpa (fa4); packed documents: whole (ring_sp.document_plan)",
        "[Rank 0] (after 1 iterations) memory (MB) | allocated: 17837.23 | max allocated: 57501.94 | reserved: "
        "57750.00 | max reserved: 57750.00",
        "[Rank 0] (after 2 iterations) memory (MB) | allocated: 17837.23 | max allocated: 65398.64 | reserved: "
        "67102.00 | max reserved: 67102.00"])
    parsed = versions.parse_log(text)
    assert parsed["kernel"] == "sdpa (fa4)" and parsed["max_allocated_mb"] == 65398.64


def test_table_compares_ring_with_local(tmp_path):
    local = [10.4, 10.2, 9.9, 9.7, 9.5, 9.3, 9.2]
    ring = [x + 2e-4 for x in local]
    rows = []
    for attention_ring, losses, ms in ((False, local, 455.0), (True, ring, 146.0)):
        run = {"status": 0, "wall_s": 40.0, **versions.parse_log(_log(ms, losses, attention_ring))}
        rows.append(versions.summarize("core_v0.19.0", "0.19.1", attention_ring, run))
    rows.append(versions.summarize("main", "0.20.0", False, {"status": "not run (deadline)", "wall_s": 0, "steps": []}))
    meta = {"date": "2026-12-02", "environment": "test", "flags": ["--bf16"], "versions": {}}
    versions.write_results(tmp_path, rows, meta, ["log a", "log b"])
    table = (tmp_path / "results.md").read_text()
    assert "| core_v0.19.0 | 0.19.1 | ring | core attention: 4 x RingCoreAttention; RoPE: LayoutRotaryEmbedding | " \
           "0 | 9.2002 (step 7) | 2.00e-04 over 7 steps | 146.0 | 3.12x |" in table, table
    assert "| main | 0.20.0 | Megatron local | - | not run (deadline) | - |  | - |  |" in table, table
    assert json.loads((tmp_path / "results.json").read_text())["runs"][1]["losses"] == [float(f"{x:.6E}") for x in ring]


def test_documents_runs_compare_ring_with_megatrons_dense_document_mask():
    flags = versions.megatron_flags(64, 2, 64, 4, 1, 128) + versions.DOCUMENT_FLAGS
    local, ring = versions.run_flags(flags, ring=False), versions.run_flags(flags, ring=True)
    assert "--no-create-attention-mask-in-dataloader" not in local and "--ring-attention" not in local
    assert "--no-create-attention-mask-in-dataloader" in ring and ring[-1] == "--ring-attention"
    assert set(versions.DOCUMENT_FLAGS) <= set(local) & set(ring)
    plain = versions.megatron_flags(64, 2, 64, 4, 1, 128)
    assert versions.run_flags(plain, ring=False) == plain
