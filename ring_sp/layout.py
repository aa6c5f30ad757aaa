"""How a global sequence is sharded over the W positions of a ring: one class per layout, one registry.

- ``contiguous``: position r holds [r·n, (r+1)·n).
- ``striped``: position r holds r, r+W, r+2W, … (Striped Attention, Brandon et al. 2023).
- ``zigzag``: the sequence is cut into 2W chunks; position r holds chunk r then chunk 2W−1−r
  (Megatron-core's ``get_batch_on_this_cp_rank`` split, so Megatron's own data split and RoPE
  slicing are this layout).

A layout reduces to :class:`Segment` s (runs of local tokens whose global positions form an
arithmetic sequence): the schedule, the data split and RoPE positions all come from them, so a new
layout is one subclass registered in ``LAYOUTS``. Pure index maths: no torch.distributed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


class Layout:
    """A sharding of a ring's sequence: ``chunks`` equal chunks per position; ``megatron_native``: it is
    Megatron's own context-parallel split (its data split and RoPE slicing need no replacement)."""

    name: str
    chunks: int = 1
    megatron_native: bool = False

    def segment_list(self, rank: int, world: int, local_seq: int) -> list[Segment]:
        raise NotImplementedError

    def check_local_seq(self, local_seq: int, world: int) -> None:
        """ValueError unless every position can hold ``local_seq`` tokens."""
        if local_seq < 1:
            raise ValueError(f"local sequence length is {local_seq}: each rank needs at least one token")
        if local_seq % self.chunks:
            must = "even" if self.chunks == 2 else f"a multiple of {self.chunks}"
            raise ValueError(
                f"layout={self.name!r} cuts the sequence into {self.chunks}·W chunks, so the local sequence length "
                f"must be {must}, got {local_seq}: pad the sequence to a multiple of {self.chunks * world} or use "
                "layout='contiguous' or 'striped'")

    def check_seq_len(self, seq_len: int, world: int) -> None:
        """ValueError unless a global sequence of ``seq_len`` splits over ``world`` positions."""
        if seq_len % (self.chunks * world):
            raise ValueError(f"sequence length {seq_len} cannot be sharded with layout={self.name!r} over {world} "
                             f"ranks: it must be a multiple of {self.chunks * world}")


class Contiguous(Layout):
    name = "contiguous"

    def segment_list(self, rank: int, world: int, local_seq: int) -> list[Segment]:
        return [Segment(0, local_seq, rank * local_seq, 1)]


class Striped(Layout):
    name = "striped"

    def segment_list(self, rank: int, world: int, local_seq: int) -> list[Segment]:
        return [Segment(0, local_seq, rank, world)]


class Zigzag(Layout):
    name = "zigzag"
    chunks = 2
    megatron_native = True

    def segment_list(self, rank: int, world: int, local_seq: int) -> list[Segment]:
        half = local_seq // 2
        return [Segment(0, half, rank * half, 1), Segment(half, half, (2 * world - 1 - rank) * half, 1)]


_REGISTRY: dict[str, Layout] = {layout.name: layout for layout in (Contiguous(), Striped(), Zigzag())}
LAYOUTS = tuple(_REGISTRY)  # the names, in a fixed order


def get_layout(layout: str) -> Layout:
    """The layout called ``layout``; ValueError listing the known names otherwise."""
    if layout not in _REGISTRY:
        raise ValueError(f"layout={layout!r} is unknown: use one of {', '.join(LAYOUTS)}")
    return _REGISTRY[layout]


def check_layout(layout: str) -> None:
    get_layout(layout)


def check_local_seq(layout: str, local_seq: int, world: int) -> None:
    """Raise ValueError if ``layout`` cannot shard a sequence into ``world`` shards of ``local_seq``."""
    get_layout(layout).check_local_seq(local_seq, world)


def check_seq_len(layout: str, seq_len: int, world: int) -> None:
    """Raise ValueError unless a global sequence of ``seq_len`` splits over ``world`` ranks."""
    get_layout(layout).check_seq_len(seq_len, world)


def segments(layout: str, rank: int, world: int, local_seq: int) -> list[Segment]:
    """The runs of global positions held by ring position ``rank`` (in local order)."""
    check_local_seq(layout, local_seq, world)
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} is outside the ring of size {world}")
    return get_layout(layout).segment_list(rank, world, local_seq)


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
