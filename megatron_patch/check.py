"""``python -m megatron_patch check [PATH_TO_MEGATRON_LM] [-- MEGATRON ARGS...]``: does ``--ring-attention``
work with this Megatron-LM checkout?

Builds a tiny GPT (2 layers, width 64, 64 tokens) through the checkout's own ``pretrain_gpt.py`` on
CPU (gloo, one process, no GPU), once without and once with ``--ring-attention``, each in a fresh
Python process (see ``megatron_patch.check_build``), and prints which of Megatron's names were
replaced, which core attention every layer got, the RoPE class, whose data split the script calls,
and whether a forward and backward pass ran ring attention in every layer. Megatron arguments after
``--`` are added to both builds (e.g. ``-- --num-experts 4`` for the MoE layer spec).

Exit status: 0 when ``--ring-attention`` takes effect (and the build without it has no ring module),
1 when it does not, 2 when a build failed (the report says why).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

TINY_MODEL = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
    "--max-position-embeddings", "64", "--micro-batch-size", "1", "--global-batch-size", "1",
    "--train-iters", "1", "--lr", "1e-4", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
    "--attention-dropout", "0", "--hidden-dropout", "0", "--position-embedding-type", "rope",
    "--no-create-attention-mask-in-dataloader", "--no-rope-fusion", "--no-masked-softmax-fusion",
    "--no-bias-dropout-fusion", "--no-bias-swiglu-fusion", "--no-persist-layer-norm",
    "--no-gradient-accumulation-fusion", "--use-cpu-initialization", "--transformer-impl", "local",
]


def build(path: str, argv: list[str], python: str = sys.executable, timeout: float = 900) -> dict:
    """One ``check_build`` run of ``PATH/pretrain_gpt.py`` with ``argv`` in a fresh process; its report."""
    path = os.path.abspath(path)
    script = os.path.join(path, "pretrain_gpt.py")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where megatron_patch lives
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([path, root, os.environ.get("PYTHONPATH", "")]),
               RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", CUDA_VISIBLE_DEVICES="",
               PYTHONWARNINGS="ignore")
    with tempfile.TemporaryDirectory() as tmp:
        report_path = os.path.join(tmp, "report.json")
        run = subprocess.run([python, "-m", "megatron_patch.check_build", report_path, script, *argv], cwd=path,
                             env=env, capture_output=True, text=True, timeout=timeout)
        if not os.path.exists(report_path):
            return {"error": f"the build process exited with status {run.returncode}", "traceback": run.stderr[-4000:]}
        with open(report_path) as f:
            return json.load(f)


def verdict(plain: dict, ring: dict | None) -> tuple[int, str]:
    """(exit status, one line) from the two builds' reports (``plain`` None: not built)."""
    for name, report in (("without --ring-attention", plain), ("with --ring-attention", ring)):
        if report is not None and report.get("error"):
            return 2, f"FAILED TO BUILD {name}: {report['error']}"
    if plain is not None and plain["problems"]:
        return 1, "NOT OK: ring attention is in the model without --ring-attention"
    if ring["problems"] or ring.get("forward_ok") is False:
        return 1, "NOT OK: --ring-attention does not take effect with this checkout"
    if ring.get("forward_ok") is None:
        return 0, ("OK: --ring-attention replaces every layer's core attention and RoPE (the forward pass needs "
                   "CUDA for this model, so what it runs was not checked)")
    return 0, "OK: --ring-attention replaces every layer's core attention, RoPE and the data split"


def _summary(report: dict) -> list[str]:
    if report.get("error"):
        trace = report.get("traceback", "").splitlines()[-12:]
        return [f"  error: {report['error']}", *("    " + line for line in trace)]
    kinds: dict[str, int] = {}
    for _, kind in report["layers"]:
        kinds[kind] = kinds.get(kind, 0) + 1
    lines = [f"  built through: {report['build_path']}",
             f"  core attention: {', '.join(f'{k} x{n}' for k, n in kinds.items()) or 'no attention layers'}",
             f"  RoPE: {', '.join(report['rope']) or 'none'}",
             f"  pretrain_gpt.py's get_batch_on_this_cp_rank: {report['script_split']}"]
    if "script_thd_split" in report:
        lines.append(f"  pretrain_gpt.py's get_thd_batch_on_this_cp_rank: {report['script_thd_split']}")
    if "forward" in report:
        lines.append(f"  forward + backward on CPU: {report['forward']}")
    lines += [f"  PROBLEM: {p}" for p in report["problems"]]
    return lines


def format_report(path: str, plain: dict | None, ring: dict) -> str:
    first = ring if not ring.get("error") or plain is None else plain
    lines = [f"Megatron-LM checkout: {os.path.abspath(path)}",
             f"  {first.get('megatron', 'megatron: not imported')}; Python {first.get('python')}, "
             f"torch {first.get('torch')}"]
    if "replaced" in first:
        lines.append("  replaced by megatron_patch.apply(): " + ", ".join(first["replaced"]))
        lines += [f"  NOT REPLACED (required): {name}: {why}" for name, why in first.get("missing", {}).items()]
    if plain is not None:
        lines += ["without --ring-attention:", *_summary(plain)]
    lines += ["with --ring-attention:", *_summary(ring)]
    lines.append(verdict(plain, ring)[1])
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_patch check", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default=".", help="the Megatron-LM checkout (holds pretrain_gpt.py)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the builds (default: this one)")
    parser.add_argument("--ring-only", action="store_true", help="skip the build without --ring-attention")
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.path, "pretrain_gpt.py")):
        parser.error(f"{args.path!r} holds no pretrain_gpt.py: pass the root of a Megatron-LM checkout")
    plain = None if args.ring_only else build(args.path, TINY_MODEL + extra, args.python)
    ring = build(args.path, TINY_MODEL + extra + ["--ring-attention"], args.python)
    print(format_report(args.path, plain, ring))
    return verdict(plain, ring)[0]
