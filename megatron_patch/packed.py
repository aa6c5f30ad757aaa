"""THD packed sequences (Megatron's ``cu_seqlens``) at any context parallelism: the ring's split of the stream.

Megatron-LM flattens a micro-batch of packed samples into one stream of T tokens ([1, T] tensors) and
gives the documents' boundaries in stream positions: ``cu_seqlens``, and ``cu_seqlens_padded`` when
each document is followed by padding. Transformer Engine's context parallelism cuts every document
into 2 × CP chunks (so each document must be padded to a multiple of 2 × CP). The ring cuts the whole
stream with its layout instead, as it cuts a [batch, seq] sample, and keeps the boundaries whole: it
attends inside documents itself, so documents of any length work and only T must suit the layout.

The boundaries the ring uses are ``cu_seqlens_padded`` when given (padding belongs to the document
before it, after its real tokens, so no real token sees it), else ``cu_seqlens``; as Megatron's
attention uses them for RoPE. ``SEEN`` records what ran, for ``megatron_patch.guard``.
"""

from __future__ import annotations

from torch import Tensor

from ring_sp import local_positions
from ring_sp.layout import check_seq_len

# Per-batch entries kept whole: the boundaries, and Megatron-LM's other per-batch metadata.
PACKED_KEYS = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen", "local_cp_size", "hybrid_cp_group")

# What ran in this process since the last reset: our split of a THD batch, ring attention over one at
# context parallelism > 1, our RoPE of one (megatron_patch.packed_rope).
SEEN = {"split": False, "attention": False, "rope": False}


def reset() -> None:
    SEEN.update(split=False, attention=False, rope=False)


def is_packed(batch: dict) -> bool:
    """Whether ``batch`` is a THD batch (it carries ``cu_seqlens``)."""
    return batch.get("cu_seqlens") is not None


def ring_boundaries(cu_seqlens, cu_seqlens_padded):
    """The boundaries the ring attends by: the padded ones when given."""
    return cu_seqlens_padded if cu_seqlens_padded is not None else cu_seqlens


def shard_packed(batch: dict, layout: str, size: int, rank: int) -> dict:
    """This rank's share of a THD ``batch`` (a new dict): every [1, T] tensor (tokens, labels, loss_mask,
    position_ids) cut along dim 1 with ``layout``; ``PACKED_KEYS``, None values and non-tensors kept whole.

    Raises ValueError (naming the fix) for a batch that is not one flat stream, a dense attention mask,
    or a T the layout cannot split over ``size`` ranks."""
    mask = batch.get("attention_mask")
    if isinstance(mask, Tensor):
        raise ValueError("a THD batch (cu_seqlens) with a dense attention_mask: ring attention masks the documents "
                         "itself; drop the mask (Megatron-LM: --no-create-attention-mask-in-dataloader)")
    stream = {key: val for key, val in batch.items() if isinstance(val, Tensor) and key not in PACKED_KEYS}
    lengths = set()
    for key, val in stream.items():
        if val.dim() < 2 or val.shape[0] != 1:
            raise ValueError(f"batch[{key!r}] has shape {tuple(val.shape)} in a THD batch (cu_seqlens): expected one "
                             "flat stream [1, T]; flatten the micro-batch first (Megatron-LM's "
                             "flatten_batch_for_packed_sequences: samples end to end, their cu_seqlens merged)")
        lengths.add(val.shape[1])
    if len(lengths) > 1:
        raise ValueError(f"the THD batch's tensors hold streams of different lengths {sorted(lengths)}: "
                         "tokens, labels, loss_mask and position_ids must be [1, T] with one T")
    out = dict(batch)
    if lengths:
        (total,) = lengths
        try:
            check_seq_len(layout, total, size)
        except ValueError as error:
            raise ValueError(f"THD stream of T = {total} tokens: {error}. Pad the stream to such a length (e.g. with "
                             "a last padding document, loss_mask 0, inside cu_seqlens); documents may have any "
                             "length") from None
        if size > 1:
            for key, val in stream.items():
                out[key] = val.index_select(1, local_positions(total, layout, rank, size).to(val.device))
    SEEN["split"] = True
    return out
