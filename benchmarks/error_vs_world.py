"""How the ring's error against float64 grows with the ring size W (CPU, simulated ring).

    python benchmarks/error_vs_world.py --out benchmarks/results/cpu-error-vs-world.md

A fixed global sequence is sharded over W = 1 … 32 positions; each run's out, dq, dk, dv are
compared (‖x − ref‖ / ‖ref‖) with a float64 dense attention over the whole sequence. W = 1 is
plain (blockwise) attention, so the growth from W = 1 is what the ring adds: one more merge of
the float32 state per step, and float32 dK/dV accumulated while travelling.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ring_sp import merge, ring_attention_simulated, split  # noqa: E402
from tests.reference import make_inputs, reference_grads, rel_err  # noqa: E402


def errors(world, dtype, layout, seq, backend):
    q, k, v, _, do = make_inputs(1, seq, 4, 2, 64, dtype, seed=0)
    ref = reference_grads(q, k, v, do, causal=True)
    qs, ks, vs = ([t.clone().requires_grad_() for t in split(x, layout, world)] for x in (q, k, v))
    outs = ring_attention_simulated(qs, ks, vs, causal=True, layout=layout, backend=backend)
    torch.autograd.backward(outs, split(do, layout, world))
    got = [merge(outs, layout)] + [merge([t.grad for t in ts], layout) for ts in (qs, ks, vs)]
    return [rel_err(g, r) for g, r in zip(got, ref)]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--worlds", default="1,2,4,8,16,32")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    lines = ["# Ring error against float64 versus ring size W\n",
             f"`python benchmarks/error_vs_world.py --seq {args.seq} --worlds {args.worlds}`\n",
             f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
             f"{datetime.date.today().isoformat()}. Causal, batch 1, {args.seq} tokens in all, 4 query heads, "
             "2 KV heads, head_dim 64; backend `auto` (PyTorch's CPU flash kernel for unmasked blocks) and `torch`.\n",
             "| dtype | backend | layout | W | out | dq | dk | dv |", "|---|---|---|---|---|---|---|---|"]
    for dtype in (torch.float32, torch.bfloat16):
        for backend in ("auto", "torch"):
            for layout in ("zigzag", "striped"):
                for world in map(int, args.worlds.split(",")):
                    e = errors(world, dtype, layout, args.seq, backend)
                    line = f"| {str(dtype).replace('torch.', '')} | {backend} | {layout} | {world} | " + \
                        " | ".join(f"{x:.2e}" for x in e) + " |"
                    print(line, flush=True)
                    lines.append(line)
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
