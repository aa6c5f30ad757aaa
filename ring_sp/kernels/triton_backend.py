"""Block backend on Triton kernels: the seed's continuing forward, written anew, and a backward.

GPU (fp16, bf16; fp32 with exact dot products), or the CPU under ``TRITON_INTERPRET=1`` for
tests. Any strides with a contiguous head_dim (Megatron's (seq, batch, heads, dim) views
included), head_dim up to 256, GQA without repeating K/V, every band, the key mask, and blocks that
span several documents (masked in the kernel, tiles that share no document skipped).
"""

from __future__ import annotations

import os

import torch
import triton
from torch import Tensor

from ring_sp.band import Band
from ring_sp.kernels import triton_kernels as tk
from ring_sp.kernels.state import State
from ring_sp.kernels.visibility import Visibility

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_HEAD_DIM = 256

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass and head_dim bound; tuned on an H100
# (benchmarks/results/). Set ``TUNING[...]`` to try others.
TUNING: dict[tuple[str, int], tuple[int, int, int, int]] = {
    ("fwd", 64): (128, 64, 4, 3),
    ("fwd", 128): (128, 128, 8, 3),
    ("fwd", 256): (64, 64, 8, 2),
    ("dkdv", 64): (32, 128, 4, 3),
    ("dkdv", 128): (64, 128, 8, 3),
    ("dkdv", 256): (32, 64, 8, 1),
    ("dq", 64): (128, 32, 4, 3),
    ("dq", 128): (128, 64, 8, 3),
    ("dq", 256): (64, 32, 8, 1),
}


def config(which: str, head_dim: int) -> tuple[int, int, int, int]:
    if INTERPRET:
        return 16, 16, 1, 1
    bound = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    return TUNING[(which, bound)]


def _last_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _band_args(band: Band) -> tuple[int, int, bool, bool]:
    return (band.lo or 0, band.hi or 0, band.lo is not None, band.hi is not None)


def _mask_arg(key_mask: Tensor | None, fallback: Tensor) -> tuple[Tensor, int, int]:
    if key_mask is None:
        return fallback, 0, 0
    m = key_mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1)


def _document_args(vis: Visibility, fallback: Tensor, by_rows: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(query ids, key ids, lo, hi) for the kernels: lo/hi are the key ranges of each row (by_rows) or the
    query ranges of each column; placeholders without documents."""
    docs = vis.documents
    if docs is None:
        return fallback, fallback, fallback, fallback
    return (docs.q, docs.k, *(docs.key_ranges() if by_rows else docs.query_ranges()))


class TritonBackend:
    name = "triton"
    auto_devices = ("cuda",)

    def __init__(self, bucket_size: int | None = None):
        del bucket_size  # tiles are chosen per head_dim

    def unsupported(self, q: Tensor, k: Tensor, visibility: Visibility) -> str | None:
        if q.device.type != "cuda" and not INTERPRET:
            return "needs CUDA tensors (or TRITON_INTERPRET=1 for Triton's CPU interpreter)"
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"needs float16, bfloat16 or float32, got {q.dtype}"
        if q.shape[-1] > MAX_HEAD_DIM:
            return f"head_dim {q.shape[-1]} is above {MAX_HEAD_DIM}"
        return None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, state: State, visibility: Visibility, scale: float, *,
                fresh: bool = False, out: Tensor | None = None) -> None:
        q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
        if out is not None:
            assert out.shape == q.shape and out.stride(-1) == 1
        b, sq, h, d = q.shape
        sk, hk = k.shape[1], k.shape[2]
        block_m, block_n, warps, stages = config("fwd", d)
        block_d = max(16, triton.next_power_of_2(d))
        mask, smb, sms = _mask_arg(visibility.key_mask, q)
        lo, hi, has_lo, has_hi = _band_args(visibility.band)
        acc, m, lse = state.acc, state.m, state.lse
        o = acc if out is None else out
        grid = (triton.cdiv(sq, block_m), b * h)
        tk.forward_kernel[grid](
            q, k, v, mask, acc, m, lse, o, *_document_args(visibility, q, by_rows=True),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), smb, sms,
            acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1), m.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            h, h // hk, sq, sk, d, scale * tk.LOG2E, lo, hi,
            HAS_LO=has_lo, HAS_HI=has_hi, HAS_MASK=visibility.key_mask is not None,
            HAS_DOCS=visibility.documents is not None, EVEN_D=block_d == d,
            IEEE=q.dtype == torch.float32, LOAD_ACCUMULATED=not fresh, NORMALIZE=out is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=warps, num_stages=stages,
        )
        # lse and m share strides: the kernel indexes both with m's.
        assert m.stride() == lse.stride()

    def backward(self, do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, delta: Tensor,
                 dq: Tensor, dk: Tensor, dv: Tensor, visibility: Visibility, scale: float) -> None:
        q, k, v, do = (_last_contiguous(t) for t in (q, k, v, do))
        b, sq, h, d = q.shape
        sk, hk = k.shape[1], k.shape[2]
        block_d = max(16, triton.next_power_of_2(d))
        mask, smb, sms = _mask_arg(visibility.key_mask, q)
        lo, hi, has_lo, has_hi = _band_args(visibility.band)
        common = (
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            lse.stride(0), lse.stride(1), lse.stride(2), delta.stride(0), delta.stride(1), delta.stride(2), smb, sms,
        )
        flags = dict(HAS_LO=has_lo, HAS_HI=has_hi, HAS_MASK=visibility.key_mask is not None,
                     HAS_DOCS=visibility.documents is not None, IEEE=q.dtype == torch.float32, BLOCK_D=block_d)
        block_m, block_n, warps, stages = config("dkdv", d)
        tk.backward_dkdv_kernel[(triton.cdiv(sk, block_n), b * hk)](
            q, k, v, do, lse, delta, mask, dk, dv, *_document_args(visibility, q, by_rows=False), *common,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            hk, h // hk, sq, sk, d, scale, scale * tk.LOG2E, lo, hi,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **flags,
        )
        block_m, block_n, warps, stages = config("dq", d)
        tk.backward_dq_kernel[(triton.cdiv(sq, block_m), b * h)](
            q, k, v, do, lse, delta, mask, dq, *_document_args(visibility, q, by_rows=True), *common,
            dq.stride(0), dq.stride(1), dq.stride(2),
            h, h // hk, sq, sk, d, scale, scale * tk.LOG2E, lo, hi,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **flags,
        )
