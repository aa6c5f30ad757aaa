"""Ring attention: the autograd Function that runs the schedule over a ring, and the public API.

Forward: each position folds every K/V block that passes by into its queries' float32 state
(the next block's transfer is posted before the current block is computed). Backward is a ring
again: dq accumulates locally in float32; dK/dV accumulate in float32 while travelling with
their block and are handed back to the position that owns it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from ring_sp import kernels
from ring_sp.comm import DistributedRing, SimulatedRing, gather_signatures
from ring_sp.kernels import State, state_dtype
from ring_sp.layout import LAYOUTS, check_layout, check_local_seq
from ring_sp.schedule import Block, Schedule, plan

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Options:
    """Everything besides the tensors that every rank of a ring must agree on."""

    causal: bool = False
    layout: str = "contiguous"
    reduce_col: bool = True
    lookback: int | None = None
    bucket_size: int | None = None
    softmax_scale: float | None = None
    backend: str = "auto"

    def check(self) -> None:
        check_layout(self.layout)
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal={self.causal!r}: pass True or False")
        if not isinstance(self.reduce_col, bool):
            raise ValueError(f"ring_reduce_col={self.reduce_col!r}: pass True or False")
        if self.lookback is not None:
            if isinstance(self.lookback, bool) or not isinstance(self.lookback, int) or self.lookback < 1:
                raise ValueError(f"max_lookback_seq_len={self.lookback!r}: pass a positive int (tokens) or None")
            if not self.causal:
                raise ValueError("max_lookback_seq_len (a sliding window) needs causal=True: pass causal=True "
                                 "or drop max_lookback_seq_len")
        if self.bucket_size is not None and (not isinstance(self.bucket_size, int) or self.bucket_size < 1):
            raise ValueError(f"bucket_size={self.bucket_size!r}: pass a positive int or None")
        scale = self.softmax_scale
        if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0):
            raise ValueError(f"softmax_scale={scale!r}: pass a positive finite float or None for 1/sqrt(head_dim)")
        if not isinstance(self.backend, str) or (self.backend != "auto" and self.backend not in kernels.names()):
            raise ValueError(f"backend={self.backend!r} is unknown: use 'auto' or one of {', '.join(kernels.names())}")

    def scale(self, head_dim: int) -> float:
        return float(self.softmax_scale) if self.softmax_scale is not None else head_dim ** -0.5


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


def _check_backend(opts: Options, schedule: Schedule, positions: list[int], q: Tensor, k: Tensor,
                   has_mask: bool) -> None:
    """Raise ValueError unless ``opts.backend`` can compute every block this process will meet."""
    bands = {block.band for step in schedule.steps for p in positions for block in step[p]}
    for band in bands:
        kernels.choose(opts.backend, q, k, band, has_mask, opts.bucket_size)


_FIELDS = ("inputs rejected", "batch", "local_seq", "heads", "kv_heads", "head_dim", "dtype", "mask",
           "causal", "layout", "max_lookback_seq_len", "ring_reduce_col", "ring_size", "backend",
           "bucket_size", "softmax_scale")


def _signature(q: Tensor, k: Tensor, mask: Tensor | None, opts: Options, ring_size: int) -> tuple[int, ...]:
    backends = ["auto", *kernels.names()]
    scale = opts.softmax_scale
    return (0, *q.shape, k.shape[2], _DTYPES.index(q.dtype), mask is not None, opts.causal,
            LAYOUTS.index(opts.layout), opts.lookback or 0, opts.reduce_col, ring_size,
            backends.index(opts.backend), opts.bucket_size or 0,
            0 if scale is None else int(round(float(scale) * 2**40)))


def _raise_on_disagreement(rows: list[tuple[int, ...]], who: str) -> None:
    failed = [n for n, row in enumerate(rows) if row[0]]
    if failed:
        raise ValueError(f"{who} {failed} rejected their inputs (their own error says why), so no rank ran the ring")
    for i, field in enumerate(_FIELDS):
        values = [row[i] for row in rows]
        if len(set(values)) > 1:
            raise ValueError(f"{who}s disagree on {field} ({', '.join(f'{n}: {x}' for n, x in enumerate(values))}): "
                             "every rank of the group must pass the same shapes, dtype and options")


def _unpack(item: list[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
    return item[0], item[1], item[2] if len(item) > 2 else None


def _slices(block: Block) -> tuple[slice, slice]:
    return slice(block.q_start, block.q_stop), slice(block.k_start, block.k_stop)


def _ring_forward(ring, schedule: Schedule, opts: Options, qs, ks, vs, masks) -> tuple[list[Tensor], list[Tensor]]:
    scale = opts.scale(qs[0].shape[-1])
    states = [State.empty(q) for q in qs]
    outs = [torch.empty(q.shape, dtype=q.dtype, device=q.device) for q in qs]
    roles = [schedule.roles(position) for position in ring.positions]
    written: list[list[tuple[int, int]]] = [[] for _ in qs]  # rows whose last block wrote their output
    items = [[k, v] + ([m] if m is not None else []) for k, v, m in zip(ks, vs, masks)]
    for step in range(schedule.n_steps):
        pending = ring.shift(items, 1) if step + 1 < schedule.n_steps else None
        for i, position in enumerate(ring.positions):
            k, v, mask = _unpack(items[i])
            for block, (fresh, final) in zip(schedule.steps[step][position], roles[i][step]):
                rows, cols = _slices(block)
                q_, k_, v_ = qs[i][:, rows], k[:, cols], v[:, cols]
                m_ = None if mask is None else mask[:, cols]
                backend = kernels.choose(opts.backend, q_, k_, block.band, m_ is not None, opts.bucket_size)
                backend.forward(q_, k_, v_, states[i].rows(block.q_start, block.q_stop), block.band, m_, scale,
                                fresh=fresh, out=outs[i][:, rows] if final else None)
                if final:
                    written[i].append((block.q_start, block.q_stop))
        if pending is not None:
            items = pending.wait()
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


def _ring_backward(ring, schedule: Schedule, opts: Options, dos, qs, ks, vs, masks, outs, lses):
    scale = opts.scale(qs[0].shape[-1])
    acc = state_dtype(qs[0].dtype)
    deltas = [_row_dot(do, out, acc) for do, out in zip(dos, outs)]
    dqs = [torch.zeros(q.shape, dtype=acc, device=q.device) for q in qs]
    items = [[k, v] + ([m] if m is not None else []) for k, v, m in zip(ks, vs, masks)]
    travelling = None  # dK/dV of the block each position holds, on their way around the ring
    n = schedule.n_steps
    for step in range(n):
        pending_kv = ring.shift(items, 1) if step + 1 < n else None
        grads = []
        for i, position in enumerate(ring.positions):
            k, v, mask = _unpack(items[i])
            blocks = schedule.steps[step][position]
            if not blocks and travelling is not None:
                grads.append(None)
                continue
            dk = torch.zeros(k.shape, dtype=acc, device=k.device)
            dv = torch.zeros(v.shape, dtype=acc, device=v.device)
            for block in blocks:
                rows, cols = _slices(block)
                q_, k_, v_ = qs[i][:, rows], k[:, cols], v[:, cols]
                m_ = None if mask is None else mask[:, cols]
                backend = kernels.choose(opts.backend, q_, k_, block.band, m_ is not None, opts.bucket_size)
                backend.backward(dos[i][:, rows], q_, k_, v_, outs[i][:, rows], lses[i][:, :, rows],
                                 deltas[i][:, :, rows], dqs[i][:, rows], dk[:, cols], dv[:, cols],
                                 block.band, m_, scale)
            grads.append([dk, dv])
        if travelling is not None:
            arrived = travelling.wait()
            for i, mine in enumerate(grads):
                if mine is not None:
                    arrived[i][0] += mine[0]
                    arrived[i][1] += mine[1]
            grads = arrived
        # The last holder of a block returns its dK/dV to the owner, n − 1 positions back.
        travelling = ring.shift(grads, 1 if step + 1 < n else 1 - n)
        if pending_kv is not None:
            items = pending_kv.wait()
    dkvs = travelling.wait()
    return ([dq.to(q.dtype) for dq, q in zip(dqs, qs)],
            [dkv[0].to(k.dtype) for dkv, k in zip(dkvs, ks)],
            [dkv[1].to(v.dtype) for dkv, v in zip(dkvs, vs)])


class _RingAttention(torch.autograd.Function):
    """Inputs: the ring, its schedule, the options, one mask per played position, then qs, ks, vs."""

    @staticmethod
    def forward(ctx, ring, schedule: Schedule, opts: Options, masks: list, *qkv: Tensor):
        n = len(ring.positions)
        qs, ks, vs = list(qkv[:n]), [k.contiguous() for k in qkv[n:2 * n]], [v.contiguous() for v in qkv[2 * n:]]
        masks = [None if m is None else m.contiguous() for m in masks]
        outs, lses = _ring_forward(ring, schedule, opts, qs, ks, vs, masks)
        ctx.save_for_backward(*qs, *ks, *vs, *outs, *lses)
        ctx.ring, ctx.schedule, ctx.opts, ctx.masks = ring, schedule, opts, masks
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *douts: Tensor):
        n = len(ctx.ring.positions)
        saved = ctx.saved_tensors
        qs, ks, vs, outs, lses = (list(saved[i * n:(i + 1) * n]) for i in range(5))
        dqs, dks, dvs = _ring_backward(ctx.ring, ctx.schedule, ctx.opts, list(douts), qs, ks, vs, ctx.masks,
                                       outs, lses)
        return (None, None, None, None, *dqs, *dks, *dvs)


def _run(ring, opts: Options, qs, ks, vs, masks) -> list[Tensor]:
    schedule = plan(opts.layout, ring.size, qs[0].shape[1], causal=opts.causal, lookback=opts.lookback,
                    reduce_col=opts.reduce_col)
    return list(_RingAttention.apply(ring, schedule, opts, masks, *qs, *ks, *vs))


def _group_and_ring_size(group, ring_size) -> tuple[dist.ProcessGroup | None, int]:
    """The process group (None: not distributed) and the ring size it is cut into."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        group_size = 1
    elif not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group was given but torch.distributed is not initialized: call "
                         "torch.distributed.init_process_group first, or pass group=None")
    else:
        group = group if group is not None else dist.group.WORLD
        group_size = dist.get_world_size(group)
    if ring_size is None:
        return group, group_size
    if isinstance(ring_size, bool) or not isinstance(ring_size, int) or ring_size < 1 or group_size % ring_size:
        raise ValueError(f"ring_size={ring_size!r} does not divide the process group of {group_size} ranks: pass a "
                         f"divisor of {group_size}, or None for one ring over the whole group")
    return group, ring_size


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
    ``bucket_size`` bounds the score tiles of the torch backend. Every rank of the group must
    pass the same shapes and options; if one does not, or rejects its input, all ranks raise
    ValueError together.
    """
    opts = Options(causal, layout, ring_reduce_col, max_lookback_seq_len, bucket_size, softmax_scale, backend)
    distributed = dist.is_available() and dist.is_initialized()
    try:
        opts.check()
        _check_tensors(q, k, v, mask)
        group, size = _group_and_ring_size(group, ring_size)
        check_local_seq(layout, q.shape[1], size)
        schedule = plan(layout, size, q.shape[1], causal=causal, lookback=max_lookback_seq_len,
                        reduce_col=ring_reduce_col)
        position = dist.get_rank(group) % size if distributed else 0
        _check_backend(opts, schedule, [position], q, k, mask is not None)
    except ValueError as error:
        if distributed:  # fail the peers too, or they would wait for this rank forever
            group = group if isinstance(group, dist.ProcessGroup) else dist.group.WORLD
            if dist.get_world_size(group) > 1:
                gather_signatures(group, (1,) + (0,) * (len(_FIELDS) - 1))
        raise error
    if distributed and dist.get_world_size(group) > 1:
        _raise_on_disagreement(gather_signatures(group, _signature(q, k, mask, opts, size)), "rank")
    ring = DistributedRing(group, size) if distributed and size > 1 else SimulatedRing(1)
    return _run(ring, opts, [q], [k], [v], [mask])[0]


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
) -> list[Tensor]:
    """Ring attention over W virtual ranks in this process: the same schedule, no communication.

    ``qs[r]``, ``ks[r]``, ``vs[r]``, ``masks[r]``: the tensors of ring position r, shaped as in
    :func:`ring_attention`. Returns the W outputs. For tests and single-GPU benchmarks.
    """
    opts = Options(causal, layout, ring_reduce_col, max_lookback_seq_len, bucket_size, softmax_scale, backend)
    opts.check()
    world = len(qs)
    masks = list(masks) if masks is not None else [None] * world
    if world < 1 or not (len(ks) == len(vs) == len(masks) == world):
        raise ValueError(f"qs, ks, vs (and masks) must be lists of one tensor per ring position, got lengths "
                         f"{len(qs)}, {len(ks)}, {len(vs)}, {len(masks)}")
    rows = []
    for q, k, v, m in zip(qs, ks, vs, masks):
        _check_tensors(q, k, v, m)
        rows.append(_signature(q, k, m, opts, world))
    _raise_on_disagreement(rows, "position")
    check_local_seq(layout, qs[0].shape[1], world)
    schedule = plan(layout, world, qs[0].shape[1], causal=causal, lookback=max_lookback_seq_len,
                    reduce_col=ring_reduce_col)
    _check_backend(opts, schedule, list(range(world)), qs[0], ks[0], masks[0] is not None)
    return _run(SimulatedRing(world), opts, qs, ks, vs, masks)
