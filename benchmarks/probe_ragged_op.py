"""The sdpa backend's ragged op on CUDA (cuDNN through cudnn-frontend) on one 16k block of documents.

    python3 benchmarks/probe_ragged_op.py

Per document set: the first call's time (plan building), the largest error against dense cuDNN on each
document (output, log-sum-exp, dq, dk, dv), TFLOP/s forward and forward+backward (useful FLOPs); then fresh
documents every call (new counts and lengths: what the power-of-two rounding leaves to build), and dense
cuDNN causal on the whole block as the anchor; then one sequence of given lengths through PyTorch's cuDNN op
against cudnn-frontend's ragged op (one sequence per batch element: how ``sdpa_cudnn_ragged`` sends lengths that
are not powers of two), forward and forward+backward. Prints lines; needs a GPU and ``nvidia-cudnn-frontend``.
First run on an H100 on 2026-12-07: benchmarks/results/h100-2026-12-07/frontend_ragged_documents/.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_documents import HEAD_DIM, HEADS, KV_HEADS, document_lengths  # noqa: E402
from ring_sp.kernels import sdpa_backend  # noqa: E402
from ring_sp.kernels.visibility import BlockDocuments  # noqa: E402

SEQ = 16384
SCALE = HEAD_DIM ** -0.5
OP = sdpa_backend.OPS["cudnn_ragged"]


def ragged(lengths: list[int]):
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].to(torch.int32)
    return BlockDocuments(ids.cuda(), ids.cuda(), tuple((n, n) for n in lengths)).ragged()


def seconds(fn, reps: int = 1) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def flops(lengths: list[int], backward: bool = False) -> float:
    return 4 * HEADS * HEAD_DIM * sum(n * (n + 1) // 2 for n in lengths) * (3.5 if backward else 1.0)


def errors(lengths, q, k, v, do, out, lse, grads) -> dict[str, float]:
    """Largest absolute difference from dense cuDNN run on each document alone (flash for one token)."""
    worst, start = dict.fromkeys(("out", "lse", "dq", "dk", "dv"), 0.0), 0
    for n in lengths:
        rows = slice(start, start + n)
        start += n
        part = [t[rows].transpose(0, 1)[None] for t in (q, k, v)]
        dense = sdpa_backend.OPS["flash"] if n == 1 else OP  # cuDNN's backward refuses s_q = s_kv = 1
        want, want_lse = dense.forward(*part, True, SCALE)
        want_grads = dense.backward(do[rows].transpose(0, 1)[None], *part, want, want_lse, True, SCALE)
        pairs = [("out", out[rows], want[0].transpose(0, 1)), ("lse", lse[rows], want_lse[0].t())]
        pairs += [(name, g[rows], w[0].transpose(0, 1)) for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads)]
        for name, got, ref in pairs:
            worst[name] = max(worst[name], (got.float() - ref.float()).abs().max().item())
    return worst


def main() -> None:
    sdpa_backend._cudnn_frontend_ops()
    q = torch.randn(SEQ, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(SEQ, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn_like(q)
    for lengths in ([2376, 14008], document_lengths(SEQ, 3500, [], seed=1), [1, 5, 300, 16078]):
        docs = ragged(lengths)
        fwd = lambda: OP.ragged_forward(q, k, v, docs, True, SCALE)  # noqa: E731
        first = seconds(fwd)
        out, lse = fwd()
        first_bwd = seconds(lambda: OP.ragged_backward(do, q, k, v, out, lse, docs, True, SCALE))
        grads = OP.ragged_backward(do, q, k, v, out, lse, docs, True, SCALE)
        print(f"{len(lengths)} documents ({len(docs.runs)} with padding, longest bound {docs.max_q}): first call "
              f"{first:.2f} s forward, {first_bwd:.2f} s backward", flush=True)
        print("  largest error against dense cuDNN per document:",
              {name: f"{e:.1e}" for name, e in errors(lengths, q, k, v, do, out, lse, grads).items()})
        t_f = seconds(fwd, 10)
        t_fb = seconds(lambda: OP.ragged_backward(do, q, k, v, *fwd(), docs, True, SCALE), 10)
        print(f"  forward {t_f * 1e3:.2f} ms ({flops(lengths) / t_f / 1e12:.0f} TFLOP/s), forward+backward "
              f"{t_fb * 1e3:.2f} ms ({flops(lengths, True) / t_fb / 1e12:.0f} TFLOP/s)", flush=True)
    fresh = []
    for seed in range(10, 16):
        docs = ragged(document_lengths(SEQ, 3500, [], seed=seed))
        t = seconds(lambda: OP.ragged_backward(do, q, k, v, *OP.ragged_forward(q, k, v, docs, True, SCALE), docs,
                                               True, SCALE))
        fresh.append(f"{len(docs.runs)} docs / {docs.max_q}: {t * 1e3:.0f} ms")
    print("fresh documents, forward+backward:", "; ".join(fresh))
    dense = [t.transpose(0, 1)[None] for t in (q, k, v)]
    t_d = seconds(lambda: OP.forward(*dense, True, SCALE), 10)
    print(f"dense cuDNN causal on the 16k block: forward {t_d * 1e3:.2f} ms ({flops([SEQ]) / t_d / 1e12:.0f} TFLOP/s)")
    one_sequence()
    print("the sdpa backend takes ragged blocks:", sdpa_backend._available(OP, q[None], ragged=True))


def one_sequence() -> None:
    """PyTorch's dense cuDNN op against cudnn-frontend's ragged op on one sequence, (1, heads, seq, d) inputs."""
    sb = sdpa_backend
    dense = sb.OPS["cudnn"]
    for sq, sk, causal in ((16384, 16384, True), (16384, 16384, False), (8192, 8192, True), (12000, 16384, False),
                           (16000, 16000, True), (5000, 3000, False)):
        q, do = (torch.randn(1, HEADS, sq, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(1, KV_HEADS, sk, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        work = 4 * HEADS * HEAD_DIM * (sq * (sq + 1) // 2 if causal else sq * sk)
        cells = []
        for name, fwd, bwd in (("PyTorch cuDNN", lambda: dense.forward(q, k, v, causal, SCALE),
                                lambda o: dense.backward(do, q, k, v, *o, causal, SCALE)),
                               ("cudnn-frontend", lambda: sb._frontend_fwd(q, k, v, causal, SCALE),
                                lambda o: sb._frontend_bwd(do, q, k, v, *o, causal, SCALE))):
            bwd(fwd())
            t_f = seconds(fwd, 10)
            t_fb = seconds(lambda: bwd(fwd()), 10)
            cells.append(f"{name} {work / t_f / 1e12:.0f} fwd / {3.5 * work / t_fb / 1e12:.0f} f+b TFLOP/s")
        print(f"one sequence {sq} x {sk}{' causal' if causal else ''}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
