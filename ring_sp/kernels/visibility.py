"""Which cells of a block of attention are visible: the one description every backend receives.

A cell (query row i, key column j, both relative to the block's corner) is visible iff the band
shows it (lo ≤ i − j ≤ hi), the key mask keeps column j, and, for a block that spans several
documents, row i and column j lie in the same document. A backend looks at the whole object and
accepts or declines the block (``Backend.unsupported``); a new kind of mask is a new field here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ring_sp.band import Band


class Ragged(NamedTuple):
    """A block's documents as a batch of variable-length sequences, for kernels that take boundaries.

    runs: (query rows, key columns) of each document, in order, batch element after batch element, then
    empty documents up to a power-of-two count; cu_q, cu_k: their cumulative sums from 0 (int32, on the block's
    device); max_q, max_k: one bound on the longest in rows and columns, a power of two. (cuDNN builds a plan per
    count and bounds: rounded, and one bound for both, ~15 plans serve 300 batches of new documents.)
    """

    runs: tuple[tuple[int, int], ...]
    cu_q: Tensor
    cu_k: Tensor
    max_q: int
    max_k: int


class BlockDocuments:
    """Document ids of a block's query rows ``q`` (batch, sq) and key columns ``k`` (batch, sk), int32,
    non-decreasing along each row (positions increase with the local index in every layout).

    The row and column ranges each document covers in the other axis are computed on the device
    once, on first use, and kept (the backward reuses the forward's). ``runs`` (from the schedule, when
    every batch element shares the documents): each document's (query rows, key columns), in order.
    """

    def __init__(self, q: Tensor, k: Tensor, runs: tuple[tuple[int, int], ...] = ()):
        self.q, self.k = q.contiguous(), k.contiguous()
        self.runs = runs
        self._key_ranges: tuple[Tensor, Tensor] | None = None
        self._query_ranges: tuple[Tensor, Tensor] | None = None
        self._ragged: Ragged | None = None

    def ragged(self) -> Ragged:
        """The runs of every batch element, with their cumulative sums on the device (built once)."""
        if self._ragged is None:
            self._ragged = ragged(self.runs * self.q.shape[0], self.q.device)
        return self._ragged

    def same(self, rows: slice, cols: slice) -> Tensor:
        """(batch, rows, cols) bool: which cells of the tile share a document."""
        return self.q[:, rows, None] == self.k[:, None, cols]

    def key_ranges(self) -> tuple[Tensor, Tensor]:
        """(lo, hi), each (batch, sq) int32: row i's document covers key columns [lo[i], hi[i])."""
        if self._key_ranges is None:
            self._key_ranges = (torch.searchsorted(self.k, self.q, out_int32=True),
                                torch.searchsorted(self.k, self.q, right=True, out_int32=True))
        return self._key_ranges

    def query_ranges(self) -> tuple[Tensor, Tensor]:
        """(lo, hi), each (batch, sk) int32: column j's document covers query rows [lo[j], hi[j])."""
        if self._query_ranges is None:
            self._query_ranges = (torch.searchsorted(self.q, self.k, out_int32=True),
                                  torch.searchsorted(self.q, self.k, right=True, out_int32=True))
        return self._query_ranges


def ragged(runs: tuple[tuple[int, int], ...], device: torch.device) -> Ragged:
    """``runs`` (query rows, key columns), one per sequence, as a :class:`Ragged` on ``device``."""
    runs += ((0, 0),) * (power_of_two(len(runs)) - len(runs))
    bounds = [(0, 0)]
    for rows, cols in runs:
        bounds.append((bounds[-1][0] + rows, bounds[-1][1] + cols))
    cu = torch.tensor(bounds, dtype=torch.int32).t().contiguous().to(device, non_blocking=True)
    longest = power_of_two(max(max(run) for run in runs))
    return Ragged(runs, cu[0], cu[1], longest, longest)


def power_of_two(n: int) -> int:
    """The least power of two ≥ n (1 for n ≤ 1)."""
    return 1 << max(0, n - 1).bit_length()


@dataclass(eq=False)
class Visibility:
    """band: cells by diagonal offset; key_mask (batch, sk) bool, True = may be attended, or None;
    documents: per-cell document test for blocks that span several documents, or None."""

    band: Band = Band()
    key_mask: Tensor | None = None
    documents: BlockDocuments | None = None

    @property
    def kind(self) -> str:
        """e.g. ``causal``, ``full+mask``, ``band+documents``: for messages and logs."""
        return self.band.kind + ("+mask" if self.key_mask is not None else "") + (
            "+documents" if self.documents is not None else "")
