"""Dense attention on the full sequence, for checking the ring against it."""

from __future__ import annotations

import torch
from torch import Tensor

from ring_sp import merge, split


def dense_attention(q: Tensor, k: Tensor, v: Tensor, *, causal=False, mask=None, lookback=None, scale=None,
                    dtype=torch.float64, visible_pairs: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ · scale) v over the full sequence, computed in ``dtype``; empty rows give 0.

    q: (batch, seq, heads, d); k, v: (batch, seq, kv_heads, d); mask: (batch, seq) bool keys;
    ``visible_pairs`` (seq, seq) or (batch, seq, seq) bool replaces the causal/lookback rule when given.
    """
    q, k, v = (t.to(dtype) for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    seq = q.shape[1]
    if visible_pairs is None:
        pos = torch.arange(seq, device=q.device)
        diff = pos[:, None] - pos[None, :]
        visible_pairs = torch.ones(seq, seq, dtype=torch.bool, device=q.device)
        if causal:
            visible_pairs &= diff >= 0
        if lookback is not None:
            visible_pairs &= diff < lookback
    visible = visible_pairs[:, None] if visible_pairs.dim() == 3 else visible_pairs[None, None]
    if mask is not None:
        visible = visible & mask[:, None, None, :]
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", p, v)


def rel_err(x: Tensor, ref: Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf.

    The denominator is at least 1e-3 · sqrt(numel) (an RMS of 1e-3, tiny beside the unit-scale
    inputs of the tests), so a reference that is exactly zero, as dq is for a query that sees
    a single key, is compared absolutely instead of dividing rounding noise by zero.
    """
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-3 * ref.numel() ** 0.5)).item()


def make_inputs(batch, seq, heads, kv_heads, head_dim, dtype, *, masked=False, seed=0, device="cpu"):
    """Random q, k, v (and a key mask with one fully masked batch row) for the full sequence."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, seq, kv_heads, head_dim, generator=g, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.rand(batch, seq, generator=g) > 0.3
        mask[0] = False  # queries that see no key at all must get 0, not NaN
    do = torch.randn(batch, seq, heads, head_dim, generator=g, dtype=torch.float64)
    cast = [t.to(device=device, dtype=dtype) for t in (q, k, v, do)]
    return (*cast[:3], None if mask is None else mask.to(device), cast[3])


def reference_grads(q, k, v, do, **kw):
    """(out, dq, dk, dv) of the dense attention in kw['dtype'] (default float64)."""
    dtype = kw.get("dtype", torch.float64)
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = dense_attention(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    return (out.detach(), *grads)


__all__ = ["dense_attention", "make_inputs", "merge", "reference_grads", "rel_err", "split"]
