"""Ring attention: the autograd Function that runs the schedule over a ring, and the public API.

Forward: at each step of the schedule a position receives, straight from their owner, the K/V
columns it needs (the next step's transfer is posted before the current step's blocks are
computed) and folds every block into its queries' float32 state. Backward runs the schedule
again: dq accumulates locally in float32; each step's dK/dV (float32) go straight back to the
owner of the K/V, which adds them up. delta = rowsum(do · out) is made only for backends that read it
(torch, triton; the fused ops of sdpa and flash_attn make their own). In a ring of one with such an op the
gradients stay in the inputs' dtype (one block, one exact add: ``_sole_block``). Nothing is
all-gathered, no autograd runs through communication.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from ring_sp import kernels
from ring_sp import schedule as schedules
from ring_sp.comm import DistributedRing, Ring, SimulatedRing, empty_like_rows, gather_signatures, resolve_ring
from ring_sp.documents import Documents, check_documents, fingerprint, ids_by_position
from ring_sp.kernels import BlockDocuments, State, Visibility, state_dtype
from ring_sp.layout import check_local_seq
from ring_sp.options import KWARGS, RingOptions, keywords
from ring_sp.schedule import Block, Schedule

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class KV(NamedTuple):
    """The block that travels: keys, values and their key mask, (batch, columns, ...)."""

    k: Tensor
    v: Tensor
    mask: Tensor | None

    def columns(self, start: int, stop: int) -> KV:
        return KV(self.k[:, start:stop], self.v[:, start:stop], None if self.mask is None else self.mask[:, start:stop])


class Grads(NamedTuple):
    """float32 dK, dV of K/V columns, on their way back to the owner."""

    dk: Tensor
    dv: Tensor


def _scale(opts: RingOptions, head_dim: int) -> float:
    return float(opts.softmax_scale) if opts.softmax_scale is not None else head_dim ** -0.5


def _plan(opts: RingOptions, documents: Documents | None, world: int, q: Tensor, k: Tensor,
          mask: Tensor | None) -> Schedule:
    """The schedule of this call. With documents: whole blocks (``schedules.WHOLE``) when the backend for each
    of them takes document boundaries itself (cuDNN's ragged attention), else cut on ``DOCUMENT_GRID``."""
    def plan(grid: int | None) -> Schedule:
        return schedules.plan(opts.layout, world, q.shape[1], causal=opts.causal, lookback=opts.max_lookback,
                              reduce_col=opts.reduce_col, documents=documents, document_grid=grid)

    if documents is not None and len(documents) == 1 and mask is None:
        whole = plan(schedules.WHOLE)
        if _takes_whole(whole, opts.backend, opts.bucket_size, q.device, q.dtype, q.shape[2:], k.shape[2]):
            return whole
    return plan(schedules.DOCUMENT_GRID)


def document_plan(opts: RingOptions, q: Tensor, k: Tensor) -> str:
    """How a ring with ``opts`` computes packed documents for inputs like ``q`` and ``k`` (their device, dtype,
    heads and head_dim): ``"whole"``, blocks of several documents kept whole for a kernel that takes document
    boundaries (cuDNN's ragged attention through cudnn-frontend, the CPU kernel), or ``"grid"``, cut on
    ``ring_sp.schedule.DOCUMENT_GRID`` (see README, packed sequences)."""
    q1, k1 = _like(q, k)
    schedule = _plan(opts, ((0, 5, 40, 100, 128),), 2, q1, k1, None)
    return "whole" if any(b.runs for step in schedule.steps for blocks in step for b in blocks) else "grid"


def attention_kernel(opts: RingOptions, q: Tensor, k: Tensor) -> str:
    """The kernel that computes a ring's blocks with ``opts`` (without key mask, window or documents) for inputs like
    ``q`` and ``k`` (their device, dtype, heads and head_dim): the backend's name, and for ``sdpa`` its fused op,
    e.g. ``"sdpa (fa4)"`` (FlashAttention-4), ``"sdpa (cudnn_ragged)"``, ``"sdpa (cpu)"``, ``"triton"``."""
    q1, k1 = _like(q, k)
    visibility = Visibility(kernels.Band(lo=0) if opts.causal else kernels.Band())
    backend = kernels.choose(opts.backend, q1, k1, visibility, opts.bucket_size)
    op = getattr(backend, "op_for", None)
    return f"{backend.name} ({op(q1, k1, visibility)})" if op else backend.name


def _like(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Empty shards of 64 tokens with ``q``'s and ``k``'s device, dtype, heads and head_dim."""
    return q.new_empty(1, 64, *q.shape[-2:]), k.new_empty(1, 64, *k.shape[-2:])


@lru_cache(maxsize=256)
def _takes_whole(schedule: Schedule, backend: str, bucket_size: int | None, device: torch.device,
                 dtype: torch.dtype, shape: tuple[int, int], kv_heads: int) -> bool:
    """Whether every block of several documents in ``schedule`` goes to a backend that takes their runs."""
    q = torch.empty(1, 1, *shape, device=device, dtype=dtype)
    k = torch.empty(1, 1, kv_heads, shape[-1], device=device, dtype=dtype)
    ids = torch.zeros(1, 1, dtype=torch.int32, device=device)
    for band, runs in {(b.band, b.runs) for step in schedule.steps for blocks in step for b in blocks if b.documents}:
        try:
            chosen = kernels.choose(backend, q, k, Visibility(band, None, BlockDocuments(ids, ids, runs)), bucket_size)
        except ValueError:
            return False
        if not getattr(chosen, "takes_document_runs", False):
            return False
    return True


def _check_tensors(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, local_seq, heads, head_dim), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q has dtype {q.dtype}: use float16, bfloat16, float32 or float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}: cast them")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    b, s, h, d = q.shape
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise ValueError(f"k/v {tuple(k.shape)} must match q {tuple(q.shape)} in batch, local_seq and head_dim "
                         "(batch, local_seq, kv_heads, head_dim)")
    if 0 in q.shape or k.shape[2] == 0:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have no empty dimension")
    if h % k.shape[2]:
        raise ValueError(f"heads={h} is not a multiple of kv_heads={k.shape[2]}: GQA needs heads % kv_heads == 0")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = key may be attended), got "
                             f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
        if tuple(mask.shape) != (b, s):
            raise ValueError(f"mask has shape {tuple(mask.shape)}: it must be (batch, local_seq) = {(b, s)}, "
                             "one flag per key of this rank")
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device} but q is on {q.device}: move it to q's device")


def _checked(opts: RingOptions, cu_seqlens, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
             world: int) -> Documents | None:
    """The documents of ``cu_seqlens``, normalised, after checking the options and one position's tensors."""
    opts.check(KWARGS)
    _check_tensors(q, k, v, mask)
    check_local_seq(opts.layout, q.shape[1], world)
    return check_documents(cu_seqlens, q.shape[0], q.shape[1] * world)


def _document_ids(opts: RingOptions, documents: Documents | None, world: int, q: Tensor) -> tuple[Tensor, ...] | None:
    """Per ring position, the document ids of its tokens (None without documents)."""
    if documents is None:
        return None
    return ids_by_position(documents, opts.layout, world, q.shape[1], q.shape[0], q.device)


@lru_cache(maxsize=4096)
def _block_documents(schedule: Schedule, ids: tuple[Tensor, ...], step: int, position: int,
                     index: int) -> BlockDocuments:
    """The document ids of one scheduled block (cached: every layer of a batch reuses them)."""
    block = schedule.steps[step][position][index]
    source = schedule.source(step, position)
    return BlockDocuments(ids[position][:, block.q_start:block.q_stop], ids[source][:, block.k_start:block.k_stop],
                          block.runs)


_BACKEND_CHECKED: set[tuple] = set()  # what _check_backend accepted: every layer of a model asks the same


def _check_backend(opts: RingOptions, schedule: Schedule, positions: list[int], q: Tensor, k: Tensor,
                   mask: Tensor | None, ids: tuple[Tensor, ...] | None) -> None:
    """Raise ValueError unless ``opts.backend`` can compute every block this process will meet."""
    key = (opts.backend, opts.bucket_size, schedule, tuple(positions), q.device, q.dtype, q.shape[2:], k.shape[2],
           mask is None, ids is None)
    if key in _BACKEND_CHECKED:
        return
    kinds = {(block.band, block.documents, block.runs) for step in schedule.steps for p in positions
             for block in step[p]}
    for band, has_documents, runs in kinds:
        documents = BlockDocuments(ids[positions[0]], ids[positions[0]], runs) if has_documents else None
        kernels.choose(opts.backend, q, k, Visibility(band, mask, documents), opts.bucket_size)
    if len(_BACKEND_CHECKED) > 1024:
        _BACKEND_CHECKED.clear()
    _BACKEND_CHECKED.add(key)


# what the ranks compare, in _signature's order: the tensors, the options (ring_size resolved), the documents
_FIELDS = ("inputs rejected", "batch", "local_seq", "heads", "kv_heads", "head_dim", "dtype", "mask",
           *keywords(), "cu_seqlens")


def _signature(q: Tensor, k: Tensor, mask: Tensor | None, opts: RingOptions,
               documents: Documents | None) -> tuple[int, ...]:
    return (0, *q.shape, k.shape[2], _DTYPES.index(q.dtype), mask is not None, *opts.codes(), fingerprint(documents))


def _raise_on_disagreement(rows: list[tuple[int, ...]], who: str, ring_size: int) -> None:
    """Every row must agree; document boundaries only within a ring (each ring holds its own sequences)."""
    failed = [n for n, row in enumerate(rows) if row[0]]
    if failed:
        raise ValueError(f"{who} {failed} rejected their inputs (their own error says why), so no rank ran the ring")
    for i, field in enumerate(_FIELDS):
        values = [row[i] for row in rows]
        if field == "cu_seqlens":
            values = [(n // ring_size, x) for n, x in enumerate(values)]
            if len(set(values)) > len({n // ring_size for n in range(len(rows))}):
                raise ValueError(f"{who}s of one ring disagree on cu_seqlens: every rank of a ring must pass the "
                                 "same document boundaries (those of the ring's whole sequence)")
            continue
        if len(set(values)) > 1:
            raise ValueError(f"{who}s disagree on {field} ({', '.join(f'{n}: {x}' for n, x in enumerate(values))}): "
                             "every rank of the group must pass the same shapes, dtype and options")


def _slices(block: Block, first_column: int) -> tuple[slice, slice]:
    """Rows of the queries and columns of the received K/V (which start at ``first_column``)."""
    return slice(block.q_start, block.q_stop), slice(block.k_start - first_column, block.k_stop - first_column)


class _Call:
    """One ring call's fixed parts: the transport, the schedule, the options and the document ids."""

    def __init__(self, ring: Ring, schedule: Schedule, opts: RingOptions, ids: tuple[Tensor, ...] | None):
        self.ring, self.schedule, self.opts, self.ids = ring, schedule, opts, ids

    def post_kv(self, kvs: list[KV], step: int):
        """Send each played position's K/V columns that step ``step``'s receiver needs; receive ours."""
        sched, ring = self.schedule, self.ring
        offset = sched.offsets[step]
        sends = []
        for kv, p in zip(kvs, ring.positions):
            cols = sched.columns(step, (p + offset) % ring.size)
            sends.append(None if cols is None else kv.columns(*cols))

        def buffers(i: int) -> KV | None:
            cols = sched.columns(step, ring.positions[i])
            return None if cols is None else empty_like_rows(kvs[i], cols[1] - cols[0])

        return ring.exchange(sends, offset, buffers)

    def blocks(self, step: int, i: int, kv: KV):
        """(block index, block, q rows, k/v columns, visibility) of played position i at ``step``."""
        position = self.ring.positions[i]
        cols = self.schedule.columns(step, position)
        for j, block in enumerate(self.schedule.steps[step][position]):
            rows, columns = _slices(block, cols[0])
            documents = _block_documents(self.schedule, self.ids, step, position, j) if block.documents else None
            mask = None if kv.mask is None else kv.mask[:, columns]
            yield j, block, rows, columns, Visibility(block.band, mask, documents)


def _ring_forward(call: _Call, qs: list[Tensor], kvs: list[KV]) -> tuple[list[Tensor], list[Tensor]]:
    opts, schedule, ring = call.opts, call.schedule, call.ring
    scale = _scale(opts, qs[0].shape[-1])
    states = [State.empty(q) for q in qs]
    outs = [torch.empty(q.shape, dtype=q.dtype, device=q.device) for q in qs]
    roles = [schedule.roles(position) for position in ring.positions]
    written: list[list[tuple[int, int]]] = [[] for _ in qs]  # rows whose last block wrote their output
    pending = call.post_kv(kvs, 0)
    for step in range(schedule.n_steps):
        items = pending.wait()
        pending = call.post_kv(kvs, step + 1) if step + 1 < schedule.n_steps else None
        for i in range(len(qs)):
            for j, block, rows, cols, vis in call.blocks(step, i, items[i]):
                fresh, final = roles[i][step][j]
                q_, k_, v_ = qs[i][:, rows], items[i].k[:, cols], items[i].v[:, cols]
                backend = kernels.choose(opts.backend, q_, k_, vis, opts.bucket_size)
                backend.forward(q_, k_, v_, states[i].rows(block.q_start, block.q_stop), vis, scale,
                                fresh=fresh, out=outs[i][:, rows] if final else None)
                if final:
                    written[i].append((block.q_start, block.q_stop))
    for out, state, spans in zip(outs, states, written):
        for start, stop in _gaps(spans, out.shape[1]):  # rows no single last block covers (or none reached)
            out[:, start:stop] = state.rows(start, stop).output()
    return outs, [state.lse for state in states]


def _gaps(spans: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The parts of [0, n) that no (start, stop) span covers."""
    gaps, at = [], 0
    for start, stop in sorted(spans):
        if start > at:
            gaps.append((at, start))
        at = max(at, stop)
    return gaps + ([(at, n)] if at < n else [])


def _row_dot(do: Tensor, out: Tensor, dtype: torch.dtype, rows: int = 2048) -> Tensor:
    """delta = rowsum(do · out) in ``dtype``, (batch, heads, seq), a few rows at a time so the
    float copies stay small."""
    parts = [(do[:, i:i + rows].to(dtype) * out[:, i:i + rows].to(dtype)).sum(-1) for i in range(0, do.shape[1], rows)]
    return torch.cat(parts, 1).transpose(1, 2)


def _sole_block(call: _Call, i: int, q: Tensor, kv: KV) -> bool:
    """Whether all of played position i's gradients come from one block over all its rows and its own K/V (a
    ring of one, no documents cut into blocks), computed by a backend that adds to each gradient element once
    (``adds_once``). Its dq, dk, dv are then kept in the inputs' dtype, which is exact (0 + x): no float32
    accumulators to fill, read and cast back."""
    schedule = call.schedule
    if schedule.n_steps != 1 or schedule.offsets[0] != 0 or schedule.columns(0, call.ring.positions[i]) is None:
        return False
    blocks = list(call.blocks(0, i, kv))
    if len(blocks) != 1:
        return False
    _, _, rows, cols, vis = blocks[0]
    if (rows.start, rows.stop, cols.start, cols.stop) != (0, q.shape[1], 0, kv.k.shape[1]):
        return False
    return getattr(kernels.choose(call.opts.backend, q, kv.k, vis, call.opts.bucket_size), "adds_once", False)


def _ring_backward(call: _Call, dos, qs, kvs: list[KV], outs, lses):
    opts, schedule, ring = call.opts, call.schedule, call.ring
    scale = _scale(opts, qs[0].shape[-1])
    acc = state_dtype(qs[0].dtype)
    deltas: list[Tensor | None] = [None] * len(qs)  # rowsum(do · out), made for the first backend that reads it
    sole = [_sole_block(call, i, q, kv) for i, (q, kv) in enumerate(zip(qs, kvs))]
    dqs = [torch.zeros(q.shape, dtype=q.dtype if one else acc, device=q.device) for q, one in zip(qs, sole)]
    dks = [torch.zeros(kv.k.shape, dtype=kv.k.dtype if one else acc, device=kv.k.device) for kv, one in zip(kvs, sole)]
    dvs = [torch.zeros(kv.v.shape, dtype=kv.v.dtype if one else acc, device=kv.v.device) for kv, one in zip(kvs, sole)]

    def collect(step: int, pending) -> None:
        """Add the dK/dV that came back from step ``step``'s receivers to the owners' accumulators."""
        for i, (p, grads) in enumerate(zip(ring.positions, pending.wait())):
            cols = schedule.columns(step, (p + schedule.offsets[step]) % ring.size)
            if cols is not None:
                dks[i][:, cols[0]:cols[1]] += grads.dk
                dvs[i][:, cols[0]:cols[1]] += grads.dv

    pending_kv, returning = call.post_kv(kvs, 0), None
    for step in range(schedule.n_steps):
        items = pending_kv.wait()
        pending_kv = call.post_kv(kvs, step + 1) if step + 1 < schedule.n_steps else None
        offset, grads = schedule.offsets[step], []
        for i, position in enumerate(ring.positions):
            cols = schedule.columns(step, position)
            if cols is None:
                grads.append(None)
                continue
            if offset == 0:  # our own K/V: accumulate in place
                dk, dv = dks[i][:, cols[0]:cols[1]], dvs[i][:, cols[0]:cols[1]]
            else:
                dk = torch.zeros(items[i].k.shape, dtype=acc, device=items[i].k.device)
                dv = torch.zeros(items[i].v.shape, dtype=acc, device=items[i].v.device)
            for _, _, rows, kcols, vis in call.blocks(step, i, items[i]):
                q_, k_, v_ = qs[i][:, rows], items[i].k[:, kcols], items[i].v[:, kcols]
                backend = kernels.choose(opts.backend, q_, k_, vis, opts.bucket_size)
                if deltas[i] is None and getattr(backend, "uses_delta", True):
                    deltas[i] = _row_dot(dos[i], outs[i], acc)
                delta = None if deltas[i] is None else deltas[i][:, :, rows]
                backend.backward(dos[i][:, rows], q_, k_, v_, outs[i][:, rows], lses[i][:, :, rows], delta,
                                 dqs[i][:, rows], dk[:, kcols], dv[:, kcols], vis, scale)
            grads.append(None if offset == 0 else Grads(dk, dv))
        if returning is not None:
            collect(*returning)
            returning = None
        if offset != 0:

            def buffers(i: int, step=step, offset=offset) -> Grads | None:
                cols = schedule.columns(step, (ring.positions[i] + offset) % ring.size)
                if cols is None:
                    return None
                shape = (kvs[i].k.shape[0], cols[1] - cols[0], *kvs[i].k.shape[2:])
                return Grads(kvs[i].k.new_empty(shape, dtype=acc), kvs[i].v.new_empty(shape, dtype=acc))

            returning = (step, ring.exchange(grads, -offset, buffers))
    if returning is not None:
        collect(*returning)
    return ([dq.to(q.dtype) for dq, q in zip(dqs, qs)],
            [dk.to(kv.k.dtype) for dk, kv in zip(dks, kvs)],
            [dv.to(kv.v.dtype) for dv, kv in zip(dvs, kvs)])


class _RingAttention(torch.autograd.Function):
    """Inputs: the call, one mask per played position, then qs, ks, vs."""

    @staticmethod
    def forward(ctx, call: _Call, masks: list, *qkv: Tensor):
        n = len(call.ring.positions)
        qs, ks, vs = list(qkv[:n]), [k.contiguous() for k in qkv[n:2 * n]], [v.contiguous() for v in qkv[2 * n:]]
        kvs = [KV(k, v, None if m is None else m.contiguous()) for k, v, m in zip(ks, vs, masks)]
        outs, lses = _ring_forward(call, qs, kvs)
        ctx.save_for_backward(*qs, *ks, *vs, *outs, *lses)
        ctx.call, ctx.masks = call, [kv.mask for kv in kvs]
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *douts: Tensor):
        n = len(ctx.call.ring.positions)
        saved = ctx.saved_tensors
        qs, ks, vs, outs, lses = (list(saved[i * n:(i + 1) * n]) for i in range(5))
        kvs = [KV(k, v, m) for k, v, m in zip(ks, vs, ctx.masks)]
        dqs, dks, dvs = _ring_backward(ctx.call, list(douts), qs, kvs, outs, lses)
        return (None, None, *dqs, *dks, *dvs)


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    mask: Tensor | None = None,
    layout: str = "contiguous",
    ring_reduce_col: bool = True,
    bucket_size: int | None = None,
    max_lookback_seq_len: int | None = None,
    ring_size: int | None = None,
    softmax_scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
    cu_seqlens=None,
    transport: Ring | None = None,
    agree: bool = True,
) -> Tensor:
    """Exact attention of this rank's query shard over the whole sequence of its ring.

    q: (batch, local_seq, heads, head_dim); k, v: (batch, local_seq, kv_heads, head_dim) with
    heads % kv_heads == 0 (query head i uses K/V head i // (heads // kv_heads)). Returns
    (batch, local_seq, heads, head_dim) in q's dtype, differentiable in q, k, v.

    The group's ranks (default: the world; a single process if torch.distributed is not
    initialized) are cut into consecutive rings of ``ring_size`` (default: the whole group);
    the global sequence of a ring, W · local_seq tokens, is sharded as ``layout`` says
    (``contiguous``, ``striped`` or ``zigzag``). ``mask`` (batch, local_seq) bool marks this
    rank's keys that may be attended. ``max_lookback_seq_len`` L (with ``causal``) shows key t
    to query p only if 0 ≤ p − t < L. ``ring_reduce_col=False`` attends to the local K/V only.
    ``cu_seqlens`` [0, e1, ..., W · local_seq]: document boundaries of the ring's whole sequence
    (global positions, before the layout's permutation), one list for the batch or one per
    element; a query then attends only to keys of its own document. ``bucket_size`` bounds the
    score tiles of the torch backend. The option keywords (``causal`` ... ``backend``, not the
    tensors, ``group``, ``cu_seqlens``, ``transport``, ``agree``) are the fields of
    :class:`ring_sp.options.RingOptions`. ``transport``: what moves K/V between ranks (default
    ``DistributedRing(group, ring size)``; e.g. a subclass that records or skips transfers). Every
    rank of the group must pass the same shapes and options; if one does not, or rejects its input,
    all ranks raise ValueError together: one small all_gather per call checks it (a host sync on
    GPUs). ``agree=False`` skips that exchange, for callers that know the ranks agree, e.g. every
    layer of a model after its first layer checked the same batch; then a rank that rejects its
    input raises alone.
    """
    opts = RingOptions.from_kwargs(locals())  # the option arguments of this call (ring_sp.options)
    distributed = dist.is_available() and dist.is_initialized()
    try:
        group, size = resolve_ring(group, ring_size)
        opts = replace(opts, ring_size=size)
        documents = _checked(opts, cu_seqlens, q, k, v, mask, size)
        schedule = _plan(opts, documents, size, q, k, mask)
        position = dist.get_rank(group) % size if distributed else 0
        ids = _document_ids(opts, documents, size, q)
        _check_backend(opts, schedule, [position], q, k, mask, ids)
    except ValueError as error:
        if distributed and agree:  # fail the peers too, or they would wait for this rank forever
            group = group if isinstance(group, dist.ProcessGroup) else dist.group.WORLD
            if dist.get_world_size(group) > 1:
                gather_signatures(group, (1,) + (0,) * (len(_FIELDS) - 1))
        raise error
    if agree and distributed and dist.get_world_size(group) > 1:
        _raise_on_disagreement(gather_signatures(group, _signature(q, k, mask, opts, documents)), "rank", size)
    ring = DistributedRing(group, size) if distributed and size > 1 else SimulatedRing(1)
    if transport is not None:
        if transport.size != ring.size or transport.positions != ring.positions:
            raise ValueError(f"transport plays positions {transport.positions} of a ring of {transport.size}, but this "
                             f"rank is position {ring.positions} of {ring.size}: build it for this group and ring_size")
        ring = transport
    return _RingAttention.apply(_Call(ring, schedule, opts, ids), [mask], q, k, v)[0]


def ring_attention_simulated(
    qs: list[Tensor],
    ks: list[Tensor],
    vs: list[Tensor],
    *,
    masks: list[Tensor | None] | None = None,
    causal: bool = False,
    layout: str = "contiguous",
    ring_reduce_col: bool = True,
    bucket_size: int | None = None,
    max_lookback_seq_len: int | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
    cu_seqlens=None,
    transport: Ring | None = None,
) -> list[Tensor]:
    """Ring attention over W virtual ranks in this process: the same schedule, no communication.

    ``qs[r]``, ``ks[r]``, ``vs[r]``, ``masks[r]``: the tensors of ring position r, shaped as in
    :func:`ring_attention`; ``cu_seqlens`` as there. Returns the W outputs. For tests and
    single-GPU benchmarks. ``transport``: default ``SimulatedRing(W)``; a test double or a recording
    transport that plays all W positions.
    """
    opts = RingOptions.from_kwargs(locals())  # the option arguments of this call (ring_sp.options)
    world = len(qs)
    masks = list(masks) if masks is not None else [None] * world
    if world < 1 or not (len(ks) == len(vs) == len(masks) == world):
        raise ValueError(f"qs, ks, vs (and masks) must be lists of one tensor per ring position, got lengths "
                         f"{len(qs)}, {len(ks)}, {len(vs)}, {len(masks)}")
    opts = replace(opts, ring_size=world)
    rows = []
    for q, k, v, m in zip(qs, ks, vs, masks):
        documents = _checked(opts, cu_seqlens, q, k, v, m, world)
        rows.append(_signature(q, k, m, opts, documents))
    _raise_on_disagreement(rows, "position", world)
    schedule = _plan(opts, documents, world, qs[0], ks[0], masks[0])
    ids = _document_ids(opts, documents, world, qs[0])
    _check_backend(opts, schedule, list(range(world)), qs[0], ks[0], masks[0], ids)
    ring = transport if transport is not None else SimulatedRing(world)
    if ring.size != world or ring.positions != list(range(world)):
        raise ValueError(f"transport plays positions {ring.positions} of {ring.size}: a simulated ring plays all "
                         f"{world}")
    return list(_RingAttention.apply(_Call(ring, schedule, opts, ids), masks, *qs, *ks, *vs))
