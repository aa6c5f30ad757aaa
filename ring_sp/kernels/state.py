"""Running softmax state of a query shard, folded one K/V block at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class State:
    """Softmax statistics of query rows over the keys folded in so far.

    acc: (batch, seq, heads, head_dim) Σ_j exp(s_j − m)·v_j, unnormalised.
    m:   (batch, heads, seq) row max of the scaled scores s (−inf: no key seen yet).
    lse: (batch, heads, seq) log Σ_j exp(s_j) (−inf: no key seen yet).
    All three are float32 (float64 for float64 inputs), whatever the input dtype.
    """

    acc: Tensor
    m: Tensor
    lse: Tensor

    @classmethod
    def empty(cls, q: Tensor) -> State:
        """The state of no keys at all for queries shaped like ``q`` (batch, seq, heads, head_dim)."""
        b, s, h, d = q.shape
        dtype = state_dtype(q.dtype)
        acc = torch.zeros(b, s, h, d, dtype=dtype, device=q.device)
        m = torch.full((b, h, s), float("-inf"), dtype=dtype, device=q.device)
        return cls(acc, m, m.clone())

    def rows(self, start: int, stop: int) -> State:
        """A view of query rows [start, stop); writes go to this state."""
        return State(self.acc[:, start:stop], self.m[:, :, start:stop], self.lse[:, :, start:stop])

    def output(self) -> Tensor:
        """Normalised output (batch, seq, heads, head_dim) in the state's dtype; 0 where no key was seen."""
        scale = torch.where(torch.isfinite(self.lse), torch.exp(self.m - self.lse), 0.0)
        return self.acc * scale.transpose(1, 2).unsqueeze(-1)

    def finish(self, out: Tensor | None) -> None:
        """Write the normalised output into ``out`` (any dtype), if given: for backends that do not
        normalise in their last step."""
        if out is not None:
            out.copy_(self.output())
