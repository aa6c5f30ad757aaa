"""FlashAttention-4 (CuTe DSL, ``pip install flash-attn-4``) against PyTorch's cuDNN SDPA on Hopper, side by side.

    python3 benchmarks/probe_fa4.py [--shapes 32x4x64x32768 32x8x128x16384] [--out DIR]

Dense causal bf16, batch 1, (batch, seq, heads, head_dim) storage as the ring keeps it: forward (with the
log-sum-exp) and backward (given it) through FA4's ``_flash_attn_fwd`` / ``_flash_attn_bwd`` and through
``aten._scaled_dot_product_cudnn_attention`` and its backward; then FA4's variable-length path on one 16k
block of log-normal documents (head_dim 128), and the same with new documents on every call (does a new
``max_seqlen`` compile again? exact and rounded to a power of two). Prints first-call (compile) time, ms, TFLOP/s
(causal FLOPs, backward counted as 2.5 forwards) and the largest difference from cuDNN. Needs a GPU and FA4.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import env_line, environment, table, throughput_ms, write_results  # noqa: E402
from benchmarks.probe_ragged_op import seconds  # noqa: E402

aten = torch.ops.aten


def _diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def dense(fa4, heads: int, kv_heads: int, head_dim: int, seq: int) -> list[dict]:
    scale = head_dim ** -0.5
    q = torch.randn(1, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, seq, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn_like(q)
    qt, kt, vt, dot = (x.transpose(1, 2) for x in (q, k, v, do))

    def cudnn_fwd():
        return aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, True, False, scale=scale)

    out_c, lse_c, *_ = cudnn_fwd()
    lse_c4 = lse_c.reshape(1, heads, seq, 1).contiguous()
    do_c = torch.empty_like(out_c).copy_(dot)

    def cudnn_bwd():
        return aten._scaled_dot_product_cudnn_attention_backward(
            do_c, qt, kt, vt, out_c, lse_c4, None, None, None, None, None, seq, seq, 0.0, True, scale=scale)

    def fa4_fwd():
        return fa4._flash_attn_fwd(q, k, v, softmax_scale=scale, causal=True, return_lse=True)

    name = f"{heads}/{kv_heads} heads, d {head_dim}, seq {seq}"
    flops = 4 * heads * head_dim * seq * (seq + 1) / 2
    rows = []
    compile_fwd = seconds(fa4_fwd)
    out_f, lse_f = fa4_fwd()[:2]

    def fa4_bwd():
        return fa4._flash_attn_bwd(q, k, v, out_f, do, lse_f, softmax_scale=scale, causal=True)

    compile_bwd = seconds(fa4_bwd)
    grads_c, grads_f = cudnn_bwd()[:3], fa4_bwd()[:3]
    print(f"{name}: FA4 first calls {compile_fwd:.1f} s forward, {compile_bwd:.1f} s backward; lse shape "
          f"{tuple(lse_f.shape)}", flush=True)
    err_out = _diff(out_f, out_c.transpose(1, 2))
    err_lse = _diff(lse_f.reshape(lse_c.shape), lse_c)
    err_grad = max(_diff(f, c.transpose(1, 2)) for f, c in zip(grads_f, grads_c))
    for kernel, fwd, bwd, err in (("cuDNN (aten)", cudnn_fwd, cudnn_bwd, (0.0, 0.0)),
                                  ("FA4", fa4_fwd, fa4_bwd, (max(err_out, err_lse), err_grad))):
        t_f, t_b = throughput_ms(fwd), throughput_ms(bwd)
        rows.append({"case": name, "kernel": kernel, "fwd ms": t_f, "bwd ms": t_b,
                     "fwd TFLOP/s": flops / t_f / 1e9, "bwd TFLOP/s": 2.5 * flops / t_b / 1e9,
                     "f+b TFLOP/s": 3.5 * flops / (t_f + t_b) / 1e9, "err fwd": err[0], "err bwd": err[1]})
        print(f"  {rows[-1]}", flush=True)
    return rows


def varlen(fa4, seq: int = 16384) -> list[dict]:
    from benchmarks.bench_documents import HEAD_DIM, HEADS, KV_HEADS, document_lengths

    lengths = document_lengths(seq, 3500, [], seed=1)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    scale = HEAD_DIM ** -0.5
    q = torch.randn(seq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(seq, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn_like(q)
    longest = max(lengths)
    args = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest, softmax_scale=scale,
                causal=True)

    def fwd():
        return fa4._flash_attn_fwd(q, k, v, return_lse=True, **args)

    compile_fwd = seconds(fwd)
    out, lse = fwd()[:2]

    def bwd():
        return fa4._flash_attn_bwd(q, k, v, out, do, lse, **args)

    compile_bwd = seconds(bwd)
    grads = bwd()[:3]
    # cuDNN dense on each document alone, for the errors
    worst = [0.0, 0.0]
    for a, b in zip(cu.tolist(), cu.tolist()[1:]):
        part = [x[a:b].transpose(0, 1)[None] for x in (q, k, v)]
        o, l_, *_ = aten._scaled_dot_product_cudnn_attention(*part, None, True, 0.0, True, False, scale=scale)
        d = do[a:b].transpose(0, 1)[None]
        d = torch.empty_like(o).copy_(d)
        g = aten._scaled_dot_product_cudnn_attention_backward(
            d, *part, o, l_.reshape(*o.shape[:3], 1).contiguous(), None, None, None, None, None, b - a, b - a, 0.0,
            True, scale=scale)
        worst[0] = max(worst[0], _diff(out[a:b], o[0].transpose(0, 1)))
        worst[1] = max(worst[1], *(_diff(x[a:b], y[0].transpose(0, 1)) for x, y in zip(grads, g[:3])))
    flops = 4 * HEADS * HEAD_DIM * sum(n * (n + 1) / 2 for n in lengths)
    t_f, t_b = throughput_ms(fwd), throughput_ms(bwd)
    name = f"{len(lengths)} documents in {seq} tokens, {HEADS}/{KV_HEADS} heads, d {HEAD_DIM}"
    print(f"{name}: FA4 varlen first calls {compile_fwd:.1f} s forward, {compile_bwd:.1f} s backward; lse shape "
          f"{tuple(lse.shape)}", flush=True)
    row = {"case": name, "kernel": "FA4 varlen", "fwd ms": t_f, "bwd ms": t_b, "fwd TFLOP/s": flops / t_f / 1e9,
           "bwd TFLOP/s": 2.5 * flops / t_b / 1e9, "f+b TFLOP/s": 3.5 * flops / (t_f + t_b) / 1e9,
           "err fwd": worst[0], "err bwd": worst[1]}
    print(f"  {row}", flush=True)
    return [row]


def varlen_churn(fa4, seq: int = 16384, sets: int = 8) -> list[dict]:
    """New documents every call, as packed training sees them: ``sets`` document sets (new lengths, counts and
    longest document each), forward + backward of each timed on its first call (any compile for a new
    ``max_seqlen`` shows here) and again; then the same sets with ``max_seqlen`` rounded up to a power of two
    (a bound is all FA4 needs of it), which would bound the compiles if the first pass shows one per length."""
    from benchmarks.bench_documents import HEAD_DIM, HEADS, KV_HEADS, document_lengths

    scale = HEAD_DIM ** -0.5
    q = torch.randn(seq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(seq, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn_like(q)
    rows = []
    for rounded in (False, True):
        for n in range(sets):
            lengths = document_lengths(seq, 1000 + 700 * n, [], seed=100 + n)
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
            longest = max(lengths)
            bound = 1 << (longest - 1).bit_length() if rounded else longest
            args = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=bound, max_seqlen_k=bound,
                        softmax_scale=scale, causal=True)

            def step():
                out, lse = fa4._flash_attn_fwd(q, k, v, return_lse=True, **args)[:2]
                fa4._flash_attn_bwd(q, k, v, out, do, lse, **args)

            first, again = seconds(step), seconds(step, reps=3)
            rows.append({"max_seqlen": "power of two" if rounded else "exact", "documents": len(lengths),
                         "longest": longest, "bound": bound, "first ms": 1e3 * first, "again ms": 1e3 * again})
            print(f"  varlen churn {rows[-1]}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["32x4x64x32768", "32x8x128x16384"],
                   help="heads x kv_heads x head_dim x seq")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from flash_attn.cute import interface as fa4

    env = environment()
    rows = []
    for shape in args.shapes:
        try:
            rows += dense(fa4, *(int(n) for n in shape.split("x")))
        except Exception as error:  # report and go on to the next case
            print(f"{shape}: {type(error).__name__}: {str(error)[:400]}", flush=True)
    try:
        rows += varlen(fa4)
    except Exception as error:
        print(f"varlen: {type(error).__name__}: {str(error)[:400]}", flush=True)
    churn = []
    try:
        churn = varlen_churn(fa4)
    except Exception as error:
        print(f"varlen churn: {type(error).__name__}: {str(error)[:400]}", flush=True)
    cols = ["case", "kernel", "fwd ms", "bwd ms", "fwd TFLOP/s", "bwd TFLOP/s", "f+b TFLOP/s", "err fwd", "err bwd"]
    fmt = {"fwd ms": ".2f", "bwd ms": ".2f", "fwd TFLOP/s": ".0f", "bwd TFLOP/s": ".0f", "f+b TFLOP/s": ".0f",
           "err fwd": ".1e", "err bwd": ".1e"}
    lines = table(cols, [[format(r[c], fmt.get(c, "")) for c in cols] for r in rows])
    churn_cols = ["max_seqlen", "documents", "longest", "bound", "first ms", "again ms"]
    lines += ["", "New documents every call (FA4 varlen forward + backward, 16k tokens): a first call far above the "
              "repeat is a compile", "",
              *table(churn_cols, [[format(r[c], ".1f" if "ms" in c else "") for c in churn_cols] for r in churn])]
    text = "\n".join([f"# FlashAttention-4 against cuDNN (causal, bf16)\n\n{env_line(env)}\n", *lines, ""])
    print(text)
    if args.out:
        write_results(args.out, text, {"environment": env, "rows": rows, "churn": churn}, name="results")


if __name__ == "__main__":
    main()
