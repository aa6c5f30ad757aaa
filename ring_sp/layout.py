"""How a global sequence is sharded over the W positions of a ring.

A *layout* maps each ring position to the global token positions it holds:

- ``contiguous``: position r holds [r·n, (r+1)·n).
- ``striped``: position r holds r, r+W, r+2W, … (Striped Attention, Brandon et al. 2023).
- ``zigzag``: the sequence is cut into 2W chunks; position r holds chunk r then chunk 2W−1−r
  (Megatron-core's ``get_batch_on_this_cp_rank`` split).

Pure index math: no torch.distributed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("contiguous", "striped", "zigzag")


@dataclass(frozen=True)
class Segment:
    """A run of a rank's local tokens whose global positions form an arithmetic sequence.

    Local indices [local_start, local_start + length) hold global positions
    global_start + stride·i for i in [0, length).
    """

    local_start: int
    length: int
    global_start: int
    stride: int


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown: use one of {', '.join(LAYOUTS)}")


def check_local_seq(layout: str, local_seq: int, world: int) -> None:
    """Raise ValueError if ``layout`` cannot shard a sequence into ``world`` shards of ``local_seq``."""
    check_layout(layout)
    if local_seq < 1:
        raise ValueError(f"local sequence length is {local_seq}: each rank needs at least one token")
    if layout == "zigzag" and local_seq % 2:
        raise ValueError(
            f"layout='zigzag' cuts the sequence into 2·W chunks, so the local sequence length must be "
            f"even, got {local_seq}: pad the sequence to a multiple of {2 * world} or use "
            f"layout='contiguous' or 'striped'"
        )


def check_seq_len(layout: str, seq_len: int, world: int) -> None:
    """Raise ValueError unless a global sequence of ``seq_len`` splits over ``world`` ranks."""
    check_layout(layout)
    chunks = 2 * world if layout == "zigzag" else world
    if seq_len % chunks:
        raise ValueError(
            f"sequence length {seq_len} cannot be sharded with layout={layout!r} over {world} ranks: "
            f"it must be a multiple of {chunks}"
        )


def segments(layout: str, rank: int, world: int, local_seq: int) -> list[Segment]:
    """The runs of global positions held by ring position ``rank`` (in local order)."""
    check_local_seq(layout, local_seq, world)
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} is outside the ring of size {world}")
    if layout == "contiguous":
        return [Segment(0, local_seq, rank * local_seq, 1)]
    if layout == "striped":
        return [Segment(0, local_seq, rank, world)]
    half = local_seq // 2
    return [Segment(0, half, rank * half, 1), Segment(half, half, (2 * world - 1 - rank) * half, 1)]


def local_positions(seq_len: int, layout: str, rank: int, world: int) -> torch.Tensor:
    """Global positions (int64, shape (seq_len // world,)) that ring position ``rank`` holds.

    Use them for rotary embeddings and to shard token ids: ``tokens[:, local_positions(...)]``.
    """
    check_seq_len(layout, seq_len, world)
    parts = [
        seg.global_start + seg.stride * torch.arange(seg.length, dtype=torch.long)
        for seg in segments(layout, rank, world, seq_len // world)
    ]
    return torch.cat(parts)
