"""Where the time of the simulated ring goes: a CUDA kernel profile, grouped.

    python benchmarks/profile_ring.py --layout zigzag --local 8192 --world 8

Groups kernels into attention (cuDNN / flash / Triton attention), merge (our fused merge of a
block into the float32 state), and other (elementwise: state init, normalisation, fp32 gradient
accumulation, casts), forward+backward, and prints the top kernels.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import randn  # noqa: E402
from ring_sp import ring_attention_simulated, split  # noqa: E402


def group(name: str) -> str:
    low = name.lower()
    if "merge_kernel" in low:
        return "merge into fp32 state"
    if any(k in low for k in ("cudnn", "fmha", "flash", "forward_kernel", "backward_", "sm90", "attn")):
        return "attention"
    return "other (elementwise, init, casts, fp32 accumulation)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--local", type=int, default=8192)
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--backend", default="auto")
    args = p.parse_args(argv)
    seq = args.world * args.local
    q, k, v, do = randn(1, seq, 32, 128), randn(1, seq, 8, 128), randn(1, seq, 8, 128), randn(1, seq, 32, 128)
    qs, ks, vs = ([t.requires_grad_() for t in split(x, args.layout, args.world)] for x in (q, k, v))
    dos = split(do, args.layout, args.world)

    def step():
        outs = ring_attention_simulated(qs, ks, vs, causal=True, layout=args.layout, backend=args.backend)
        torch.autograd.backward(outs, dos)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    for e in events:
        totals[group(e.key)] = totals.get(group(e.key), 0.0) + e.device_time_total
    whole = sum(totals.values())
    print(f"simulated ring W={args.world} {args.layout} {args.local}/rank causal, backend {args.backend}: "
          f"GPU time per fwd+bwd {whole / 3 / 1e3:.1f} ms")
    for name, t in sorted(totals.items(), key=lambda x: -x[1]):
        print(f"  {name:55s} {100 * t / whole:5.1f}%  {t / 3 / 1e3:7.2f} ms")
    # GPU idle time: gaps between consecutive kernels of one timed fwd+bwd (the last of the three).
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    third = len(kernels) // 3
    last = kernels[-third:]
    gaps = [(b.time_range.start - a.time_range.end, a.name, b.name) for a, b in zip(last, last[1:])]
    span = last[-1].time_range.end - last[0].time_range.start
    idle = sum(max(0.0, g) for g, _, _ in gaps)
    print(f"one fwd+bwd: GPU span {span / 1e3:.1f} ms, idle between kernels {idle / 1e3:.1f} ms "
          f"({100 * idle / span:.1f}%), {len(last)} kernels")
    for g, a, b in sorted(gaps, reverse=True)[:8]:
        print(f"  gap {g:8.0f} us  after {a[:60]}  before {b[:60]}")
    print("top kernels:")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:15]:
        print(f"  {100 * e.device_time_total / whole:5.1f}%  {e.count // 3:4d}x  {e.key[:110]}")


if __name__ == "__main__":
    main()
