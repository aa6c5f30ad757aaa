"""How the ring's error against float64 grows with the ring size W (CPU, simulated ring).

    python benchmarks/error_vs_world.py --out benchmarks/results/cpu-error-vs-world.md

A fixed global sequence is sharded over W = 1 … 32 positions; each run's out, dq, dk, dv are
compared (‖x − ref‖ / ‖ref‖) with a float64 dense attention over the whole sequence. W = 1 is
plain (blockwise) attention, so the growth from W = 1 is what the ring adds: one more merge of
the float32 state per step, and float32 dK/dV accumulated while travelling.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import env_line, environment, table  # noqa: E402
from ring_sp import merge, ring_attention_simulated, split  # noqa: E402
from ring_sp.reference import dense_grads, rel_err, visible_pairs  # noqa: E402

HEADER = ["dtype", "backend", "layout", "W", "out", "dq", "dk", "dv"]


def errors(world: int, dtype: torch.dtype, layout: str, seq: int, backend: str) -> list[float]:
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, seq, heads, 64, generator=g, dtype=torch.float64).to(dtype) for heads in (4, 2, 2, 4))
    ref = dense_grads(q, k, v, do, visible=visible_pairs(seq, causal=True))
    qs, ks, vs = ([t.clone().requires_grad_() for t in split(x, layout, world)] for x in (q, k, v))
    outs = ring_attention_simulated(qs, ks, vs, causal=True, layout=layout, backend=backend)
    torch.autograd.backward(outs, split(do, layout, world))
    got = [merge(outs, layout)] + [merge([t.grad for t in ts], layout) for ts in (qs, ks, vs)]
    return [rel_err(g, r) for g, r in zip(got, ref)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--worlds", default="1,2,4,8,16,32")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for backend in ("auto", "torch"):
            for layout in ("zigzag", "striped"):
                for world in map(int, args.worlds.split(",")):
                    rows.append([str(dtype).replace("torch.", ""), backend, layout, world,
                                 *(f"{x:.2e}" for x in errors(world, dtype, layout, args.seq, backend))])
                    print(table(HEADER, rows[-1:])[-1], flush=True)
    lines = ["# Ring error against float64 versus ring size W\n",
             f"`python benchmarks/error_vs_world.py --seq {args.seq} --worlds {args.worlds}`\n",
             f"{env_line(environment())}. Causal, batch 1, {args.seq} tokens in all, 4 query heads, 2 KV heads, "
             "head_dim 64; backend `auto` (PyTorch's CPU flash kernel for unmasked blocks) and `torch`.\n",
             *table(HEADER, rows)]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
