"""Which cells of a block of attention are visible: a band on the diagonal offset."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Band:
    """Key column j is visible to query row i iff lo ≤ i − j ≤ hi (None: unbounded)."""

    lo: int | None = None
    hi: int | None = None

    @property
    def kind(self) -> str:
        """``full``, ``causal`` (j ≤ i), ``strict`` (j < i, the seed's CAUSAL_MASK_DIAGONAL) or ``band``."""
        if self.hi is None:
            if self.lo is None:
                return "full"
            if self.lo in (0, 1):
                return "causal" if self.lo == 0 else "strict"
        return "band"
