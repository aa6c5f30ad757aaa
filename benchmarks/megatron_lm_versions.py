"""Issue 12: an unmodified Megatron-LM ``pretrain_gpt.py`` at several versions, with and without
``--ring-attention``, on one GPU (context-parallel 1, mock data): loss per step and ms per step.

Each version is a ``.tar.gz`` in ``--tgz-dir`` holding a Megatron-LM tree (``megatron/``,
``pretrain_gpt.py`` and, where the version has them, ``gpt_builders.py``, ``model_provider.py``),
made with ``git archive TAG ... | gzip``. Every run is

    python -m torch.distributed.run --nproc-per-node 1 -m megatron_patch pretrain_gpt.py FLAGS [--ring-attention]

in the unpacked tree, with Megatron's local transformer implementation (``--transformer-impl local``:
its ``DotProductAttention`` is the baseline). ``megatron_patch`` prints a guard line once the model is
built and after the first step; the "core attention" column comes from it. Results (``results.md``,
``results.json``) and every run's log (``logs.txt``) are written to ``--out`` after each run, so a run
stopped at its time limit still leaves the finished ones.

``--cpu`` is the dry run for a machine without a GPU: instead of training (Megatron-LM's ``pretrain``
needs CUDA) each version's tree builds the same flags, scaled down, through
``python -m megatron_patch check`` (the checkout's own ``pretrain_gpt.py`` on CPU, with and
without the flag), so unknown flags or a patch that does not take effect show up before GPU time is spent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["core_v0.16", "core_v0.17", "core_v0.18", "core_v0.19", "main"]
LOG_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+) \|"
                      r".*?lm loss: ([0-9.]+E[+-]\d+) \|")
GUARD_LINE = re.compile(r"megatron_patch: guard passed after the model was built: (.*)")
KERNEL_LINE = re.compile(r"megatron_patch: guard passed after the first step: .*?attention kernel: ([^;\n]+)")
MEMORY_LINE = re.compile(r"\(after \d+ iterations\) memory \(MB\) \|.*?max allocated: ([0-9.]+)")


def megatron_flags(seq: int, layers: int, hidden: int, heads: int, iters: int, vocab: int) -> list[str]:
    """The training flags of every run (the issue's: mock data, local transformer, bf16, one GPU)."""
    return [
        "--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(heads),
        "--seq-length", str(seq), "--max-position-embeddings", str(seq), "--micro-batch-size", "1",
        "--global-batch-size", "1", "--train-iters", str(iters), "--lr", "1e-4", "--lr-decay-style", "constant",
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab), "--bf16",
        "--transformer-impl", "local", "--position-embedding-type", "rope", "--attention-dropout", "0",
        "--hidden-dropout", "0", "--no-rope-fusion", "--no-masked-softmax-fusion", "--no-persist-layer-norm",
        "--no-gradient-accumulation-fusion", "--no-create-attention-mask-in-dataloader",
        "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000", "--seed", "1234",
    ]


def parse_log(text: str) -> dict:
    """Steps (iteration, ms, loss), the guard's line, the attention kernel the guard saw in the first step and
    the largest "max allocated" (MiB, torch's peak) of Megatron's memory reports, from one run's output."""
    steps = [{"iteration": int(i), "ms": float(ms), "loss": float(loss)} for i, ms, loss in LOG_LINE.findall(text)]
    guard, kernel = GUARD_LINE.search(text), KERNEL_LINE.search(text)
    memory = [float(mb) for mb in MEMORY_LINE.findall(text)]
    return {"steps": steps, "guard": guard.group(1).strip() if guard else None,
            "kernel": kernel.group(1).strip() if kernel else None, "max_allocated_mb": max(memory, default=None)}


def step_ms(steps: list[dict], skip: int = 5) -> float | None:
    """Median ms per step after the first ``skip`` steps (compilation, allocator warm-up)."""
    times = [s["ms"] for s in steps if s["iteration"] > skip]
    return statistics.median(times) if times else None


def version_name(tgz: Path) -> str:
    return tgz.name.removesuffix(".tar.gz")


def sort_key(name: str) -> tuple[int, str]:
    return next((i for i, prefix in enumerate(ORDER) if name.startswith(prefix)), len(ORDER)), name


def unpack(tgz: Path, where: Path) -> Path:
    tree = where / version_name(tgz)
    if not (tree / "pretrain_gpt.py").is_file():
        tree.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tgz) as archive:
            archive.extractall(tree, filter="data")
    return tree


def core_version(tree: Path) -> str:
    text = (tree / "megatron" / "core" / "package_info.py").read_text()
    return ".".join(re.search(rf"^{key}\s*=\s*(\d+)", text, re.M).group(1) for key in ("MAJOR", "MINOR", "PATCH"))


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


DOCUMENT_FLAGS = ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"]


def run_flags(flags: list[str], ring: bool) -> list[str]:
    """One run's flags: with ``--ring-attention`` for the ring run. With documents (``DOCUMENT_FLAGS``), the
    local run keeps Megatron's dense document mask from the data loader (its attention has no other way to
    see the documents); the ring run takes the boundaries from the EOD tokens and needs no mask."""
    if not ring and DOCUMENT_FLAGS[0] in flags:
        return [f for f in flags if f != "--no-create-attention-mask-in-dataloader"]
    return [*flags, "--ring-attention"] if ring else flags


def train(tree: Path, flags: list[str], ring: bool, timeout: float, port: int) -> dict:
    """One ``torchrun -m megatron_patch pretrain_gpt.py`` run in ``tree``; its parsed log and the log."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(port),
               "-m", "megatron_patch", "pretrain_gpt.py", *run_flags(flags, ring)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONUNBUFFERED="1")
    start = time.time()
    try:
        run = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        text, status = run.stdout + run.stderr, run.returncode
    except subprocess.TimeoutExpired as error:
        text = _text(error.stdout) + _text(error.stderr)
        status = f"timed out after {timeout:.0f} s"
    parsed = parse_log(text)
    return {"status": status, "wall_s": round(time.time() - start, 1), "command": " ".join(command[1:]), **parsed,
            "log": text}


def summarize(name: str, version: str, ring: bool, run: dict) -> dict:
    steps = run["steps"]
    return {"version": name, "megatron_core": version, "attention": "ring" if ring else "Megatron local",
            "status": run["status"], "core_attention": run.get("guard"), "attention_kernel": run.get("kernel"),
            "steps": len(steps),
            "loss_last": steps[-1]["loss"] if steps else None, "ms_per_step": step_ms(steps),
            "wall_s": run["wall_s"], "losses": [s["loss"] for s in steps], "ms": [s["ms"] for s in steps]}


def write_results(out: Path, rows: list[dict], meta: dict, logs: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
    (out / "logs.txt").write_text("\n".join(logs))
    lines = [f"# Megatron-LM versions x --ring-attention ({meta['date']})", "", f"Environment: {meta['environment']}",
             "", f"Flags of every run: `{' '.join(meta['flags'])}`", "",
             "| version | megatron-core | attention | core attention (megatron_patch's guard) | status | loss at last "
             "step | max abs loss diff vs local | ms/step (median of steps 6+) | speed-up |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    local = {r["version"]: r for r in rows if r["attention"] != "ring"}
    for r in rows:
        base = local.get(r["version"])
        diff = speed = ""
        if r["attention"] == "ring" and base and base["losses"] and r["losses"]:
            n = min(len(base["losses"]), len(r["losses"]))
            diff = f"{max(abs(a - b) for a, b in zip(base['losses'][:n], r['losses'][:n])):.2e} over {n} steps"
            if base["ms_per_step"] and r["ms_per_step"]:
                speed = f"{base['ms_per_step'] / r['ms_per_step']:.2f}x"
        loss = f"{r['loss_last']:.4f} (step {r['steps']})" if r["loss_last"] is not None else "-"
        ms = f"{r['ms_per_step']:.1f}" if r["ms_per_step"] else "-"
        lines.append(f"| {r['version']} | {r['megatron_core']} | {r['attention']} | {r['core_attention'] or '-'} | "
                     f"{r['status']} | {loss} | {diff} | {ms} | {speed} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def environment() -> str:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{gpu}; torch {torch.__version__}; CUDA {torch.version.cuda}; python {platform.python_version()}"


def dry_run(trees: list[tuple[str, Path]], flags: list[str]) -> int:
    """``--cpu``: every tree builds these flags (plus CPU ones) through ``megatron_patch check``."""
    cpu = [f for f in flags if f != "--bf16"] + ["--use-cpu-initialization", "--no-bias-dropout-fusion",
                                                  "--no-bias-swiglu-fusion"]
    worst = 0
    for name, tree in trees:
        run = subprocess.run([sys.executable, "-m", "megatron_patch", "check", str(tree), "--", *cpu], cwd=ROOT,
                             capture_output=True, text=True)
        print(f"=== {name}\n{run.stdout}{run.stderr[-2000:] if run.returncode else ''}", flush=True)
        worst = max(worst, run.returncode)
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tgz-dir", type=Path, default=ROOT / ".megatron_tgz")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/megatron_lm_versions")))
    parser.add_argument("--work", type=Path, default=Path("/tmp/megatron_lm_versions"), help="where trees unpack")
    parser.add_argument("--versions", nargs="*", help="names of tgz files (without .tar.gz); default: all")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--seq-length", type=int, default=8192)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--run-timeout-s", type=float, default=150)
    parser.add_argument("--deadline-s", type=float, default=560, help="start no run after this many seconds")
    parser.add_argument("--previous", type=Path, help="a results.json of an earlier call: its runs of versions "
                        "not run now are kept in the table")
    parser.add_argument("--cpu", action="store_true", help="dry run without a GPU (see the module docstring)")
    parser.add_argument("--documents", action="store_true", help="packed documents: " + " ".join(DOCUMENT_FLAGS)
                        + " (mock data ends each document with EOD); the local run uses Megatron's dense mask")
    args = parser.parse_args()

    names = sorted((version_name(t) for t in args.tgz_dir.glob("*.tar.gz")), key=sort_key)
    names = [n for n in names if not args.versions or n in args.versions]
    if not names:
        sys.exit(f"no Megatron-LM trees (*.tar.gz) in {args.tgz_dir} matching {args.versions}")
    trees = [(n, unpack(args.tgz_dir / f"{n}.tar.gz", args.work)) for n in names]
    flags = megatron_flags(args.seq_length, args.num_layers, args.hidden_size, args.heads, args.iters, args.vocab_size)
    flags += DOCUMENT_FLAGS if args.documents else []
    if args.cpu:
        return dry_run(trees, megatron_flags(64, 2, 64, 4, 1, 128) + (DOCUMENT_FLAGS if args.documents else []))
    meta = {"date": datetime.date.today().isoformat(), "environment": environment(), "flags": flags,
            "launcher": "python -m torch.distributed.run --nproc-per-node 1 -m megatron_patch pretrain_gpt.py",
            "versions": {n: core_version(t) for n, t in trees}}
    rows, logs, start = [], [], time.time()
    if args.previous:
        earlier = json.loads(args.previous.read_text())
        rows = [r for r in earlier["runs"] if r["version"] not in names]
        meta["versions"] = {**earlier["meta"]["versions"], **meta["versions"]}
        meta["earlier_call"] = earlier["meta"]["environment"] + "; " + earlier["meta"]["date"]
    for i, (name, tree) in enumerate(trees):
        for ring in (False, True):
            if time.time() - start > args.deadline_s:
                rows.append(summarize(name, meta["versions"][name], ring, {"status": "not run (deadline)",
                                                                           "wall_s": 0, "steps": []}))
                continue
            run = train(tree, flags, ring, args.run_timeout_s, 29500 + 2 * i + ring)
            rows.append(summarize(name, meta["versions"][name], ring, run))
            logs.append(f"===== {name} {'ring' if ring else 'local'}: {run['command']} (status {run['status']}, "
                        f"{run['wall_s']} s)\n{run['log'][-60000:]}")
            write_results(args.out, rows, meta, logs)
            print(f"{name} {'ring ' if ring else 'local'}: status {run['status']}, {len(run['steps'])} steps, "
                  f"{step_ms(run['steps'])} ms/step, {run['wall_s']} s; guard: {run.get('guard')}", flush=True)
    write_results(args.out, rows, meta, logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
