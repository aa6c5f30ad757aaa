"""Block backend on PyTorch's own fused attention ops that return the log-sum-exp.

CUDA: cuDNN (``aten._scaled_dot_product_cudnn_attention``), flash
(``_scaled_dot_product_flash_attention``) and memory-efficient
(``_scaled_dot_product_efficient_attention``), with their backward ops; CPU: PyTorch's CPU
flash kernel (``_scaled_dot_product_flash_attention_for_cpu``). Each block's normalised output
and lse are merged into the float32 running state.

Bands: full, and causal with the diagonal shifted by c ≥ 0 (causal c = 0; strictly causal c = 1,
the seed's CAUSAL_MASK_DIAGONAL) through the one-token shift: rows c: attend keys :sq − c with
the ops' own top-left causal mask, and rows below c see nothing of the block. Windows and key
masks are left to other backends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ring_sp.band import Band
from ring_sp.kernels.state import State
from ring_sp.kernels.visibility import Visibility

aten = torch.ops.aten


@dataclass(frozen=True)
class Op:
    """One fused op on (batch, heads, seq, head_dim) tensors: forward → (out, lse (b, h, s) fp32)."""

    name: str
    device: str
    dtypes: tuple[torch.dtype, ...]
    gqa: bool  # takes K/V with fewer heads
    forward: Callable[[Tensor, Tensor, Tensor, bool, float], tuple[Tensor, Tensor]]
    backward: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, bool, float], tuple[Tensor, Tensor, Tensor]]


def _cudnn_fwd(q, k, v, causal, scale):
    out, lse, *_ = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out, lse.reshape(q.shape[:3])


# The backward ops take the forward's auxiliary outputs (cumulative lengths for nested tensors,
# dropout RNG state, bias) as plain Tensors; for dense inputs without dropout those are undefined,
# which Python passes as None (as PyTorch's own context parallelism does).
def _cudnn_bwd(do, q, k, v, out, lse, causal, scale):
    return aten._scaled_dot_product_cudnn_attention_backward(
        do, q, k, v, out, lse.unsqueeze(-1).contiguous(), None, None, None, None, None, q.shape[2], k.shape[2],
        0.0, causal, scale=scale)


def _flash_fwd(q, k, v, causal, scale):
    out, lse, *_ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out, lse


def _flash_bwd(do, q, k, v, out, lse, causal, scale):
    return aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, causal, None, None,
        scale=scale)


def _efficient_fwd(q, k, v, causal, scale):
    out, lse, *_ = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
    return out, lse[:, :, : q.shape[2]]


def _efficient_bwd(do, q, k, v, out, lse, causal, scale):
    padded = -(-q.shape[2] // 32) * 32
    lse_p = torch.zeros(*lse.shape[:2], padded, device=lse.device, dtype=torch.float32)
    lse_p[:, :, : q.shape[2]] = lse
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        do, q, k, v, None, out, lse_p, None, None, 0.0, [True, True, True, False], causal, scale=scale)
    return dq, dk, dv


def _cpu_fwd(q, k, v, causal, scale):
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse


def _cpu_bwd(do, q, k, v, out, lse, causal, scale):
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, out, lse, 0.0, causal, scale=scale)


_HALF = (torch.float16, torch.bfloat16)
OPS = {
    "cudnn": Op("cudnn", "cuda", _HALF, True, _cudnn_fwd, _cudnn_bwd),
    "flash": Op("flash", "cuda", _HALF, True, _flash_fwd, _flash_bwd),
    "efficient": Op("efficient", "cuda", (*_HALF, torch.float32), False, _efficient_fwd, _efficient_bwd),
    "cpu": Op("cpu", "cpu", (*_HALF, torch.float32, torch.float64), True, _cpu_fwd, _cpu_bwd),
}


def merge(state: State, out: Tensor, lse: Tensor) -> None:
    """Fold a normalised block result (out (b, s, h, d), lse (b, h, s)) into ``state`` in place."""
    if out.is_cuda:
        return _merge_triton(state, out, lse)
    m_new = torch.maximum(state.m, lse)
    m_ref = torch.where(torch.isfinite(m_new), m_new, 0.0)
    keep = torch.exp(state.m - m_ref)
    add = torch.exp(lse - m_ref)
    state.acc.mul_(keep.transpose(1, 2).unsqueeze(-1)).add_(out * add.transpose(1, 2).unsqueeze(-1))
    state.lse.copy_(m_ref + torch.log(torch.exp(state.lse - m_ref) + add))
    state.m.copy_(m_new)


def fold(state: State, row0: int, o: Tensor, lse: Tensor, *, fresh: bool, out: Tensor | None) -> None:
    """Fold a normalised result (o (b, s − row0, h, d), lse (b, h, s − row0)) of rows row0: (rows
    above see nothing of the block) into ``state``, as ``Backend.forward`` with ``fresh`` and ``out``."""
    rows = state.rows(row0, state.m.shape[-1])
    if not fresh:
        merge(rows, o, lse)
        state.finish(out)
        return
    # An empty state merged with (o, lse) is (acc = o, m = lse, lse): no merge pass; rows above
    # row0 stay empty.
    rows.m.copy_(lse)
    rows.lse.copy_(lse)
    if out is None:
        rows.acc.copy_(o)
    else:
        out[:, row0:].copy_(o)
        out[:, :row0].zero_()


def _merge_triton(state: State, out: Tensor, lse: Tensor) -> None:
    import triton

    from ring_sp.kernels.triton_kernels import merge_kernel

    b, s, h, d = out.shape
    acc, m = state.acc, state.m
    block_s, block_d = 64, max(16, triton.next_power_of_2(d))
    assert out.stride(-1) == 1 and acc.stride(-1) == 1 and m.stride() == state.lse.stride()
    merge_kernel[(triton.cdiv(s, block_s), b * h)](
        acc, m, state.lse, out, lse,
        acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1), m.stride(2),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        h, s, d, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4)


def accumulate(dst: Tensor, src: Tensor) -> None:
    """dst (float32, (b, s, h, d)) += src (same shape, any float dtype); fused on CUDA."""
    if not (dst.is_cuda and src.stride(-1) == 1 and dst.stride(-1) == 1):
        dst += src
        return
    import triton

    from ring_sp.kernels.triton_kernels import accumulate_kernel

    b, s, h, d = src.shape
    block_s = 64
    accumulate_kernel[(triton.cdiv(s, block_s), b * h)](
        dst, src, dst.stride(0), dst.stride(1), dst.stride(2), src.stride(0), src.stride(1), src.stride(2), h, s, d,
        BLOCK_S=block_s, BLOCK_D=max(16, triton.next_power_of_2(d)), num_warps=4)


class SdpaBackend:
    """``op=None``: the first of cuDNN, flash, efficient (CUDA) or the CPU kernel that takes the inputs."""

    auto_devices = ("cuda", "cpu")

    def __init__(self, op: str | None = None):
        self.op_name = op
        self.name = "sdpa" if op is None else f"sdpa_{op}"

    def _op(self, q: Tensor) -> Op | None:
        names = [self.op_name] if self.op_name else ["cudnn", "flash", "efficient", "cpu"]
        for name in names:
            op = OPS[name]
            if op.device == q.device.type and q.dtype in op.dtypes and _available(op, q):
                return op
        return None

    def unsupported(self, q: Tensor, k: Tensor, visibility: Visibility) -> str | None:
        band = visibility.band
        if visibility.key_mask is not None:
            return "takes no key mask"
        if visibility.documents is not None:
            return "takes no document mask (blocks inside one document do not need one)"
        if band.hi is not None or (band.lo is not None and band.lo < 0):
            return f"computes full and causal blocks only, not lo={band.lo}, hi={band.hi}"
        if self._op(q) is None:
            return f"no fused op for {q.dtype} on {q.device.type}"
        return None

    @staticmethod
    def _shifted(band: Band, sq: int, sk: int) -> tuple[int, int, bool]:
        """(first query row, number of keys, causal) of the op call that computes ``band``."""
        if band.lo is None:
            return 0, sk, False
        return band.lo, min(sk, sq - band.lo), True

    def forward(self, q: Tensor, k: Tensor, v: Tensor, state: State, visibility: Visibility, scale: float, *,
                fresh: bool = False, out: Tensor | None = None) -> None:
        op = self._op(q)
        sq = q.shape[1]
        row0, n_keys, causal = self._shifted(visibility.band, sq, k.shape[1])
        if row0 >= sq or n_keys <= 0:
            state.finish(out)
            return
        k, v = _expand(op, q, k[:, :n_keys]), _expand(op, q, v[:, :n_keys])
        o, lse = op.forward(q[:, row0:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, scale)
        fold(state, row0, o.transpose(1, 2), lse.to(state.lse.dtype), fresh=fresh, out=out)

    def backward(self, do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, delta: Tensor,
                 dq: Tensor, dk: Tensor, dv: Tensor, visibility: Visibility, scale: float) -> None:
        op = self._op(q)
        row0, n_keys, causal = self._shifted(visibility.band, q.shape[1], k.shape[1])
        if row0 >= q.shape[1] or n_keys <= 0:
            return
        t = lambda x: x[:, row0:].transpose(1, 2)  # noqa: E731
        kx, vx = _expand(op, q, k[:, :n_keys]), _expand(op, q, v[:, :n_keys])
        gq, gk, gv = op.backward(t(do), t(q), kx.transpose(1, 2), vx.transpose(1, 2), t(out), lse[:, :, row0:],
                                 causal, scale)
        accumulate(dq[:, row0:], gq.transpose(1, 2))
        accumulate(dk[:, :n_keys], _reduce(k, gk.transpose(1, 2)))
        accumulate(dv[:, :n_keys], _reduce(v, gv.transpose(1, 2)))


def _expand(op: Op, q: Tensor, kv: Tensor) -> Tensor:
    """K/V with q's head count when the op cannot take fewer (repeat_interleave order)."""
    group = q.shape[2] // kv.shape[2]
    return kv if op.gqa or group == 1 else kv.repeat_interleave(group, dim=2)


def _reduce(kv: Tensor, grad: Tensor) -> Tensor:
    """Sum the gradient of expanded K/V back over each group of query heads (in float32)."""
    b, s, h, d = grad.shape
    hk = kv.shape[2]
    return grad if h == hk else grad.float().reshape(b, s, hk, h // hk, d).sum(3)


_AVAILABLE: dict[tuple[str, torch.device, torch.dtype], bool] = {}


def _available(op: Op, q: Tensor) -> bool:
    """Whether ``op`` runs here, forward and backward (tried once per device, dtype and head_dim)."""
    key = (op.name, q.device, q.dtype, q.shape[-1])
    if key not in _AVAILABLE:
        try:
            x = torch.randn(1, 2, 16, q.shape[-1], device=q.device, dtype=q.dtype)
            out, lse = op.forward(x, x, x, True, 1.0)
            grads = op.backward(x, x, x, x, out, lse, True, 1.0)
            _AVAILABLE[key] = all(bool(torch.isfinite(g).all()) for g in grads)
        except (RuntimeError, TypeError, IndexError):
            _AVAILABLE[key] = False
    return _AVAILABLE[key]
