"""First look at a GPU: fused-op calling conventions, kernel correctness, a tile sweep of the Triton kernels.

    python benchmarks/explore_gpu.py
"""

from __future__ import annotations

import itertools
import sys
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, ".")
from benchmarks.common import attention_flops, bench_ms, environment  # noqa: E402
from ring_sp import kernels  # noqa: E402
from ring_sp.kernels import (  # noqa: E402
    Band,  # noqa: E402
    State,
    Visibility,  # noqa: E402
    sdpa_backend,
)
from ring_sp.kernels import triton_backend as tb  # noqa: E402
from tests.block_check import check_block  # noqa: E402

print(environment(), flush=True)


def section(title):
    print(f"\n== {title}", flush=True)


section("fused ops: calling conventions and GQA, through the sdpa backend (rel err vs float64)")
for op in ("cudnn", "flash", "efficient"):
    for gqa, band in itertools.product((1, 4), (Band(), Band(lo=0), Band(lo=1))):
        try:
            e = check_block(f"sdpa_{op}", sq=200, sk=200, heads=8, kv_heads=8 // gqa, head_dim=128, band=band,
                            masked=False, dtype=torch.bfloat16, device="cuda")
            print(f"{op:9s} gqa={gqa} {band.kind:6s} " + " ".join(f"{k} {v:.1e}" for k, v in e.items()), flush=True)
        except Exception as ex:  # noqa: BLE001
            print(f"{op:9s} gqa={gqa} {band.kind:6s} FAILED {type(ex).__name__}: {str(ex)[:300]}", flush=True)
# native GQA in the raw ops?
q = torch.randn(1, 8, 256, 128, device="cuda", dtype=torch.bfloat16)
kv = torch.randn(1, 2, 256, 128, device="cuda", dtype=torch.bfloat16)
for op in ("cudnn", "flash", "efficient"):
    try:
        out, lse = sdpa_backend.OPS[op].forward(q, kv, kv, True, 0.1)
        ref = F.scaled_dot_product_attention(q.float(), kv.float().repeat_interleave(4, 1),
                                             kv.float().repeat_interleave(4, 1), is_causal=True, scale=0.1)
        print(f"{op} native GQA forward: rel err {((out.float() - ref).norm() / ref.norm()).item():.1e}")
    except Exception as ex:  # noqa: BLE001
        print(f"{op} native GQA forward: refused ({str(ex)[:200]})")

section("triton kernels on the GPU (rel err vs float64)")
for dtype, band, d, masked in itertools.product((torch.bfloat16, torch.float16), (Band(), Band(lo=0), Band(lo=1),
                                                 Band(lo=3, hi=300)), (64, 128, 256), (False, True)):
    try:
        e = check_block("triton", sq=333, sk=301, heads=4, kv_heads=2, head_dim=d, band=band, masked=masked,
                        dtype=dtype, device="cuda")
        worst = max(e.values())
        print(f"{str(dtype):15s} {band.kind:6s} d={d:3d} mask={masked!s:5s} worst {worst:.1e} "
              + " ".join(f"{k} {v:.1e}" for k, v in e.items()), flush=True)
    except Exception:  # noqa: BLE001
        print(f"{dtype} {band} d={d} FAILED\n{traceback.format_exc()[-1500:]}", flush=True)

section("tile sweep (bf16, b·s = 16k, heads 16): TFLOP/s; cuDNN / flash SDPA in the same run")


def inputs(s, d, h=16, hk=16):
    b = max(1, 16384 // s)
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16)
    return q, k, v


def sdpa_ref(q, k, v, causal, backend):
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(backend):
        fwd = bench_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
        qg, kg, vg = (t.detach().requires_grad_() for t in (qt, kt, vt))
        do = torch.randn_like(qg)

        def both():
            F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal).backward(do)

        fb = bench_ms(both)
    return fwd, fb


triton_backend = kernels.get("triton")
for d, s, causal in itertools.product((128, 64), (8192,), (False, True)):
    q, k, v = inputs(s, d)
    b, h = q.shape[0], q.shape[2]
    fl, flb = attention_flops(b, h, s, s, d, causal), attention_flops(b, h, s, s, d, causal, True)
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            tf, tfb = sdpa_ref(q, k, v, causal, be)
            print(f"d={d} s={s} causal={causal!s:5s} torch-{name:6s} fwd {fl / tf / 1e9:6.0f} "
                  f"fwd+bwd {flb / tfb / 1e9:6.0f}")
        except Exception as ex:  # noqa: BLE001
            print(f"torch-{name} failed: {str(ex)[:200]}")
    band = Band(lo=0) if causal else Band()
    bound = 64 if d <= 64 else 128
    state = State.empty(q)
    for cfg in [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 4), (64, 64, 4, 3),
                (128, 128, 4, 3), (128, 32, 4, 4)]:
        tb.TUNING[("fwd", bound)] = cfg
        try:
            t = bench_ms(lambda: triton_backend.forward(q, k, v, state, Visibility(band), d ** -0.5))
            print(f"d={d} s={s} causal={causal!s:5s} triton fwd {cfg} {fl / t / 1e9:6.0f}", flush=True)
        except Exception as ex:  # noqa: BLE001
            print(f"triton fwd {cfg} failed: {str(ex)[:300]}", flush=True)
    tb.TUNING[("fwd", bound)] = (128, 64, 4, 3)
    do = torch.randn_like(q)
    out, lse = state.output().to(q.dtype), state.lse
    delta = (do.float() * out.float()).sum(-1).transpose(1, 2)
    dq = torch.zeros(q.shape, device="cuda")
    dk, dv = torch.zeros(k.shape, device="cuda"), torch.zeros(v.shape, device="cuda")
    for dkdv, dqc in [((64, 128, 8, 2), (128, 64, 8, 2)), ((32, 128, 4, 3), (128, 32, 4, 3)),
                      ((64, 128, 8, 3), (128, 64, 8, 3)), ((32, 64, 4, 3), (64, 32, 4, 3)),
                      ((64, 64, 4, 2), (64, 64, 4, 2)), ((128, 128, 8, 2), (128, 128, 8, 2))]:
        tb.TUNING[("dkdv", bound)], tb.TUNING[("dq", bound)] = dkdv, dqc
        try:
            t = bench_ms(lambda: triton_backend.backward(do, q, k, v, out, lse, delta, dq, dk, dv, Visibility(band),
                                                         d ** -0.5))
            print(f"d={d} s={s} causal={causal!s:5s} triton bwd {dkdv} {dqc} bwd-only {2.5 * fl / t / 1e9:6.0f}",
                  flush=True)
        except Exception as ex:  # noqa: BLE001
            print(f"triton bwd {dkdv} {dqc} failed: {str(ex)[:300]}", flush=True)
