"""Every cuDNN execution plan for dense causal SDPA, timed: is PyTorch's heuristic choice the fastest?

    python3 benchmarks/probe_cudnn_plans.py [--shapes 32x4x64x32768 32x8x128x16384] [--out DIR]

PyTorch's cuDNN SDPA runs the first plan of cuDNN's heuristic (mode A). Through NVIDIA's cudnn-frontend
(``pip install nvidia-cudnn-frontend``) this builds the forward and backward graphs of one causal bf16
sequence (heads/kv-heads/head_dim/seq per ``--shapes``), builds every plan cuDNN offers (heuristics A
and fallback) and times each against PyTorch's own op in the same process, with the largest difference
from PyTorch's output and gradients. Prints one table per shape; needs a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import env_line, environment, table, throughput_ms, write_results  # noqa: E402

Q, K, V, O, STATS, DO, DQ, DK, DV = range(1, 10)


def _graph(cudnn, handle, backward: bool, tensors: dict, scale: float):
    """A causal SDPA graph (forward, or backward) over ``tensors`` (uid -> torch tensor), every plan built."""
    bf16 = cudnn.data_type.BFLOAT16
    g = cudnn.pygraph(handle=handle, io_data_type=bf16, intermediate_data_type=cudnn.data_type.FLOAT,
                      compute_data_type=cudnn.data_type.FLOAT)
    t = {uid: g.tensor(name=f"t{uid}", dim=list(x.shape), stride=list(x.stride()),
                       data_type=cudnn.data_type.FLOAT if x.dtype == torch.float32 else bf16, uid=uid)
         for uid, x in tensors.items() if uid in ((Q, K, V, O, DO, STATS) if backward else (Q, K, V))}
    common = dict(attn_scale=scale, diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT, diagonal_band_right_bound=0)
    if backward:
        outs = g.sdpa_backward(name="bwd", q=t[Q], k=t[K], v=t[V], o=t[O], dO=t[DO], stats=t[STATS], **common)
        uids = (DQ, DK, DV)
    else:
        outs = g.sdpa(name="fwd", q=t[Q], k=t[K], v=t[V], generate_stats=True, **common)
        uids = (O, STATS)
    for out, uid in zip(outs, uids):
        x = tensors[uid]
        out.set_uid(uid).set_output(True).set_dim(list(x.shape)).set_stride(list(x.stride())).set_data_type(
            cudnn.data_type.FLOAT if x.dtype == torch.float32 else bf16)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans(cudnn.build_plan_policy.ALL)
    return g


def probe(heads: int, kv_heads: int, head_dim: int, seq: int) -> list[dict]:
    import cudnn

    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    scale = head_dim ** -0.5
    # (batch, seq, heads, head_dim) storage seen as (batch, heads, seq, head_dim), as the ring's blocks are
    q = torch.randn(1, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(1, seq, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            for _ in range(2))
    aten = torch.ops.aten
    out, lse, *_ = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
    lse = lse.reshape(1, heads, seq, 1).contiguous()
    do = torch.empty_like(out).copy_(torch.randn_like(q))  # dO in O's layout, as cuDNN wants

    def torch_fwd():
        return aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)

    def torch_bwd():
        return aten._scaled_dot_product_cudnn_attention_backward(
            do, q, k, v, out, lse, None, None, None, None, None, seq, seq, 0.0, True, scale=scale)

    want_grads = torch_bwd()
    fwd_flops = 4 * heads * head_dim * seq * (seq + 1) / 2
    rows = [{"shape": f"{heads}/{kv_heads} heads, d {head_dim}, seq {seq}", "pass": p, "plan": "PyTorch (aten)",
             "ms": throughput_ms(fn), "err": 0.0} for p, fn in (("fwd", torch_fwd), ("bwd", torch_bwd))]
    for row in rows:
        row["TFLOP/s"] = fwd_flops * (2.5 if row["pass"] == "bwd" else 1.0) / row["ms"] / 1e9
    for backward in (False, True):
        tensors = {Q: q, K: k, V: v, O: torch.empty_like(q), STATS: torch.empty_like(lse)}
        if backward:
            tensors.update({O: out, STATS: lse, DO: do, DQ: torch.empty_like(q), DK: torch.empty_like(k),
                            DV: torch.empty_like(v)})
        start = time.perf_counter()
        try:
            g = _graph(cudnn, handle, backward, tensors, scale)
        except Exception as error:  # report and go on: the probe is about what builds
            print(f"  {'bwd' if backward else 'fwd'}: graph failed: {error}", flush=True)
            continue
        print(f"  {'bwd' if backward else 'fwd'}: {g.get_execution_plan_count()} plans built in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        for index in range(g.get_execution_plan_count()):
            name = g.get_plan_name_at_index(index)
            try:
                ws = torch.empty(max(g.get_workspace_size_plan_at_index(index), 1), dtype=torch.uint8, device="cuda")
                run = lambda: g.execute_plan_at_index(tensors, ws, index=index, handle=handle)  # noqa: E731,B023
                ms = throughput_ms(run)
            except Exception as error:
                print(f"    plan {index} {name}: {str(error)[:200]}", flush=True)
                continue
            if backward:
                err = max((tensors[u].float() - w.float()).abs().max().item() for u, w in zip((DQ, DK, DV), want_grads))
            else:
                err = (tensors[O].float() - out.float()).abs().max().item()
            rows.append({"shape": rows[0]["shape"], "pass": "bwd" if backward else "fwd", "plan": f"{index}: {name}",
                         "ms": ms, "err": err, "TFLOP/s": fwd_flops * (2.5 if backward else 1.0) / ms / 1e9})
            print(f"    plan {index} {name}: {ms:.2f} ms, err {err:.1e}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["32x4x64x32768", "32x8x128x16384"],
                   help="heads x kv_heads x head_dim x seq")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    env = environment()
    rows = []
    for shape in args.shapes:
        heads, kv_heads, head_dim, seq = (int(n) for n in shape.split("x"))
        print(f"{shape}:", flush=True)
        rows += probe(heads, kv_heads, head_dim, seq)
    cols = ["shape", "pass", "plan", "ms", "TFLOP/s", "err"]
    lines = table(cols, [[r["shape"], r["pass"], r["plan"], f"{r['ms']:.2f}", f"{r['TFLOP/s']:.0f}", f"{r['err']:.1e}"]
                         for r in rows])
    text = "\n".join([f"# cuDNN plans for causal SDPA (bf16, batch 1)\n\n{env_line(env)}\n",
                       "TFLOP/s: causal FLOPs, backward counted as 2.5 forwards; err: largest |difference| from "
                       "PyTorch's op.\n", *lines, ""])
    print(text)
    if args.out:
        write_results(args.out, text, {"environment": env, "rows": rows}, name="results")


if __name__ == "__main__":
    main()
