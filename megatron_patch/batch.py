"""Sharding a batch over the context-parallel ring: Megatron's ``get_batch_on_this_cp_rank`` for every layout."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from megatron_patch.documents import document_mask, is_document_mask
from megatron_patch.groups import context_parallel_group
from megatron_patch.packed import PACKED_KEYS, is_packed, shard_packed
from ring_sp import local_positions
from ring_sp.layout import check_seq_len


def _group_size_rank(cp_group) -> tuple[int, int]:
    cp_group = cp_group if cp_group is not None else context_parallel_group(required=False)
    return (1, 0) if cp_group is None else (dist.get_world_size(cp_group), dist.get_rank(cp_group))


def shard_batch(batch: dict, layout: str, cp_group=None, *, documents=None) -> dict:
    """This rank's share of ``batch`` under ``layout`` (a new dict; the input is not changed).

    Tensors are sharded along dim 1 (tokens, labels, loss_mask, position_ids: [batch, seq]),
    ``attention_mask`` along dim 2 (its query rows: [batch, 1, seq, seq]); None values,
    non-tensors, document masks and ``PACKED_KEYS`` pass through. ``cp_group``: the ring (default:
    Megatron's context-parallel group). ``documents``: packed sequences, the boundaries
    ``[0, e1, ..., seq]`` of the whole sequences (one list, or one per sequence; see
    ``ring_sp.ring_attention``'s ``cu_seqlens``): the result's ``attention_mask`` becomes their
    document mask, which the ring core attention honours. For ``zigzag`` without documents this is
    exactly Megatron's ``get_batch_on_this_cp_rank``. Raises ValueError if a sequence length does not
    split as the layout needs, before anything is sliced.

    A THD batch (it holds ``cu_seqlens``: one flat stream [1, T] of packed documents, as Megatron-LM
    flattens a micro-batch) is cut along the stream with ``layout``; ``cu_seqlens``,
    ``cu_seqlens_padded`` and ``max_seqlen`` stay whole (``megatron_patch.packed``): pass them to the
    model in ``PackedSeqParams(qkv_format="thd", ...)``. Documents may have any length.
    """
    if is_packed(batch):
        if documents is not None:
            raise ValueError("shard_batch(..., documents=...) on a THD batch: its cu_seqlens already give the "
                             "documents; drop documents=")
        return shard_packed(batch, layout, *_group_size_rank(cp_group))
    if documents is not None:
        tokens = batch.get("tokens")
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            raise ValueError("shard_batch(..., documents=...) needs batch['tokens'] [batch, seq] to size the mask")
        batch = dict(batch, attention_mask=document_mask(documents, *tokens.shape))
    size, rank = _group_size_rank(cp_group)
    dims = {key: (2 if key == "attention_mask" else 1) for key, val in batch.items()
            if isinstance(val, Tensor) and key not in PACKED_KEYS and not is_document_mask(val)}
    for key, dim in dims.items():
        val = batch[key]
        if val.dim() <= dim:
            raise ValueError(f"batch[{key!r}] has shape {tuple(val.shape)}: expected a sequence dimension at dim {dim}")
        try:
            check_seq_len(layout, val.shape[dim], size)
        except ValueError as error:
            raise ValueError(f"batch[{key!r}] (shape {tuple(val.shape)}): {error}; pad or cut the sequences") from None
    if size == 1:
        return dict(batch)
    out = dict(batch)
    for key, dim in dims.items():
        val = batch[key]
        out[key] = val.index_select(dim, local_positions(val.shape[dim], layout, rank, size).to(val.device))
    return out
