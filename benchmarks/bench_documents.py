"""Packed documents on one GPU: the ring with document masks against PyTorch's varlen attention and cuDNN.

    python benchmarks/bench_documents.py --out benchmarks/results/h200-DATE/documents

One run, side by side: a simulated ring of W positions over ``--seq`` tokens packed with documents
whose lengths are log-normal (median ``--median``, sigma 0.9, clipped to [64, 16k]) plus a few long
ones (``--long``), causal, bf16, 32/8 heads, head_dim 128. Rates count useful FLOPs only: the
causal pairs inside each document, 4·heads·head_dim per pair forward, 3.5× that forward+backward.
Rows: PyTorch's ``varlen_attn`` (flash-attention 2) on the packed sequence; cuDNN's causal SDPA on
one dense ``--dense-seq`` sequence (no documents: its rate is the anchor); the ring with documents
for each layout (whole blocks for cuDNN's ragged op, backend sdpa_cudnn_ragged; and document grids under auto,
``--grid``); the same ring without documents (wall time).
Prints a table, writes results.json, results.md and results.png under --out.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import plots  # noqa: E402
from benchmarks.common import env_line, environment, randn, sdpa_kernel, table, throughput_ms, write_results  # noqa: E402
from ring_sp import attention, merge, ring_attention_simulated, schedule, split  # noqa: E402
from ring_sp.options import RingOptions  # noqa: E402
from ring_sp.reference import rel_err  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
_takes_whole = attention._takes_whole


def document_lengths(seq: int, median: int, long: list[int], seed: int = 0) -> list[int]:
    """Log-normal lengths around ``median`` (clipped to [64, 16384]) filling ``seq`` with the ``long``
    ones placed among them; the last is cut to fit."""
    g = torch.Generator().manual_seed(seed)
    lengths, left = list(long), seq - sum(long)
    while left > 0:
        n = int(math.exp(math.log(median) + 0.9 * torch.randn(1, generator=g).item()))
        n = min(max(n, 64), 16384, left)
        lengths.append(n)
        left -= n
    order = torch.randperm(len(lengths), generator=g).tolist()
    return [lengths[i] for i in order]


def useful_flops(lengths: list[int], backward: bool) -> float:
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    return 4 * HEADS * HEAD_DIM * pairs * (3.5 if backward else 1.0)


def _time(fwd, fwd_bwd) -> tuple[float, float]:
    return throughput_ms(fwd), throughput_ms(fwd_bwd)


def varlen_row(q, k, v, do, cu: torch.Tensor, longest: int) -> dict:
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        kw["enable_gqa"] = True
    else:  # older releases take as many K/V heads as query heads
        k, v = (t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v))
    args = (cu, cu, longest, longest)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    t_f, t_fb = _time(lambda: varlen_attn(q, k, v, *args, **kw), lambda: varlen_attn(qg, kg, vg, *args, **kw)
                      .backward(do))
    return dict(kind="varlen_attn (flash 2)", fwd_ms=t_f, fwd_bwd_ms=t_fb, out=varlen_attn(q, k, v, *args, **kw))


def dense_row(seq: int) -> dict:
    q, k, v, do = (randn(1, h, seq, HEAD_DIM) for h in (HEADS, KV_HEADS, KV_HEADS, HEADS))
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    with sdpa_kernel("cudnn"):
        t_f, t_fb = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                          lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=True)
                          .backward(do))
    return dict(kind=f"cuDNN causal, one {seq // 1024}k sequence, no documents", fwd_ms=t_f, fwd_bwd_ms=t_fb,
                flops=useful_flops([seq], False))


def ring_row(q, k, v, do, world: int, layout: str, cu: list[int] | None, grid: int | str | None) -> dict:
    """``grid`` "whole": whole blocks of several documents for cuDNN's ragged op (``plan_backend``); an int or
    None: the document grid under auto, with whole blocks switched off."""
    use_plan(grid)
    backend = "auto" if cu is None else plan_backend(grid)
    qs, ks, vs, dos = (split(t, layout, world) for t in (q, k, v, do))
    qg, kg, vg = ([t.detach().requires_grad_() for t in ts] for ts in (qs, ks, vs))

    def fwd():
        with torch.no_grad():
            return ring_attention_simulated(qs, ks, vs, causal=True, layout=layout, cu_seqlens=cu, backend=backend)

    def fwd_bwd():
        torch.autograd.backward(ring_attention_simulated(qg, kg, vg, causal=True, layout=layout, cu_seqlens=cu,
                                                         backend=backend), dos)

    t_f, t_fb = _time(fwd, fwd_bwd)
    sched = attention._plan(RingOptions(causal=True, layout=layout, backend=backend),
                            None if cu is None else (tuple(cu),), world, qs[0], ks[0], None)
    docs = "documents" if cu is not None else "no documents"
    row = dict(kind=f"ring W={world} {layout}, {docs}" + (f", grid {grid}" if cu is not None else ""),
               fwd_ms=t_f, fwd_bwd_ms=t_fb, counts=vars(sched.counts))
    if cu is not None:
        row["out"] = merge(fwd(), layout)
    return row


def use_plan(grid: int | str | None) -> None:
    """Plan "whole" (the ring's own choice) or with document grid ``grid`` (whole blocks switched off)."""
    attention._takes_whole = _takes_whole if grid == "whole" else (lambda *args: False)
    if grid != "whole":
        schedule.DOCUMENT_GRID = grid


def plan_backend(grid: int | str | None) -> str:
    """The backend a plan is timed with: whole blocks need cuDNN's ragged op on CUDA (``sdpa_cudnn_ragged``, which
    auto leaves out); grids run under auto."""
    return "sdpa_cudnn_ragged" if grid == "whole" and torch.cuda.is_available() else "auto"


def grid_value(text: str) -> int | str | None:
    """A ``--grid`` value: ``whole`` (the ring's own plan), an int, or ``none`` (``ring_sp.schedule.DOCUMENT_GRID =
    None``)."""
    return "whole" if text.lower() == "whole" else None if text.lower() == "none" else int(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=131072)
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--median", type=int, default=3500)
    p.add_argument("--long", type=int, nargs="*", default=[32768, 40960])
    p.add_argument("--dense-seq", type=int, default=32768)
    p.add_argument("--layouts", nargs="+", default=["contiguous", "zigzag", "striped"])
    p.add_argument("--grid", type=grid_value, nargs="+", default=["whole", schedule.DOCUMENT_GRID],
                   help="plans to try (the first layout gets all of them): whole (uncut blocks for cuDNN's ragged "
                        "op, backend sdpa_cudnn_ragged), or a document grid for Triton's masked blocks (none: "
                        "unmasked only where a document fills a block)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    env = environment()
    print(env_line(env), flush=True)
    lengths = document_lengths(args.seq, args.median, args.long)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    print(f"{len(lengths)} documents, lengths {sorted(lengths)}", flush=True)
    q, k, v, do = (randn(1, args.seq, h, HEAD_DIM) for h in (HEADS, KV_HEADS, KV_HEADS, HEADS))
    docs_flops = (useful_flops(lengths, False), useful_flops(lengths, True))
    rows = [dense_row(args.dense_seq)]
    cu_t = torch.tensor(cu, device="cuda", dtype=torch.int32)
    var = varlen_row(q[0], k[0], v[0], do[0], cu_t, max(lengths))
    reference = var.pop("out")
    rows.append(var)
    default_grid = schedule.DOCUMENT_GRID
    for n, layout in enumerate(args.layouts):
        for grid in (args.grid if n == 0 else args.grid[:1]):
            row = ring_row(q, k, v, do, args.world, layout, cu, grid)
            row["error_vs_varlen"] = rel_err(row.pop("out")[0], reference)
            rows.append(row)
            print(row, flush=True)
    schedule.DOCUMENT_GRID = default_grid
    rows.append(ring_row(q, k, v, do, args.world, args.layouts[0], None, "whole"))
    for row in rows:
        f_fwd, f_fb = docs_flops
        if "flops" in row:
            f_fwd = row.pop("flops")
            f_fb = 3.5 * f_fwd
        if "no documents" in row["kind"] and "ring" in row["kind"]:
            f_fwd, f_fb = useful_flops([args.seq], False), useful_flops([args.seq], True)
        row["fwd_tflops"], row["fwd_bwd_tflops"] = f_fwd / row["fwd_ms"] / 1e9, f_fb / row["fwd_bwd_ms"] / 1e9
    dense, var = rows[0], rows[1]
    lines = [f"# Packed documents, simulated ring of {args.world}, {args.seq} tokens\n", env_line(env), "",
             f"Documents ({len(lengths)}): log-normal around {args.median} (sigma 0.9, clipped to 64–16384) plus "
             f"{args.long}; causal, bf16, {HEADS}/{KV_HEADS} heads, head_dim {HEAD_DIM}. TFLOP/s count useful FLOPs "
             "only (causal pairs inside documents; the dense row: its own causal pairs).", "",
             *table(["run", "fwd ms", "fwd+bwd ms", "fwd TFLOP/s", "fwd+bwd TFLOP/s", "× varlen (f+b)",
                     "× cuDNN dense (f+b)", "out vs varlen"],
                    [[row["kind"], f"{row['fwd_ms']:.1f}", f"{row['fwd_bwd_ms']:.1f}", f"{row['fwd_tflops']:.0f}",
                      f"{row['fwd_bwd_tflops']:.0f}", f"{row['fwd_bwd_tflops'] / var['fwd_bwd_tflops']:.2f}",
                      f"{row['fwd_bwd_tflops'] / dense['fwd_bwd_tflops']:.2f}",
                      f"{row.get('error_vs_varlen', float('nan')):.1e}"] for row in rows])]
    text = "\n".join(lines)
    print(text, flush=True)
    if args.out:
        write_results(args.out, text + "\n", {"environment": env, "lengths": lengths, "cu_seqlens": cu,
                                              "args": vars(args), "rows": rows})
        plot(rows, os.path.join(args.out, "results.png"))


def plot(rows: list[dict], path: str) -> None:
    fig, (ax,) = plots.figure(1, (11, 0.45 * len(rows) + 1.5))
    names = [r["kind"] for r in rows]
    ax.barh(names, [r["fwd_bwd_tflops"] for r in rows], color="tab:blue", label="fwd+bwd")
    ax.barh(names, [r["fwd_tflops"] for r in rows], color="none", edgecolor="tab:orange", label="fwd")
    ax.invert_yaxis()
    plots.label(ax, xlabel="useful TFLOP/s")
    plots.save(fig, path, dpi=120)


if __name__ == "__main__":
    main()
