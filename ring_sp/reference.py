"""What ring attention computes, written densely over a ring's whole sequence: the float64 reference.

``visible_pairs`` says which (query, key) pairs ``ring_attention`` lets attend under given options;
``dense_attention`` is softmax(q kᵀ · scale) v over those pairs, in float64 by default;
``dense_grads`` adds dq, dk, dv; ``rel_err`` measures a result against them. For checking a setup,
in tests and benchmarks: it forms the whole score matrix, so it is for short sequences only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ring_sp.documents import check_documents, document_ids
from ring_sp.layout import check_seq_len, local_positions


def visible_pairs(seq: int, *, causal: bool = False, max_lookback_seq_len: int | None = None,
                  ring_reduce_col: bool = True, layout: str = "contiguous", ring_size: int = 1,
                  cu_seqlens=None, batch: int = 1, device: torch.device | str | None = None) -> Tensor:
    """(seq, seq) bool: True where query p may attend key t of a ring's whole sequence of ``seq`` tokens.

    The options are :func:`ring_sp.ring_attention`'s, on global positions. ``layout`` and
    ``ring_size`` matter only with ``ring_reduce_col=False`` (each rank attends to its own keys).
    With ``cu_seqlens`` (one list for the ``batch``, or one per element) the result is
    (1 or batch, seq, seq): a query sees only keys of its own document.
    """
    pos = torch.arange(seq, device=device)
    diff = pos[:, None] - pos[None, :]
    vis = torch.ones(seq, seq, dtype=torch.bool, device=device)
    if causal:
        vis &= diff >= 0
    if max_lookback_seq_len is not None:
        vis &= diff < max_lookback_seq_len
    if not ring_reduce_col:
        check_seq_len(layout, seq, ring_size)
        owner = torch.empty(seq, dtype=torch.long, device=device)
        for r in range(ring_size):
            owner[local_positions(seq, layout, r, ring_size).to(pos.device)] = r
        vis &= owner[:, None] == owner[None, :]
    documents = check_documents(cu_seqlens, batch, seq)
    if documents is not None:
        ids = torch.stack([document_ids(bounds, pos) for bounds in documents])
        vis = vis[None] & (ids[:, :, None] == ids[:, None, :])
    return vis


def dense_attention(q: Tensor, k: Tensor, v: Tensor, *, visible: Tensor | None = None, mask: Tensor | None = None,
                    softmax_scale: float | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """softmax(q kᵀ · scale) v over the whole sequence, computed in ``dtype``; a query that sees no key gets 0.

    q: (batch, seq, heads, head_dim); k, v: (batch, seq, kv_heads, head_dim), heads % kv_heads == 0.
    ``visible``: (seq, seq) or (batch, seq, seq) bool, e.g. from :func:`visible_pairs` (default:
    every pair); ``mask``: (batch, seq) bool, the keys that may be attended. Returns
    (batch, seq, heads, head_dim) in ``dtype``.
    """
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: pass q (batch, seq, heads, "
                         "head_dim) and k, v (batch, seq, kv_heads, head_dim) of the whole sequence")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q has {q.shape[2]} heads, k and v {k.shape[2]}: heads must be a multiple of kv_heads")
    q, k, v = (t.to(dtype) for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if visible is None:
        visible = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool, device=q.device)
    allowed = visible[:, None] if visible.dim() == 3 else visible[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", p, v)


def dense_grads(q: Tensor, k: Tensor, v: Tensor, do: Tensor, **options) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, dq, dk, dv) of :func:`dense_attention` (same keyword options) for the output gradient ``do``."""
    dtype = options.get("dtype", torch.float64)
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = dense_attention(q, k, v, **options)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do.to(dtype)))


def rel_err(x: Tensor, ref: Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ in float64; NaN or inf anywhere in ``x`` gives inf.

    The denominator is at least 1e-3 · sqrt(numel) (an RMS of 1e-3, tiny beside unit-scale inputs),
    so a reference that is exactly zero, as dq is for a query that sees a single key, is compared
    absolutely instead of dividing rounding noise by zero.
    """
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-3 * ref.numel() ** 0.5)).item()
