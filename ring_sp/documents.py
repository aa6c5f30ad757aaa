"""Packed sequences: the document boundaries of a ring's full sequence, checked, and turned into ids.

``cu_seqlens = [0, e1, e2, ..., S]`` are global positions before the layout's permutation: token p
belongs to document d iff ``cu_seqlens[d] <= p < cu_seqlens[d + 1]``, and a query attends only to
keys of its own document. One sequence serves every batch element, or one is given per element.

Pure index maths: no torch.distributed here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from ring_sp.layout import check_seq_len, local_positions

# Per batch element, the boundaries (0, e1, ..., S); a single entry when every element shares them.
Documents = tuple[tuple[int, ...], ...]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _as_ints(bounds, what: str) -> tuple[int, ...]:
    if isinstance(bounds, Tensor):
        if bounds.dim() != 1 or bounds.dtype.is_floating_point or bounds.dtype == torch.bool:
            raise ValueError(f"{what} must be a 1-D integer tensor, got {bounds.dtype} of shape {tuple(bounds.shape)}")
        return tuple(int(x) for x in bounds.tolist())  # a CUDA tensor costs a device sync here
    if not isinstance(bounds, (list, tuple)) or not all(_is_int(x) for x in bounds):
        raise ValueError(f"{what} must be a list/tuple of ints or a 1-D integer tensor, got {bounds!r:.80}")
    return tuple(bounds)


def _check_bounds(bounds: tuple[int, ...], seq_len: int, what: str) -> None:
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != seq_len:
        raise ValueError(f"{what} = {_short(bounds)} must run from 0 to the ring's full sequence length S = {seq_len} "
                         f"(local_seq × ring size): pass [0, end of document 1, ..., {seq_len}]")
    for a, b in zip(bounds, bounds[1:]):
        if b <= a:
            raise ValueError(f"{what} = {_short(bounds)} is not strictly increasing ({a} then {b}): every document "
                             "needs at least one token; drop repeated boundaries")


def _short(bounds: tuple[int, ...]) -> str:
    return str(list(bounds)) if len(bounds) <= 8 else f"[{', '.join(map(str, bounds[:4]))}, ..., {bounds[-1]}]"


def check_documents(cu_seqlens, batch: int, seq_len: int) -> Documents | None:
    """Normalise ``cu_seqlens`` for a batch of ``batch`` sequences of ``seq_len`` tokens (the ring's whole
    sequence); ValueError naming the fix if the boundaries are malformed. None stays None.

    Accepts a list/tuple of ints or a 1-D integer tensor (every batch element), or a list of ``batch``
    such sequences / a 2-D integer tensor (batch, n) (one per element).
    """
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, Tensor) and cu_seqlens.dim() == 2:
        cu_seqlens = list(cu_seqlens)
    per_batch = isinstance(cu_seqlens, (list, tuple)) and len(cu_seqlens) > 0 and all(
        isinstance(x, (list, tuple, Tensor)) for x in cu_seqlens)
    if per_batch:
        if len(cu_seqlens) != batch:
            raise ValueError(f"cu_seqlens holds {len(cu_seqlens)} boundary lists but the batch has {batch} "
                             "sequences: pass one list per batch element, or a single list for all of them")
        docs = tuple(_as_ints(b, f"cu_seqlens[{i}]") for i, b in enumerate(cu_seqlens))
        for i, b in enumerate(docs):
            _check_bounds(b, seq_len, f"cu_seqlens[{i}]")
        return docs[:1] if all(b == docs[0] for b in docs) else docs
    bounds = _as_ints(cu_seqlens, "cu_seqlens")
    _check_bounds(bounds, seq_len, "cu_seqlens")
    return (bounds,)


def fingerprint(documents: Documents | None) -> int:
    """A 62-bit digest of the boundaries (0 without documents), for checking that ranks agree."""
    if documents is None:
        return 0
    digest = hashlib.blake2b(repr(documents).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2 or 1


def document_ids(bounds: Sequence[int], positions: Tensor) -> Tensor:
    """The document index (int64) of each global position, under boundaries ``bounds``."""
    edges = torch.tensor(bounds, dtype=torch.long, device=positions.device)
    return torch.searchsorted(edges, positions, right=True) - 1


def document_positions(cu_seqlens, seq_len: int, layout: str, rank: int, world: int) -> Tensor:
    """Position ids of the tokens ring position ``rank`` holds, restarting at 0 in every document (for RoPE).

    Like :func:`ring_sp.local_positions`: shape (seq_len // world,) for one boundary list, or
    (batch, seq_len // world) for a list of per-batch-element boundaries. ``seq_len``: the whole sequence.
    """
    check_seq_len(layout, seq_len, world)
    per_batch = isinstance(cu_seqlens, (list, tuple)) and cu_seqlens and not _is_int(cu_seqlens[0])
    per_batch = per_batch or (isinstance(cu_seqlens, Tensor) and cu_seqlens.dim() == 2)
    batch = len(cu_seqlens) if per_batch else 1
    docs = check_documents(cu_seqlens, batch, seq_len)
    positions = local_positions(seq_len, layout, rank, world)
    rows = [positions - torch.tensor(b)[document_ids(b, positions)] for b in docs]
    if not per_batch:
        return rows[0]
    return torch.stack(rows * batch if len(rows) == 1 else rows)


@lru_cache(maxsize=64)
def ids_by_position(documents: Documents, layout: str, world: int, local_seq: int, batch: int,
                    device: torch.device) -> tuple[Tensor, ...]:
    """Per ring position, the document ids (int32, contiguous (batch, local_seq)) of the tokens it holds.

    Cached: every layer of one batch reuses them (no new host-to-device copy per layer).
    """
    seq = local_seq * world
    out = []
    for rank in range(world):
        positions = local_positions(seq, layout, rank, world)
        rows = torch.stack([document_ids(b, positions) for b in documents]).to(torch.int32)
        out.append(rows.expand(batch, local_seq).contiguous().to(device, non_blocking=True))
    return tuple(out)
