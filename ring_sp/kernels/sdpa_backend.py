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

FlashAttention-4 (``pip install ring_sp[fa4]``), where it loads and agrees with float32 math on a small call, comes
first for dense calls: full ones, and causal ones that are square (its causal mask is aligned bottom-right).

Blocks of several documents whose runs the schedule lists (``document_grid=WHOLE``) go to a ragged op
as a batch of variable-length sequences, one per document: one CPU kernel call per document on the CPU;
cuDNN's through NVIDIA's cudnn-frontend on CUDA where it is installed (op ``cudnn_ragged``, first under
``sdpa`` and ``auto``; ``sdpa_cudnn`` never uses it). Full blocks, and causal ones whose every document holds as
many rows as columns (its own causal square).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from ring_sp.band import Band
from ring_sp.kernels.state import State, state_dtype
from ring_sp.kernels.visibility import BlockDocuments, Ragged, Visibility, power_of_two, ragged

aten = torch.ops.aten
log = logging.getLogger("ring_sp")


@dataclass(frozen=True)
class Op:
    """One fused op on (batch, heads, seq, head_dim) tensors: forward → (out, lse (b, h, s) fp32).

    ``ragged_forward`` / ``ragged_backward`` (None: the op has none): the same on a batch of variable-length
    sequences packed as (tokens, heads, head_dim), lse (tokens, heads), described by a :class:`Ragged`.
    """

    name: str
    device: str
    dtypes: tuple[torch.dtype, ...]
    gqa: bool  # takes K/V with fewer heads
    forward: Callable[[Tensor, Tensor, Tensor, bool, float], tuple[Tensor, Tensor]]
    backward: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, bool, float], tuple[Tensor, Tensor, Tensor]]
    ragged_forward: Callable[[Tensor, Tensor, Tensor, Ragged, bool, float], tuple[Tensor, Tensor]] | None = None
    ragged_backward: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Ragged, bool, float],
                              tuple[Tensor, Tensor, Tensor]] | None = None
    one_token: bool = True  # takes a call of one query on one key (cuDNN 9.19's backward refuses s_q = s_kv = 1)
    square_causal: bool = False  # aligns its causal mask bottom-right: causal calls only where rows == keys


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


# FlashAttention-4 (``pip install flash-attn-4``: CuTe DSL kernels for Hopper and Blackwell, compiled on first use
# per dtype, head_dim and mask kind, not per length). Tensors (batch, seq, heads, d), GQA native, lse (batch, heads,
# seq) fp32. Its causal mask is aligned bottom-right, ours top-left: they agree on square calls (square_causal).
def _fa4():
    from flash_attn.cute import interface

    return interface


def _fa4_fwd(q, k, v, causal, scale):
    out, lse, *_ = _fa4()._flash_attn_fwd(*_seq_first(q, k, v), softmax_scale=scale, causal=causal, return_lse=True)
    return out.transpose(1, 2), lse


def _fa4_bwd(do, q, k, v, out, lse, causal, scale):
    q, k, v, out, do = _seq_first(q, k, v, out, do)
    grads = _fa4()._flash_attn_bwd(q, k, v, out, do, lse.contiguous(), softmax_scale=scale, causal=causal)
    return tuple(g.transpose(1, 2) for g in grads[:3])


# cuDNN's ragged attention through NVIDIA's cudnn-frontend (``pip install nvidia-cudnn-frontend``), which keeps
# one execution plan per shape. (PyTorch's own ragged cuDNN op, aten._cudnn_attention_forward with cumulative
# lengths, builds a new plan on every call in torch 2.11: measured 65 ms a 16k block.)
def _cudnn_frontend_ops():
    try:
        import cudnn.sdpa.fwd.torch_op as frontend  # registers torch.ops.cudnn.sdpa_fwd / sdpa_bwd
    except Exception as error:  # not installed, or it cannot load cuDNN here: the grid plan serves documents
        raise ImportError(f"cudnn-frontend's SDPA ops are not usable: {error}") from error
    return frontend


def _cudnn_ragged_fwd(q, k, v, docs: Ragged, causal, scale):
    _cudnn_frontend_ops()
    out, lse = torch.ops.cudnn.sdpa_fwd(q, k, v, scale, is_causal=causal, cu_seqlens_q=docs.cu_q,
                                        cu_seqlens_kv=docs.cu_k, max_seqlen_q=docs.max_q, max_seqlen_kv=docs.max_k,
                                        return_lse=True)
    return out, lse.reshape(q.shape[:2])


def _cudnn_ragged_bwd(do, q, k, v, out, lse, docs: Ragged, causal, scale):
    frontend = _cudnn_frontend_ops()
    padded = frontend.thd_lse_to_padded(lse, docs.cu_q, docs.max_q)  # the backward takes (docs, heads, longest)
    # Its plans are keyed on the token totals too: both padded to one power of two, new totals reuse a plan.
    tq, tk = q.shape[0], k.shape[0]
    tokens = power_of_two(max(tq, tk))
    do, q, out, k, v = (_pad_rows(x, tokens) for x in (do, q, out, k, v))
    dq, dk, dv = torch.ops.cudnn.sdpa_bwd(do, q, k, v, out, padded, scale, is_causal=causal, cu_seqlens_q=docs.cu_q,
                                          cu_seqlens_kv=docs.cu_k, max_seqlen_q=docs.max_q, max_seqlen_kv=docs.max_k)
    return dq[:tq], dk[:tk], dv[:tk]


def _pad_rows(x: Tensor, n: int) -> Tensor:
    """``x`` (tokens, heads, d) with zero rows appended up to ``n`` tokens."""
    if x.shape[0] == n:
        return x
    padded = x.new_zeros(n, *x.shape[1:])
    padded[: x.shape[0]] = x
    return padded


# PyTorch's cuDNN op builds (and keeps) a plan for every new pair of lengths: ~40 ms forward and backward each
# (measured: 14 new pairs and 580-1080 ms a step on the 128k ring of 8 with new documents every step, H100).
# Whole-block plans cut new single-document blocks from every batch of documents, so lengths that do not recur go
# to cudnn-frontend's ragged op as one sequence per batch element, whose plans are keyed on lengths rounded up to
# powers of two. Multiples of 256 and one less (shards, zigzag halves, grid cells and their one-token causal shift:
# the lengths that recur; a cut document piece is one with odds ~1/4000) stay on PyTorch's op, 4-20% faster.
def _cudnn_any_fwd(q, k, v, causal, scale):
    fwd = _cudnn_fwd if _recurring(q.shape[2], k.shape[2]) else _frontend_fwd
    return fwd(q, k, v, causal, scale)


def _cudnn_any_bwd(do, q, k, v, out, lse, causal, scale):
    bwd = _cudnn_bwd if _recurring(q.shape[2], k.shape[2]) else _frontend_bwd
    return bwd(do, q, k, v, out, lse, causal, scale)


def _frontend_fwd(q, k, v, causal, scale):
    """cudnn-frontend's ragged op on (batch, heads, seq, d) inputs, each batch element one sequence."""
    b, h, sq, d = q.shape
    out, lse = _cudnn_ragged_fwd(*_packed(*_seq_first(q, k, v)), _one_each(b, sq, k.shape[2], q.device), causal,
                                 scale)
    return out.view(b, sq, h, -1).transpose(1, 2), lse.view(b, sq, h).transpose(1, 2)


def _frontend_bwd(do, q, k, v, out, lse, causal, scale):
    b, h, sq, d = q.shape
    sk = k.shape[2]
    lse_t = lse.transpose(1, 2).reshape(b * sq, h).contiguous()
    grads = _cudnn_ragged_bwd(*_packed(*_seq_first(do, q, k, v, out)), lse_t, _one_each(b, sq, sk, q.device), causal,
                              scale)
    return tuple(g.view(b, n, *g.shape[1:]).transpose(1, 2) for g, n in zip(grads, (sq, sk, sk)))


def _recurring(*lengths: int) -> bool:
    return all((n + 1) % 256 <= 1 for n in lengths)


def _seq_first(*xs: Tensor) -> list[Tensor]:
    return [x.transpose(1, 2) for x in xs]  # (batch, heads, seq, d) -> (batch, seq, heads, d)


@lru_cache(maxsize=1024)
def _one_each(batch: int, rows: int, cols: int, device: torch.device) -> Ragged:
    """Each batch element one sequence of ``rows`` queries on ``cols`` keys."""
    return ragged(((rows, cols),) * batch, device)


def _each_document(docs: Ragged):
    """(rows, columns) slices of each document with rows and columns."""
    r = c = 0
    for rows, cols in docs.runs:
        if rows and cols:
            yield slice(r, r + rows), slice(c, c + cols)
        r, c = r + rows, c + cols


def _heads_first(*xs: Tensor) -> list[Tensor]:
    return [x.transpose(0, 1)[None] for x in xs]  # (tokens, heads, d) -> (1, heads, tokens, d)


def _cpu_ragged_fwd(q, k, v, docs: Ragged, causal, scale):
    out = q.new_zeros(q.shape)
    lse = q.new_full(q.shape[:2], float("-inf"), dtype=state_dtype(q.dtype))
    for rows, cols in _each_document(docs):
        o, l_ = _cpu_fwd(*_heads_first(q[rows], k[cols], v[cols]), causal, scale)
        out[rows], lse[rows] = o[0].transpose(0, 1), l_[0].t()
    return out, lse


def _cpu_ragged_bwd(do, q, k, v, out, lse, docs: Ragged, causal, scale):
    grads = [torch.zeros_like(x) for x in (q, k, v)]
    for rows, cols in _each_document(docs):
        parts = _cpu_bwd(*_heads_first(do[rows], q[rows], k[cols], v[cols], out[rows]), lse[rows].t()[None], causal,
                         scale)
        for grad, part, index in zip(grads, parts, (rows, cols, cols)):
            grad[index] = part[0].transpose(0, 1)
    return tuple(grads)


_HALF = (torch.float16, torch.bfloat16)
OPS = {
    # FlashAttention-4 where it is installed: first for dense calls (H100, head_dim 64: 1.25x cuDNN forward+backward).
    "fa4": Op("fa4", "cuda", _HALF, True, _fa4_fwd, _fa4_bwd, one_token=False, square_causal=True),
    "cudnn": Op("cudnn", "cuda", _HALF, True, _cudnn_fwd, _cudnn_bwd, one_token=False),
    # PyTorch's cuDNN op for the lengths that recur, cudnn-frontend's ragged op for the rest and for blocks of several
    # documents (first under sdpa / auto where cudnn-frontend is installed).
    "cudnn_ragged": Op("cudnn_ragged", "cuda", _HALF, True, _cudnn_any_fwd, _cudnn_any_bwd, _cudnn_ragged_fwd,
                       _cudnn_ragged_bwd, one_token=False),
    "flash": Op("flash", "cuda", _HALF, True, _flash_fwd, _flash_bwd),
    "efficient": Op("efficient", "cuda", (*_HALF, torch.float32), False, _efficient_fwd, _efficient_bwd),
    "cpu": Op("cpu", "cpu", (*_HALF, torch.float32, torch.float64), True, _cpu_fwd, _cpu_bwd, _cpu_ragged_fwd,
              _cpu_ragged_bwd),
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
    """dst ((b, s, h, d), float32 or src's dtype) += src (same shape, any float dtype); fused on CUDA."""
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
    """``op=None``: the first of FlashAttention-4 (dense calls), cuDNN with cudnn-frontend (``cudnn_ragged``), cuDNN,
    flash, efficient (CUDA) or the CPU kernel that takes the inputs."""

    auto_devices = ("cuda", "cpu")
    takes_document_runs = True  # blocks of several documents need their runs (document_grid=WHOLE)
    uses_delta = False  # the fused ops compute rowsum(do · out) themselves
    adds_once = True  # one op call, one accumulate per gradient

    def __init__(self, op: str | None = None):
        self.op_name = op
        self.name = "sdpa" if op is None else f"sdpa_{op}"

    def _op(self, q: Tensor, ragged: bool = False, rows: int = 2, keys: int = 2, causal: bool = False) -> Op | None:
        """The first op that takes ``q``'s device and dtype (and its ragged form) for a call of ``rows`` queries
        on ``keys`` keys."""
        names = [self.op_name] if self.op_name else ["fa4", "cudnn_ragged", "cudnn", "flash", "efficient", "cpu"]
        for name in names:
            op = OPS[name]
            if (op.device == q.device.type and q.dtype in op.dtypes and (not ragged or op.ragged_forward)
                    and (op.one_token or rows != 1 or keys != 1)
                    and (not op.square_causal or not causal or rows == keys) and _available(op, q, ragged)):
                return op
        return None

    def unsupported(self, q: Tensor, k: Tensor, visibility: Visibility) -> str | None:
        band = visibility.band
        if visibility.key_mask is not None:
            return "takes no key mask"
        if band.hi is not None or (band.lo is not None and band.lo < 0):
            return f"computes full and causal blocks only, not lo={band.lo}, hi={band.hi}"
        docs = visibility.documents
        if docs is not None:
            return _unsupported_documents(docs.runs, band) or (
                None if self._op(q, ragged=True) else f"no ragged (per-document) op for {q.dtype} on {q.device.type}")
        op, row0, n_keys, _ = self._call(q, k, band)
        if op is None:
            return f"no fused op for {q.dtype} on {q.device.type} and {q.shape[1] - row0} x {n_keys} tokens"
        return None

    def op_for(self, q: Tensor, k: Tensor, visibility: Visibility) -> str | None:
        """The name of the fused op that computes such a block (None: none does)."""
        op = self._op(q, ragged=True) if visibility.documents is not None else self._call(q, k, visibility.band)[0]
        return op.name if op else None

    def _call(self, q: Tensor, k: Tensor, band: Band) -> tuple[Op | None, int, int, bool]:
        """(op, first query row, number of keys, causal) of the dense op call that computes ``band``."""
        row0, n_keys, causal = self._shifted(band, q.shape[1], k.shape[1])
        return self._op(q, rows=q.shape[1] - row0, keys=n_keys, causal=causal), row0, n_keys, causal

    @staticmethod
    def _shifted(band: Band, sq: int, sk: int) -> tuple[int, int, bool]:
        """(first query row, number of keys, causal) of the op call that computes ``band``."""
        if band.lo is None:
            return 0, sk, False
        return band.lo, min(sk, sq - band.lo), True

    def forward(self, q: Tensor, k: Tensor, v: Tensor, state: State, visibility: Visibility, scale: float, *,
                fresh: bool = False, out: Tensor | None = None) -> None:
        if visibility.documents is not None:
            return self._ragged_forward(q, k, v, state, visibility, scale, fresh, out)
        row0, n_keys, _ = self._shifted(visibility.band, q.shape[1], k.shape[1])
        if row0 >= q.shape[1] or n_keys <= 0:
            state.finish(out)
            return
        op, row0, n_keys, causal = self._call(q, k, visibility.band)
        k, v = _expand(op, q, k[:, :n_keys]), _expand(op, q, v[:, :n_keys])
        o, lse = op.forward(q[:, row0:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, scale)
        fold(state, row0, o.transpose(1, 2), lse.to(state.lse.dtype), fresh=fresh, out=out)

    def _ragged_forward(self, q, k, v, state, visibility, scale, fresh, out) -> None:
        op, docs = self._op(q, ragged=True), visibility.documents.ragged()
        b, sq, h, d = q.shape
        o, lse = op.ragged_forward(*_packed(q, k, v), docs, visibility.band.lo is not None, scale)
        fold(state, 0, o.view(b, sq, h, d), lse.view(b, sq, h).transpose(1, 2).to(state.lse.dtype), fresh=fresh,
             out=out)

    def _ragged_backward(self, do, q, k, v, out, lse, dq, dk, dv, visibility, scale) -> None:
        op, docs = self._op(q, ragged=True), visibility.documents.ragged()
        b, sq, h, d = q.shape
        lse_t = lse.transpose(1, 2).reshape(b * sq, h).to(state_dtype(q.dtype)).contiguous()
        dq_, dk_, dv_ = op.ragged_backward(*_packed(do, q, k, v, out), lse_t, docs, visibility.band.lo is not None,
                                           scale)
        accumulate(dq, dq_.view(q.shape))
        accumulate(dk, dk_.view(k.shape))
        accumulate(dv, dv_.view(v.shape))

    def backward(self, do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, delta: Tensor | None,
                 dq: Tensor, dk: Tensor, dv: Tensor, visibility: Visibility, scale: float) -> None:
        if visibility.documents is not None:
            return self._ragged_backward(do, q, k, v, out, lse, dq, dk, dv, visibility, scale)
        row0, n_keys, _ = self._shifted(visibility.band, q.shape[1], k.shape[1])
        if row0 >= q.shape[1] or n_keys <= 0:
            return
        op, row0, n_keys, causal = self._call(q, k, visibility.band)
        t = lambda x: x[:, row0:].transpose(1, 2)  # noqa: E731
        kx, vx = _expand(op, q, k[:, :n_keys]), _expand(op, q, v[:, :n_keys])
        gq, gk, gv = op.backward(t(do), t(q), kx.transpose(1, 2), vx.transpose(1, 2), t(out), lse[:, :, row0:],
                                 causal, scale)
        accumulate(dq[:, row0:], gq.transpose(1, 2))
        accumulate(dk[:, :n_keys], _reduce(k, gk.transpose(1, 2)))
        accumulate(dv[:, :n_keys], _reduce(v, gv.transpose(1, 2)))


def _unsupported_documents(runs: tuple[tuple[int, int], ...], band: Band) -> str | None:
    """Why a ragged op cannot compute a block of these documents under ``band`` (None: it can)."""
    if not runs:
        return ("takes a block of several documents only with each document's rows and columns listed "
                "(document_grid=WHOLE)")
    if band.lo is None:
        if any(rows and not cols for rows, cols in runs):
            return "takes no rows without keys in a block of several documents"
        return None
    if band.lo != 0 or any(rows != cols for rows, cols in runs):
        return "takes causal blocks of several documents only where each document holds its own causal square"
    return None


def _packed(*xs: Tensor) -> list[Tensor]:
    """(batch, seq, heads, d) -> (batch · seq, heads, d): the batch elements one after another."""
    return [x.reshape(-1, *x.shape[2:]) for x in xs]


def _expand(op: Op, q: Tensor, kv: Tensor) -> Tensor:
    """K/V with q's head count when the op cannot take fewer (repeat_interleave order)."""
    group = q.shape[2] // kv.shape[2]
    return kv if op.gqa or group == 1 else kv.repeat_interleave(group, dim=2)


def _reduce(kv: Tensor, grad: Tensor) -> Tensor:
    """Sum the gradient of expanded K/V back over each group of query heads (in float32)."""
    b, s, h, d = grad.shape
    hk = kv.shape[2]
    return grad if h == hk else grad.float().reshape(b, s, hk, h // hk, d).sum(3)


_AVAILABLE: dict[tuple[str, torch.device, torch.dtype, int, bool], bool] = {}


def _available(op: Op, q: Tensor, ragged: bool = False) -> bool:
    """Whether ``op`` (or its ragged form) runs here, forward and backward, and agrees with itself (tried once
    per device, dtype and head_dim). The trial builds its float32 reference with autograd whatever mode the caller
    is in: a first call under ``no_grad`` (a recomputed layer's first forward) must not rule the op out."""
    key = (op.name, q.device, q.dtype, q.shape[-1], ragged)
    if key not in _AVAILABLE:
        try:
            # the ragged trial checks against the op's dense form, so that form must have passed its own first
            with torch.inference_mode(False), torch.enable_grad():
                works = (_available(op, q) and _try_ragged(op, q)) if ragged else _try(op, q)
            why = "it disagrees with float32 math"
        except Exception as error:  # noqa: BLE001 - an optional package that fails in any way is not used
            works, why = False, f"{type(error).__name__}: {error}"
        _AVAILABLE[key] = works
        # not installed: no news; installed but failing: a slower op computes the blocks, which users must hear of
        quiet = works or why.startswith(("ImportError", "ModuleNotFoundError"))
        say = log.debug if quiet else log.warning
        say("sdpa op %s%s%s for %s head_dim %d on %s%s", op.name, " (ragged)" * ragged, " not used" * (not works),
            q.dtype, q.shape[-1], q.device.type, "" if works else f": {why}")
    return _AVAILABLE[key]


def _try(op: Op, q: Tensor) -> bool:
    """A causal call of 24 tokens (cudnn_ragged's cudnn-frontend path) with GQA against float32 math."""
    g = torch.Generator().manual_seed(0)
    d = q.shape[-1]
    x, do = (torch.randn(1, 4, 24, d, generator=g).to(q.device, q.dtype) for _ in range(2))
    y, z = (torch.randn(1, 2, 24, d, generator=g).to(q.device, q.dtype) for _ in range(2))
    y, z = (y, z) if op.gqa else (y.repeat_interleave(2, 1), z.repeat_interleave(2, 1))
    scale = d**-0.5
    out, lse = op.forward(x, y, z, True, scale)
    grads = op.backward(do, x, y, z, out, lse, True, scale)
    ref = [t.float().requires_grad_() for t in (x, y, z)]
    keys, values = (t.repeat_interleave(x.shape[1] // t.shape[1], 1) for t in ref[1:])
    scores = (ref[0] @ keys.transpose(-1, -2) * scale).masked_fill(
        torch.ones(24, 24, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    want = scores.softmax(-1) @ values
    want.backward(do.float())
    close = lambda a, b: torch.allclose(a.float(), b.float(), atol=5e-2, rtol=5e-2)  # noqa: E731
    return (close(out, want) and close(lse.reshape(want.shape[:3]), scores.logsumexp(-1))
            and all(close(a, b.grad) for a, b in zip(grads, ref)))


def _try_ragged(op: Op, q: Tensor) -> bool:
    """Two documents of 16 and 48 tokens through the ragged op against the dense op on each one."""
    ids = torch.tensor([[0] * 16 + [1] * 48], dtype=torch.int32, device=q.device)
    docs = BlockDocuments(ids, ids, ((16, 16), (48, 48))).ragged()
    scale = q.shape[-1] ** -0.5
    q, k, v, do = (torch.randn(64, 2, q.shape[-1], device=q.device, dtype=q.dtype) for _ in range(4))
    out, lse = op.ragged_forward(q, k, v, docs, True, scale)
    grads = op.ragged_backward(do, q, k, v, out, lse, docs, True, scale)
    close = lambda a, b: torch.allclose(a.float(), b.float(), atol=5e-2, rtol=5e-2)  # noqa: E731
    ok = True
    for part in (slice(0, 16), slice(16, 64)):
        parts = _heads_first(q[part], k[part], v[part])
        want, want_lse = op.forward(*parts, True, scale)
        want_grads = op.backward(*_heads_first(do[part]), *parts, want, want_lse, True, scale)
        ok = ok and close(out[part], want[0].transpose(0, 1)) and close(lse[part], want_lse[0].t())
        ok = ok and all(close(g[part], w[0].transpose(0, 1)) for g, w in zip(grads, want_grads))
    return ok
