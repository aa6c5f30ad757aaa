"""Packed documents in Megatron: boundaries from EOD tokens, carried to every layer's ring core attention.

Megatron hands each layer's core attention the ``attention_mask`` of the batch. With documents, the
batch carries in that slot a *document mask*: a small int64 tensor (batch, 1, 1, n) holding each
sequence's boundaries ``[0, e1, ..., S]`` (global positions of the whole sequence, padded at the end
by repeating S). It is kept on the CPU (reading it costs no device sync), survives activation
recompute and pipeline schedules like any mask, and replaces Megatron's dense [batch, 1, S, S] mask
(S² bytes a sequence). ``RingCoreAttention`` recognises it by its integer dtype.

Every layer reads the same boundaries: ``read_once`` reads them on the host once per batch.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from ring_sp.documents import check_documents, document_positions


def boundaries_from_eod(tokens: Tensor, eod: int) -> list[list[int]]:
    """Per sequence of ``tokens`` (batch, S), the document boundaries Megatron-LM's ``--reset-attention-mask``
    means: a document ends with (and includes) each EOD token, so a boundary follows every EOD."""
    seq = tokens.shape[1]
    rows, cols = (tokens == eod).nonzero(as_tuple=True)  # one device sync per batch, not per layer
    out = [[0] for _ in range(tokens.shape[0])]
    for r, c in zip(rows.tolist(), cols.tolist()):
        if c + 1 < seq:
            out[r].append(c + 1)
    for bounds in out:
        bounds.append(seq)
    return out


def document_mask(cu_seqlens, batch: int, seq: int) -> Tensor:
    """The document mask (int64, CPU, (batch, 1, 1, n)) of boundaries for ``batch`` sequences of ``seq``
    tokens: one boundary list for all, or one per sequence (checked as ``ring_attention`` checks them)."""
    docs = check_documents(cu_seqlens, batch, seq)
    per_element = docs * batch if len(docs) == 1 else docs
    width = max(len(b) for b in per_element)
    rows = [list(b) + [seq] * (width - len(b)) for b in per_element]
    return torch.tensor(rows, dtype=torch.long)[:, None, None, :]


def is_document_mask(mask) -> bool:
    return isinstance(mask, Tensor) and mask.dim() == 4 and mask.shape[1:3] == (1, 1) and not (
        mask.dtype.is_floating_point or mask.dtype == torch.bool)


def documents_of(mask: Tensor) -> list[list[int]]:
    """The boundary lists a document mask carries, one per sequence (padding removed)."""
    out = []
    for row in mask[:, 0, 0].tolist():
        while len(row) > 2 and row[-1] == row[-2]:
            row.pop()
        out.append(row)
    return out


def reset_position_ids(cu_seqlens, seq: int) -> Tensor:
    """(batch, seq) position ids restarting at 0 in every document (Megatron-LM's ``--reset-position-ids``),
    for the whole sequence (shard them with the batch)."""
    return document_positions([list(b) for b in cu_seqlens], seq, "contiguous", 0, 1)


# read function -> (weakref to the tensor it last read, its version, what it read)
_READS: dict[object, tuple] = {}


def read_once(t: Tensor, read):
    """``read(t)``, a host read of a small tensor (a device sync if it is on the GPU), once per tensor object
    and version: every layer of a batch gets the same tensor."""
    seen = _READS.get(read)
    if seen is not None and seen[0]() is t and seen[1] == t._version:
        return seen[2]
    value = read(t)
    _READS[read] = (weakref.ref(t), t._version, value)  # only the current batch's
    return value


def boundaries(cu_seqlens: Tensor) -> tuple[int, ...]:
    """THD boundaries as ints: a 1-D tensor, or Megatron-LM's (1, n) batch entry."""
    if cu_seqlens.dim() == 2 and cu_seqlens.shape[0] == 1:
        cu_seqlens = cu_seqlens[0]
    return tuple(int(x) for x in cu_seqlens.tolist())
