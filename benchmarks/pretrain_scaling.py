"""Long-context pretraining on one node (issue 7): how long a context trains, how fast, and whether
ring attention learns what the same model learns without it.

Runs ``launch/pretrain_gpt.py`` under the DeepSpeed launcher again and again, one process per GPU
(or per CPU rank, gloo, tiny sizes), and collects what each run's metrics file says.

Parts (``--parts``, default both):

- ``scaling``: for every setup (``--setups``), sequence lengths doubling from ``--start-seq`` up to
  ``--max-seq`` or the first out-of-memory: tokens/s per GPU (median over the iterations after
  the first two), model FLOPs utilisation and rank 0's peak memory. A setup is
  ``NAME:ring=R,tp=T``; ``ring=0`` is the baseline, the same model with dense attention on
  whole sequences (data parallel). Micro batch 1 per rank, one sequence per data replica.
- ``loss``: the first ``--loss-iters`` steps of two setups (``--loss-setups A B``, e.g. ring 8
  and ring 2 × data 4) on the same data and global batch (gradient accumulation makes up the
  difference), overlaid in ``loss.png``, with their largest relative loss difference.

MFU = tokens/s per GPU × model FLOPs per token ÷ the GPU's peak bf16 FLOP/s (``--peak-tflops``;
989 for H100 / H200 SXM). Model FLOPs per token, training (forward + backward), as Megatron-LM counts
them: 6·N + 6·L·h·s, where N is the matmul parameters (QKV, attention output projection, MLP, and the
output layer's h·V: the vocabulary is counted; the input embedding and the norms are not matmuls),
L the layers, h the hidden size (heads × head_dim) and s the sequence length: 6·L·h·s is causal
attention, half of the 12·L·h·s of full attention (QKᵀ and PV, forward and backward).
Recomputation is not counted: it is hardware work. ``results.md`` states the formula with the numbers.

``--megatron-lm TREE``: the same model at the same lengths through Megatron-LM's own ``pretrain_gpt.py``
in ``TREE`` (a ``git archive`` of github.com/NVIDIA/Megatron-LM), one GPU, context-parallel 1, its local
transformer, mock data, ``python -m megatron_patch ... --ring-attention``; no recomputation, or full
recomputation of every layer when that runs out of memory. Its rows are named ``megatron-lm``; tokens/s come
from Megatron's "elapsed time per iteration" (median after the first 5 steps), peak memory from its "max allocated".
Every row names the attention kernel its run used (our job's start line, megatron_patch's first-step guard);
``results.md`` says in bold when the runs of one length used different kernels.

``--recompute-granularity`` and ``--fused-kernels`` go to every run (default: the job's, auto; each
run's log says what auto chose, and ``results.json`` keeps those lines).

    python benchmarks/pretrain_scaling.py --out benchmarks/results/h200x8-pretrain      # 8 GPUs
    python benchmarks/pretrain_scaling.py --out /tmp/ps --nproc 2 --dry-run              # CPU, tiny

Writes ``results.md``, ``results.json`` (every number, command, environment) and ``scaling.png``
/ ``loss.png`` into ``--out``; each run's log and metrics file go to ``--out/runs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import plots  # noqa: E402
from benchmarks.common import command_line, env_line, environment, table, write_results  # noqa: E402

# A Llama-style model of the 1B class (TinyLlama's shape, 1.1B parameters with its vocabulary of 32000):
# GQA, RoPE, SwiGLU, RMSNorm, no biases, bf16. The recall task's tokens sit in the 32000-token vocabulary.
LLAMA_1B = ("--num-layers 22 --hidden-size 2048 --ffn-hidden-size 5632 --num-attention-heads 32 "
            "--num-query-groups 4 --position-embedding-type rope --swiglu --normalization RMSNorm "
            "--disable-bias-linear --bf16 --vocab-size 32000 --lr 3e-4 --lr-warmup-iters 10")
PASSED = ("recompute_granularity", "fused_kernels")  # the script's options that every run gets
TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-query-groups 2 --swiglu "
        "--normalization RMSNorm --disable-bias-linear --lr 1e-2")


def parse_setup(text: str) -> tuple[str, int, int]:
    """``NAME:ring=R,tp=T`` → (name, ring, tp)."""
    name, _, spec = text.partition(":")
    values = {"ring": 1, "tp": 1}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in values or not value.isdigit():
            raise ValueError(f"--setups {text!r}: write NAME:ring=R,tp=T (ring=0: dense attention baseline)")
        values[key] = int(value)
    return name, values["ring"], values["tp"]


def model_shape(model_args: list[str], seq: int) -> dict:
    """N (matmul parameters, output layer included), L, h, s and V of the runs (see the module docstring)."""
    from launch import data
    from launch.args import build_parser

    a = build_parser().parse_args(model_args + ["--seq-length", str(seq)])
    h, heads = a.hidden_size, a.num_attention_heads
    dh, groups = h // heads, a.num_query_groups or heads
    ffn = a.ffn_hidden_size or 4 * h
    vocab = max(a.vocab_size or 0, data.RecallTask(seq, a.recall_keys, a.recall_values).vocab_size)
    per_layer = h * dh * (heads + 2 * groups) + heads * dh * h + (3 if a.swiglu else 2) * h * ffn
    return {"N": a.num_layers * per_layer + h * vocab, "L": a.num_layers, "h": heads * dh, "s": seq, "V": vocab}


def flops_per_token(model_args: list[str], seq: int) -> float:
    """Training model FLOPs per token: 6·N + 6·L·h·s (see the module docstring)."""
    m = model_shape(model_args, seq)
    return 6 * m["N"] + 6 * m["L"] * m["h"] * m["s"]


def mfu_formula(model_args: list[str], peak_tflops: float | None) -> str:
    """The MFU formula of the results, with this model's numbers."""
    m = model_shape(model_args, 4096)  # any length: the formula keeps s
    return (f"MFU = tokens/s per GPU × (6·N + 6·L·h·s) / ({peak_tflops or 'peak'} × 10¹² FLOP/s): N = {m['N']:,} "
            f"matmul parameters (QKV, attention output, MLP, and the output layer h·V with V = {m['V']}), "
            f"L = {m['L']} layers, h = {m['h']}, s = the sequence length (6·L·h·s: causal attention, forward and "
            "backward); recomputation not counted")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(base: dict, path: str, ring: int, global_batch: int) -> None:
    config = {k: v for k, v in base.items() if not k.startswith("_") and k != "gradient_accumulation_steps"}
    config.update(train_micro_batch_size_per_gpu=1, train_batch_size=global_batch)
    if ring:
        config["ring_attention"] = {**base.get("ring_attention", {}), "size": ring}
    else:
        config.pop("ring_attention", None)
    with open(path, "w") as f:
        json.dump(config, f, indent=1)


def run_job(opts, name: str, ring: int, tp: int, seq: int, iters: int, global_batch: int) -> dict:
    """One launch of the job; returns its command, status and per-iteration metrics."""
    tag = f"{name}-seq{seq}-it{iters}"
    runs = os.path.join(opts.out, "runs")
    os.makedirs(runs, exist_ok=True)
    config, metrics, log = (os.path.join(runs, f"{tag}.{ext}") for ext in ("json", "jsonl", "log"))
    if os.path.exists(metrics):  # the job appends to it
        os.remove(metrics)
    with open(opts.config) as f:
        write_config(json.load(f), config, ring, global_batch)
    command = [*opts.deepspeed, "--num_gpus", str(opts.nproc), "--master_port", str(_port()),
               os.path.join(ROOT, "launch", "pretrain_gpt.py"), "--deepspeed_config", config,
               *(["--ring-attention"] if ring else []), "--tensor-model-parallel-size", str(tp),
               "--seq-length", str(seq), *opts.model_args, "--train-iters", str(iters), "--eval-interval",
               str(iters), "--eval-iters", "1", "--no-progress", "--metrics-file", metrics]
    print(f"[{tag}] {shlex.join(command)}", flush=True)
    with open(log, "w") as out:
        try:
            done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=opts.run_timeout)
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    text = open(log, errors="replace").read()
    said = {key: next((line.strip() for line in text.splitlines() if line.startswith(f"{key}: ")), None)
            for key in ("recompute", "fused kernels", "attention kernel")}
    kernel = said["attention kernel"] and said["attention kernel"].removeprefix("attention kernel: ")
    rows = [json.loads(line) for line in open(metrics)] if os.path.exists(metrics) else []
    train = [r for r in rows if r["kind"] == "train"]
    status = "ok" if code == 0 and len(train) == iters else (
        "out of memory" if "out of memory" in text.lower() or "OutOfMemoryError" in text else f"failed ({code})")
    if status.startswith("failed"):
        print(f"[{tag}] {status}; the end of its log:\n{text[-3000:]}", flush=True)
    return {"name": name, "ring": ring, "tp": tp, "seq": seq, "status": status, "command": shlex.join(command),
            "log": os.path.relpath(log, opts.out), "mfu": None, "recompute": said["recompute"],
            "fused_kernels": said["fused kernels"], "train": train,
            "attention_kernel": kernel}


def scaling(opts) -> list[dict]:
    results = []
    for name, ring, tp in map(parse_setup, opts.setups):
        replicas = opts.nproc // (max(ring, 1) * tp)
        seq = opts.start_seq
        while seq <= opts.max_seq:
            r = run_job(opts, name, ring, tp, seq, opts.iters, replicas)
            timed = r["train"][2:] or r["train"]
            if r["status"] == "ok":
                r["tokens_per_s_per_gpu"] = statistics.median(t["tokens_per_s"] for t in timed) / opts.nproc
                r["flops_per_token"] = flops_per_token(opts.model_args, seq)
                r["mfu"] = (r["tokens_per_s_per_gpu"] * r["flops_per_token"] / (opts.peak_tflops * 1e12)
                            if opts.peak_tflops else None)
                r["peak_memory_mb"] = max(t["memory_mb"] for t in r["train"])
            results.append(r)
            print(f"[{name} seq {seq}] {r['status']}"
                  + (f": {r['tokens_per_s_per_gpu']:.0f} tokens/s per GPU, {r['peak_memory_mb']:.0f} MB"
                     if r["status"] == "ok" else ""), flush=True)
            if r["status"] != "ok":
                break
            seq *= 2
    return results


def megatron_lm_flags(model_args: list[str], seq: int, iters: int) -> list[str]:
    """Megatron-LM ``pretrain_gpt.py`` flags for our model flags (the shape, RoPE, SwiGLU, RMSNorm, bf16)."""
    from benchmarks.megatron_lm_versions import megatron_flags
    from launch.args import build_parser

    a = build_parser().parse_args(model_args + ["--seq-length", str(seq)])
    flags = megatron_flags(seq, a.num_layers, a.hidden_size, a.num_attention_heads, iters,
                           model_shape(model_args, seq)["V"])
    flags += ["--ffn-hidden-size", str(a.ffn_hidden_size or 4 * a.hidden_size), "--lr", str(a.lr)]
    if a.num_query_groups and a.num_query_groups != a.num_attention_heads:
        flags += ["--group-query-attention", "--num-query-groups", str(a.num_query_groups)]
    flags += [f for f, on in (("--swiglu", a.swiglu), ("--disable-bias-linear", not a.add_bias_linear)) if on]
    flags += ["--normalization", a.normalization]
    return flags


def megatron_lm(opts) -> list[dict]:
    """Megatron-LM's ``pretrain_gpt.py`` with ``--ring-attention`` at every length of the scaling part."""
    from benchmarks.megatron_lm_versions import step_ms, train

    full = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    results, seq = [], opts.start_seq
    while seq <= opts.max_seq:
        for recompute in ([], full):
            run = train(Path(opts.megatron_lm), megatron_lm_flags(opts.model_args, seq, opts.iters) + recompute,
                        ring=True, timeout=opts.run_timeout, port=_port())
            log = os.path.join(opts.out, "runs", f"megatron-lm-seq{seq}{'-full' if recompute else ''}.log")
            os.makedirs(os.path.dirname(log), exist_ok=True)
            with open(log, "w") as f:
                f.write(run["log"])
            oom = "out of memory" in run["log"].lower()
            if not oom:
                break
        ms = step_ms(run["steps"])
        ok = run["status"] == 0 and ms is not None and run["guard"] is not None
        r = {"name": "megatron-lm", "ring": 1, "tp": 1, "seq": seq, "command": run["command"],
             "log": os.path.relpath(log, opts.out), "mfu": None, "recompute": "full" if recompute else "none",
             "fused_kernels": None, "core_attention": run["guard"], "attention_kernel": run["kernel"],
             "train": run["steps"],
             "status": "ok" if ok else ("out of memory" if oom else f"failed ({run['status']})")}
        if ok:
            r["tokens_per_s_per_gpu"] = seq / (ms / 1000)
            r["flops_per_token"] = flops_per_token(opts.model_args, seq)
            r["mfu"] = r["tokens_per_s_per_gpu"] * r["flops_per_token"] / (opts.peak_tflops * 1e12) \
                if opts.peak_tflops else None
            # torch's peak, as our job reports it; Megatron prints it after the first steps (training.py)
            r["peak_memory_mb"] = run["max_allocated_mb"] if run["max_allocated_mb"] is not None else float("nan")
        results.append(r)
        print(f"[megatron-lm seq {seq}] {r['status']}" + (f": {r['tokens_per_s_per_gpu']:.0f} tokens/s" if ok else ""),
              flush=True)
        if not ok:
            break
        seq *= 2
    return results


def loss_overlay(opts) -> dict:
    setups = [parse_setup(s) for s in opts.loss_setups]
    runs = [run_job(opts, name, ring, tp, opts.loss_seq, opts.loss_iters, opts.loss_batch)
            for name, ring, tp in setups]
    out = {"setups": [name for name, _, _ in setups], "seq": opts.loss_seq, "global_batch": opts.loss_batch,
           "runs": runs}
    if all(r["status"] == "ok" for r in runs):
        a, b = ([t["loss"] for t in r["train"]] for r in runs)
        out["max_rel_loss_diff"] = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    return out


def earlier_rows(path: str, now: list[dict]) -> list[dict]:
    """The scaling rows of an earlier call's results.json whose (setup, seq) this call did not run, each marked
    with that call's GPU and date (``previous``)."""
    with open(path) as f:
        earlier = json.load(f)
    env, done = earlier["environment"], {(r["name"], r["seq"]) for r in now}
    mark = f"{env.get('gpu', '?')}, {env.get('date', '?')}"
    return [{**r, "previous": mark} for r in earlier["scaling"] if (r["name"], r["seq"]) not in done]


def kernel_mismatches(rows: list[dict]) -> list[str]:
    """One line for each sequence length whose runs did not all compute attention with the same kernel (then
    their tokens/s compare kernels, not jobs), e.g. Megatron-LM without FlashAttention-4 beside our job with it."""
    kernels: dict[int, dict[str, str]] = {}
    for r in rows:
        if r["status"] == "ok":
            kernels.setdefault(r["seq"], {})[r["name"]] = r.get("attention_kernel") or "not reported"
    return [f"seq {seq}: " + ", ".join(f"{name} {kernel}" for name, kernel in by_name.items())
            for seq, by_name in sorted(kernels.items()) if len(set(by_name.values())) > 1]


def write_report(opts, env: dict, scaled: list[dict], loss: dict | None) -> None:
    lines = [f"# Pretraining on one node: {opts.nproc} ranks", "", env_line(env), "",
             f"Command: `{command_line()}`", "", f"Model flags: `{shlex.join(opts.model_args)}`", "",
             mfu_formula(opts.model_args, opts.peak_tflops), ""]
    if scaled:
        mismatches = kernel_mismatches(scaled)
        rows = []
        for r in scaled:
            ok = r["status"] == "ok"
            mfu = f"{100 * r['mfu']:.1f}%" if ok and r["mfu"] is not None else "—"
            name = r["name"] + (" *" if r.get("previous") else "")
            rows.append([name, r["seq"], r["status"], *([f"{r['tokens_per_s_per_gpu']:.0f}", mfu,
                                                             f"{r['peak_memory_mb']:.0f}"] if ok else ["—"] * 3),
                         r.get("attention_kernel") or "—"])
        longest = {}
        for r in scaled:
            if r["status"] == "ok":
                longest[r["name"]] = max(longest.get(r["name"], 0), r["seq"])
        lines += ["## Sequence length", "",
                  *table(["setup", "seq", "status", "tokens/s per GPU", "MFU", "peak memory (MB)",
                          "attention kernel"], rows), "",
                  *([f"**Not like for like**: the runs of one length used different attention kernels "
                     f"({'; '.join(mismatches)})", ""] if mismatches else []),
                  *(["\\* from an earlier call (`--previous`): "
                     + ", ".join(sorted({r["previous"] for r in scaled if r.get("previous")})), ""]
                    if any(r.get("previous") for r in scaled) else []),
                  "What each run chose (`--recompute-granularity`, `--fused-kernels`):", "",
                  *(f"- {r['name']} seq {r['seq']}: {r['recompute'] or '—'}; {r['fused_kernels'] or '—'}"
                    for r in scaled),
                  "", "Longest context that trained: " + ", ".join(f"{n} {s}" for n, s in longest.items()), ""]
    if loss:
        diff = loss.get("max_rel_loss_diff")
        lines += ["## Loss, two setups on the same data", "",
                  f"{loss['setups'][0]} vs {loss['setups'][1]}, seq {loss['seq']}, "
                  f"global batch {loss['global_batch']}: "
                  + (f"largest relative loss difference over {opts.loss_iters} steps {diff:.2e} (`loss.png`)"
                     if diff is not None else "did not complete: " + ", ".join(r["status"] for r in loss["runs"])), ""]
    write_results(opts.out, "\n".join(lines), {"environment": env, "argv": sys.argv,
                                               "mfu_formula": mfu_formula(opts.model_args, opts.peak_tflops),
                                               "peak_tflops": opts.peak_tflops, "scaling": scaled, "loss": loss})
    plot(opts.out, scaled, loss)
    print("\n".join(lines), flush=True)


def plot(out: str, scaled: list[dict], loss: dict | None) -> None:
    ok = [r for r in scaled if r["status"] == "ok"]
    if ok:
        fig, axes = plots.figure(3, (16, 4))
        for name in dict.fromkeys(r["name"] for r in ok):
            rows = [r for r in ok if r["name"] == name]
            seqs = [r["seq"] for r in rows]
            axes[0].plot(seqs, [r["tokens_per_s_per_gpu"] for r in rows], "o-", label=name)
            axes[1].plot(seqs, [100 * r["mfu"] if r["mfu"] is not None else float("nan") for r in rows], "o-",
                         label=name)
            axes[2].plot(seqs, [r["peak_memory_mb"] / 1024 for r in rows], "o-", label=name)
        for ax, label in zip(axes, ("tokens/s per GPU", "MFU (%)", "peak memory, rank 0 (GiB)")):
            plots.label(ax, xlabel="sequence length", ylabel=label, log2=True)
        plots.save(fig, os.path.join(out, "scaling.png"))
    if loss and all(r["status"] == "ok" for r in loss["runs"]):
        fig, (ax,) = plots.figure(1, (6, 4))
        for r, style in zip(loss["runs"], ("-", "--")):
            ax.plot([t["iteration"] for t in r["train"]], [t["loss"] for t in r["train"]], style, lw=1, label=r["name"])
        plots.label(ax, xlabel="iteration", ylabel="training loss")
        ax.set_title(f"seq {loss['seq']}, global batch {loss['global_batch']}", fontsize=9)
        plots.save(fig, os.path.join(out, "loss.png"))


def main(argv: list[str] | None = None) -> int:
    import torch

    gpus = torch.cuda.device_count()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--parts", default="scaling,loss")
    p.add_argument("--nproc", type=int, default=gpus or 2, help="ranks (default: the GPUs, else 2 CPU ranks)")
    p.add_argument("--dry-run", action="store_true", help="tiny model and lengths (what CPU runs use anyway)")
    p.add_argument("--config", default=None, help="base DeepSpeed config (default: node_8gpu.json, cpu_demo.json)")
    p.add_argument("--model", default=None, help=f"model and training flags (default: {LLAMA_1B!r})")
    p.add_argument("--setups", nargs="*", default=None,
                   help="NAME:ring=R,tp=T ... (default: ring8, tp2ring4, dense baseline; CPU: ring2, dense); "
                        "none at all with --megatron-lm: only Megatron-LM's runs")
    p.add_argument("--previous", default=None, metavar="RESULTS_JSON",
                   help="results.json of an earlier call on the same machine: its scaling rows of setups and "
                        "lengths not run now join this report and plot (marked as from that call)")
    p.add_argument("--start-seq", type=int, default=None)
    p.add_argument("--max-seq", type=int, default=None)
    p.add_argument("--iters", type=int, default=None, help="training steps per scaling run")
    p.add_argument("--loss-setups", nargs=2, default=None,
                   help="two setups, NAME:ring=R,tp=T (default: ring 8 and ring 2 × data 4; below 4 ranks: "
                        "ring W and dense)")
    p.add_argument("--loss-seq", type=int, default=None)
    p.add_argument("--loss-iters", type=int, default=None)
    p.add_argument("--loss-batch", type=int, default=None, help="global batch of the loss runs")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s per GPU (default 989 on GPUs)")
    p.add_argument("--run-timeout", type=float, default=1800)
    p.add_argument("--megatron-lm", default=None, metavar="TREE",
                   help="also run Megatron-LM's pretrain_gpt.py in TREE at the same lengths (one GPU)")
    p.add_argument("--recompute-granularity", choices=["auto", "none", "selective", "full"], default=None,
                   help="passed to every run (default: the job's, auto)")
    p.add_argument("--fused-kernels", choices=["auto", "liger", "none"], default=None,
                   help="passed to every run (default: the job's, auto)")
    opts = p.parse_args(argv)
    tiny = opts.dry_run or not gpus
    n = opts.nproc
    defaults = dict(
        config=os.path.join(ROOT, "deepspeed_configs", "node_8gpu.json" if gpus else "cpu_demo.json"),
        model=(TINY + (" --bf16" if gpus else "")) if tiny else LLAMA_1B,
        setups=[f"ring{n}:ring={n}", "dense:ring=0"] + ([f"tp2ring{n // 2}:ring={n // 2},tp=2"] if n >= 4 else []),
        start_seq=64 if tiny else 32768, max_seq=128 if tiny else 2**21, iters=3 if tiny else 10,
        loss_setups=[f"ring{n}:ring={n}", f"ring2data{n // 2}:ring=2" if n >= 4 else "dense:ring=0"],
        loss_seq=64 if tiny else 32768, loss_iters=4 if tiny else 300, loss_batch=n,
        peak_tflops=None if not gpus else 989.0)
    for key, value in defaults.items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    opts.model_args = shlex.split(opts.model)
    for name in PASSED:
        if getattr(opts, name) is not None:
            opts.model_args += [f"--{name.replace('_', '-')}", getattr(opts, name)]
    # the launcher's module, so a DeepSpeed installed with --target (no bin/ script) works too
    opts.deepspeed = [sys.executable, "-m", "deepspeed.launcher.runner"]
    os.makedirs(opts.out, exist_ok=True)
    parts = opts.parts.split(",")
    if set(parts) - {"scaling", "loss"}:
        raise ValueError(f"--parts {opts.parts!r}: choose from scaling, loss")
    env = environment()
    if "scaling" in parts and not opts.setups and not opts.megatron_lm:
        raise ValueError("--setups: none given and no --megatron-lm: name at least one setup, NAME:ring=R,tp=T")
    if opts.megatron_lm and opts.nproc != 1:
        raise ValueError(f"--megatron-lm runs on one GPU (context-parallel 1): pass --nproc 1, not {opts.nproc}")
    scaled = scaling(opts) if "scaling" in parts else []
    scaled += megatron_lm(opts) if opts.megatron_lm else []
    scaled = earlier_rows(opts.previous, scaled) + scaled if opts.previous else scaled
    loss = loss_overlay(opts) if "loss" in parts else None
    write_report(opts, env, scaled, loss)
    broken = [r for r in scaled if r["status"].startswith("failed")]
    broken += [r for r in (loss or {}).get("runs", []) if r["status"] != "ok"]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
