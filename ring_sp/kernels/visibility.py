"""Which cells of a block of attention are visible: the one description every backend receives.

A cell (query row i, key column j, both relative to the block's corner) is visible iff the band
shows it (lo ≤ i − j ≤ hi), the key mask keeps column j, and, for a block that spans several
documents, row i and column j lie in the same document. A backend looks at the whole object and
accepts or declines the block (``Backend.unsupported``); a new kind of mask is a new field here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ring_sp.band import Band


class BlockDocuments:
    """Document ids of a block's query rows ``q`` (batch, sq) and key columns ``k`` (batch, sk), int32,
    non-decreasing along each row (positions increase with the local index in every layout).

    The row and column ranges each document covers in the other axis are computed on the device
    once, on first use, and kept (the backward reuses the forward's).
    """

    def __init__(self, q: Tensor, k: Tensor):
        self.q, self.k = q.contiguous(), k.contiguous()
        self._key_ranges: tuple[Tensor, Tensor] | None = None
        self._query_ranges: tuple[Tensor, Tensor] | None = None

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
