"""Reference block backend in plain PyTorch: any device, any floating dtype.

Scores are materialised one (bucket_size × bucket_size) tile at a time, in float32 (float64 for
float64 inputs). GQA groups query heads as (kv_heads, group) instead of repeating K/V.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ring_sp.band import Band
from ring_sp.kernels.state import State, state_dtype
from ring_sp.kernels.visibility import Visibility

DEFAULT_BUCKET = 1024


def _tiles(n: int, size: int) -> range:
    return range(0, n, size)


def _band_bounds(band: Band, q0: int, tq: int, k0: int, tk: int) -> tuple[bool, bool]:
    """(any cell visible, every cell visible) for the tile at rows q0.., columns k0.. ."""
    d_min, d_max = q0 - (k0 + tk - 1), q0 + tq - 1 - k0
    lo = d_min if band.lo is None else band.lo
    hi = d_max if band.hi is None else band.hi
    return max(lo, d_min) <= min(hi, d_max), lo <= d_min and hi >= d_max


def _visible(band: Band, q0: int, tq: int, k0: int, tk: int, device: torch.device) -> Tensor:
    """(tq, tk) bool: which cells of the tile the band shows."""
    d = (torch.arange(q0, q0 + tq, device=device)[:, None] - torch.arange(k0, k0 + tk, device=device)[None, :])
    ok = torch.ones_like(d, dtype=torch.bool)
    if band.lo is not None:
        ok &= d >= band.lo
    if band.hi is not None:
        ok &= d <= band.hi
    return ok


class TorchBackend:
    name = "torch"
    auto_devices = None

    def __init__(self, bucket_size: int | None = None):
        self.bucket = bucket_size or DEFAULT_BUCKET

    def unsupported(self, q: Tensor, k: Tensor, visibility: Visibility) -> str | None:
        if not q.is_floating_point():
            return f"needs floating-point inputs, got {q.dtype}"
        return None

    def _scores(self, q: Tensor, k: Tensor, vis: Visibility, scale: float, rows: slice, cols: slice,
                full: bool) -> Tensor:
        """Scaled scores (batch, kv_heads, group, tq, tk) of the tile at ``rows`` × ``cols``, −inf where
        not visible."""
        s = torch.einsum("bihgd,bjhd->bhgij", q, k) * scale
        if not full:
            s = s.masked_fill(~_visible(vis.band, rows.start, q.shape[1], cols.start, k.shape[1], s.device),
                              float("-inf"))
        if vis.key_mask is not None:
            s = s.masked_fill(~vis.key_mask[:, None, None, None, cols], float("-inf"))
        if vis.documents is not None:
            s = s.masked_fill(~vis.documents.same(rows, cols)[:, None, None], float("-inf"))
        return s

    def _tile_pairs(self, band: Band, sq: int, sk: int):
        for q0 in _tiles(sq, self.bucket):
            tq = min(self.bucket, sq - q0)
            for k0 in _tiles(sk, self.bucket):
                tk = min(self.bucket, sk - k0)
                any_visible, full = _band_bounds(band, q0, tq, k0, tk)
                if any_visible:
                    yield slice(q0, q0 + tq), slice(k0, k0 + tk), full

    def forward(self, q: Tensor, k: Tensor, v: Tensor, state: State, visibility: Visibility, scale: float, *,
                fresh: bool = False, out: Tensor | None = None) -> None:
        b, sq, h, d = q.shape
        hk = k.shape[2]
        g = h // hk
        dt = state_dtype(q.dtype)
        qg = q.reshape(b, sq, hk, g, d)
        acc = state.acc.view(b, sq, hk, g, d)
        m_all = state.m.view(b, hk, g, sq)
        lse_all = state.lse.view(b, hk, g, sq)
        for rows, cols, full in self._tile_pairs(visibility.band, sq, k.shape[1]):
            s = self._scores(qg[:, rows].to(dt), k[:, cols].to(dt), visibility, scale, rows, cols, full)
            m_old = m_all[..., rows]
            m_new = torch.maximum(m_old, s.amax(-1))
            m_ref = torch.where(torch.isfinite(m_new), m_new, 0.0)
            p = torch.exp(s - m_ref.unsqueeze(-1))
            alpha = torch.exp(m_old - m_ref)
            pv = torch.einsum("bhgij,bjhd->bihgd", p, v[:, cols].to(dt))
            acc[:, rows] = acc[:, rows] * alpha.permute(0, 3, 1, 2).unsqueeze(-1) + pv
            lse_all[..., rows] = m_ref + torch.log(torch.exp(lse_all[..., rows] - m_ref) + p.sum(-1))
            m_all[..., rows] = m_new
        state.finish(out)

    def backward(self, do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, delta: Tensor,
                 dq: Tensor, dk: Tensor, dv: Tensor, visibility: Visibility, scale: float) -> None:
        b, sq, h, d = q.shape
        hk = k.shape[2]
        g = h // hk
        dt = dq.dtype
        qg, dog = q.reshape(b, sq, hk, g, d), do.reshape(b, sq, hk, g, d)
        dqg = dq.view(b, sq, hk, g, d)
        lse_ref = torch.where(torch.isfinite(lse), lse, float("inf")).view(b, hk, g, sq)
        delta = delta.view(b, hk, g, sq)
        for rows, cols, full in self._tile_pairs(visibility.band, sq, k.shape[1]):
            qt, kt, vt, dot = qg[:, rows].to(dt), k[:, cols].to(dt), v[:, cols].to(dt), dog[:, rows].to(dt)
            s = self._scores(qt, kt, visibility, scale, rows, cols, full)
            p = torch.exp(s - lse_ref[..., rows].unsqueeze(-1))
            dv[:, cols] += torch.einsum("bhgij,bihgd->bjhd", p, dot)
            dp = torch.einsum("bihgd,bjhd->bhgij", dot, vt)
            ds = p * (dp - delta[..., rows].unsqueeze(-1)) * scale
            dqg[:, rows] += torch.einsum("bhgij,bjhd->bihgd", ds, kt)
            dk[:, cols] += torch.einsum("bhgij,bihgd->bjhd", ds, qt)
