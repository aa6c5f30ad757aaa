"""Speed of the block kernels and of the ring on one GPU, beside PyTorch's own fused attention.

    python benchmarks/bench_attention.py --out benchmarks/results/h100

1. Block kernels: forward and forward+backward TFLOP/s (4·b·h·s²·d for the forward, half when
   causal, ×3.5 for forward+backward) of our backends (``triton``; ``sdpa`` = cuDNN through our
   backend, merge into the float32 state included) beside PyTorch's cuDNN and flash SDPA, in one
   run; bf16, batch·seq = 16k tokens, 16 heads, head_dim 64 and 128.
2. The ring on one GPU: a simulated ring of W ranks (causal; striped, zigzag, contiguous), 32
   query heads, 8 KV heads, head_dim 128: throughput as a fraction of one monolithic cuDNN
   attention over the same whole sequence, forward and forward+backward, both timed over calls
   run back to back (as in training, the host runs ahead of the GPU); peak memory per rank
   (peak of the simulated run ÷ W).
Writes results.md, results.json and results.png under --out.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import plots  # noqa: E402
from benchmarks.common import (  # noqa: E402
    attention_flops,
    bench_ms,
    command_line,
    env_line,
    environment,
    fmt,
    randn,
    sdpa_kernel,
    table,
    throughput_ms,
    write_results,
)
from ring_sp import kernels, ring_attention_simulated, split  # noqa: E402
from ring_sp.kernels import Band, State, Visibility  # noqa: E402

TORCH_SDPA = {"torch-cudnn": "cudnn", "torch-flash": "flash"}


def block_row(backend: str, s: int, d: int, causal: bool, heads: int = 16, tokens: int = 16384) -> dict:
    b = max(1, tokens // s)
    q, k, v, do = randn(b, s, heads, d), randn(b, s, heads, d), randn(b, s, heads, d), randn(b, s, heads, d)
    fl = attention_flops(b, heads, s, s, d, causal)
    if backend in TORCH_SDPA:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel(TORCH_SDPA[backend]):
            t_f = bench_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
            qg, kg, vg = (t.detach().requires_grad_() for t in (qt, kt, vt))
            dot = do.transpose(1, 2)
            t_fb = bench_ms(lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal).backward(dot))
    else:
        impl = kernels.get(backend)
        band = Band(lo=0) if causal else Band()
        scale = d ** -0.5
        state = State.empty(q)
        t_f = bench_ms(lambda: impl.forward(q, k, v, state, Visibility(band), scale))
        state = State.empty(q)
        impl.forward(q, k, v, state, Visibility(band), scale)
        out, lse = state.output().to(q.dtype), state.lse
        delta = (do.float() * out.float()).sum(-1).transpose(1, 2)
        dq = torch.zeros(q.shape, device="cuda")
        dk, dv = torch.zeros(k.shape, device="cuda"), torch.zeros(v.shape, device="cuda")
        t_b = bench_ms(lambda: impl.backward(do, q, k, v, out, lse, delta, dq, dk, dv, Visibility(band), scale))
        t_fb = t_f + t_b
    return dict(backend=backend, seq=s, head_dim=d, causal=causal, batch=b, heads=heads,
                fwd_tflops=fl / t_f / 1e9, fwd_bwd_tflops=3.5 * fl / t_fb / 1e9, fwd_ms=t_f, fwd_bwd_ms=t_fb)


def ring_rows(world: int, local: int, layouts, backends, heads=32, kv_heads=8, d=128) -> list[dict]:
    seq = world * local
    q, k, v, do = randn(1, seq, heads, d), randn(1, seq, kv_heads, d), randn(1, seq, kv_heads, d), \
        randn(1, seq, heads, d)
    fl = attention_flops(1, heads, seq, seq, d, True)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel("cudnn"):
        mono_f = throughput_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True))
        qg, kg, vg = (t.detach().requires_grad_() for t in (qt, kt, vt))
        dot = do.transpose(1, 2)
        mono_fb = throughput_ms(lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True,
                                                                       enable_gqa=True).backward(dot))
    rows = [dict(kind="monolithic cuDNN", world=world, local=local, seq=seq, fwd_ms=mono_f, fwd_bwd_ms=mono_fb,
                 fwd_tflops=fl / mono_f / 1e9, fwd_bwd_tflops=3.5 * fl / mono_fb / 1e9)]
    for layout, backend in itertools.product(layouts, backends):
        qs, ks, vs, dos = (split(t, layout, world) for t in (q, k, v, do))
        fwd = lambda: ring_attention_simulated(qs, ks, vs, causal=True, layout=layout, backend=backend)  # noqa: E731
        t_f = throughput_ms(fwd)
        qg_, kg_, vg_ = ([t.detach().requires_grad_() for t in ts] for ts in (qs, ks, vs))

        def fwd_bwd():
            outs = ring_attention_simulated(qg_, kg_, vg_, causal=True, layout=layout, backend=backend)
            torch.autograd.backward(outs, dos)

        t_fb = throughput_ms(fwd_bwd)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / world / 2**20
        rows.append(dict(kind=f"ring {layout} {backend}", world=world, local=local, seq=seq, fwd_ms=t_f,
                         fwd_bwd_ms=t_fb, fwd_tflops=fl / t_f / 1e9, fwd_bwd_tflops=3.5 * fl / t_fb / 1e9,
                         fwd_ratio=mono_f / t_f, fwd_bwd_ratio=mono_fb / t_fb, peak_mib_per_rank=peak))
    return rows


def plot(block: list[dict], ring: list[dict], path: str) -> None:
    fig, axes = plots.figure(3, (18, 5))
    for ax, d in zip(axes[:2], (128, 64)):
        for (backend, causal), style in zip(itertools.product(sorted({r["backend"] for r in block}), (False, True)),
                                            itertools.cycle(["-", "--"])):
            rows = [r for r in block if r["backend"] == backend and r["causal"] == causal and r["head_dim"] == d]
            if rows:
                ax.plot([r["seq"] for r in rows], [r["fwd_bwd_tflops"] for r in rows], style, marker="o",
                        label=f"{backend}{' causal' if causal else ''}")
        plots.label(ax, xlabel="sequence length", ylabel="TFLOP/s", title=f"block kernels, fwd+bwd, head_dim {d}, bf16",
                    log2=True, legend_size=7)
    ax = axes[2]
    locals_ = sorted({r["local"] for r in ring})
    kinds = [k for k in dict.fromkeys(r["kind"] for r in ring) if k != "monolithic cuDNN"]
    plots.grouped_bars(ax, [f"{n // 1024}k/rank" for n in locals_], {
        kind: [next((r["fwd_bwd_ratio"] for r in ring if r["kind"] == kind and r["local"] == n), 0) for n in locals_]
        for kind in kinds})
    ax.axhline(0.9, color="k", lw=0.8, ls=":")
    plots.label(ax, title=f"simulated ring W={ring[0]['world']}, causal, fwd+bwd / monolithic cuDNN", legend_size=7)
    plots.save(fig, path)


def markdown(block: list[dict], ring: list[dict], env: dict, command: str) -> str:
    lines = [f"# Attention benchmarks\n\n`{command}`\n\n{env_line(env)}\n", "## Block kernels (TFLOP/s, bf16)\n",
             *table(["backend", "head_dim", "seq", "causal", "fwd", "fwd+bwd"],
                    [[r["backend"], r["head_dim"], r["seq"], r["causal"], f"{r['fwd_tflops']:.0f}",
                      f"{r['fwd_bwd_tflops']:.0f}"] for r in block]),
             "", "## The ring on one GPU (simulated, causal, 32/8 heads, head_dim 128, bf16)\n",
             *table(["kind", "W", "tokens/rank", "fwd TFLOP/s", "fwd+bwd TFLOP/s", "fwd ÷ cuDNN", "fwd+bwd ÷ cuDNN",
                     "peak MiB/rank"],
                    [[r["kind"], r["world"], r["local"], f"{r['fwd_tflops']:.0f}", f"{r['fwd_bwd_tflops']:.0f}",
                      f"{r.get('fwd_ratio', 1):.2f}", f"{r.get('fwd_bwd_ratio', 1):.2f}",
                      fmt(r.get("peak_mib_per_rank"), ".0f", "")] for r in ring])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/latest")
    p.add_argument("--seqs", default="2048,4096,8192,16384,32768")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--backends", default="triton,sdpa,torch-cudnn,torch-flash")
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--ring-locals", default="4096,8192,16384")
    p.add_argument("--ring-backends", default="auto,triton")
    p.add_argument("--skip-blocks", action="store_true")
    args = p.parse_args(argv)
    env = environment()
    print(env_line(env), flush=True)
    block = []
    if not args.skip_blocks:
        for d, s, causal, backend in itertools.product(map(int, args.head_dims.split(",")),
                                                       map(int, args.seqs.split(",")), (False, True),
                                                       args.backends.split(",")):
            row = block_row(backend, s, d, causal)
            block.append(row)
            print(f"block {backend:12s} d={d:3d} s={s:6d} causal={causal!s:5s} fwd {row['fwd_tflops']:5.0f} "
                  f"fwd+bwd {row['fwd_bwd_tflops']:5.0f}", flush=True)
    ring = []
    for local in map(int, args.ring_locals.split(",")):
        rows = ring_rows(args.world, local, ("striped", "zigzag", "contiguous"), args.ring_backends.split(","))
        ring += rows
        for r in rows:
            print(f"ring {r['kind']:28s} {local:6d}/rank fwd {r['fwd_tflops']:5.0f} fwd+bwd {r['fwd_bwd_tflops']:5.0f}"
                  f" ratio {r.get('fwd_ratio', 1):.2f} / {r.get('fwd_bwd_ratio', 1):.2f}"
                  f" peak/rank {r.get('peak_mib_per_rank', 0):.0f} MiB", flush=True)
    command = command_line()
    write_results(args.out, markdown(block, ring, env, command), dict(environment=env, command=command, block=block,
                                                                     ring=ring))
    if block and ring:
        plot(block, ring, os.path.join(args.out, "results.png"))


if __name__ == "__main__":
    main()
