"""Rotary embeddings whose per-rank positions follow the ring layout.

Megatron's ``RotaryEmbedding`` slices its table for the context-parallel rank with the zigzag
split (``get_pos_emb_on_this_cp_rank``). ``LayoutRotaryEmbedding`` is the same module (same
``inv_freq``, same table) that keeps the rows of the positions this rank holds under any layout —
for ``zigzag`` exactly Megatron's rows — and that also runs on CPU.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from torch import Tensor

from megatron_patch.defaults import megatron_lm_options
from ring_sp import local_positions
from ring_sp.layout import check_layout


class LayoutRotaryEmbedding(RotaryEmbedding):
    """Megatron's ``RotaryEmbedding`` with the table sliced for ``layout`` on the context-parallel group.

    ``layout`` None (the class default, used after ``megatron_patch.apply()``): the layout of the
    running Megatron-LM ``--ring-attention`` job, or Megatron's own behaviour when there is none.
    """

    layout: str | None = None
    _placed = False  # set once model.to(device) / .cuda() / .cpu() has moved inv_freq with the model

    def _apply(self, fn, recurse: bool = True):
        """``model.to(device)`` moves ``inv_freq`` (a plain attribute, not a buffer) with the model, keeping
        its float32: a CPU model on a machine with a GPU keeps its table on the CPU."""
        moved = fn(self.inv_freq)
        if moved.device != self.inv_freq.device:
            self.inv_freq = self.inv_freq.to(moved.device)
            type(self).forward.cache_clear()  # tables built on the old device
        self._placed = True
        return super()._apply(fn, recurse)

    @classmethod
    def convert(cls, rope: RotaryEmbedding, layout: str) -> LayoutRotaryEmbedding:
        """Turn an existing ``RotaryEmbedding`` (e.g. ``GPTModel.rotary_pos_emb``) into this class, in place."""
        if type(rope) not in (RotaryEmbedding, cls):
            raise ValueError(f"{type(rope).__name__} is not Megatron's RotaryEmbedding: only position_embedding_type "
                             "'rope' follows a ring layout (use layout 'zigzag' for yarn / mrope)")
        check_layout(layout)
        rope.__class__ = cls
        rope.layout = layout
        return rope

    @lru_cache(maxsize=32)  # noqa: B019 -- as Megatron's own forward: the table is reused every step
    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> Tensor:
        """This rank's rows of the table for a sequence of ``max_seq_len`` tokens: [local_seq, 1, 1, dim]."""
        layout = self.layout
        if layout is None:
            options = megatron_lm_options()
            if options is None:  # not a ring-attention job: Megatron's own rotary embedding
                extra = () if cp_group is None else (cp_group,)  # megatron-core < 0.15 has no cp_group
                return super().forward(max_seq_len, offset, packed_seq, *extra)
            layout = options.layout
        self.ring_forward_ran = True  # for megatron_patch.guard: Megatron's RoPE table comes from here
        group = cp_group if cp_group is not None else getattr(self, "cp_group", None)
        size = 1 if group is None else group.size()
        if self.inv_freq.device.type == "cpu" and torch.cuda.is_available() and not self._placed:
            self.inv_freq = self.inv_freq.to(torch.cuda.current_device())  # as Megatron's get_emb does
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [seq, dim / 2], Megatron's own
        if size > 1 and not packed_seq:  # packed (THD): the whole table, rows picked per token by packed_rope
            freqs = freqs.index_select(0, local_positions(max_seq_len, layout, group.rank(), size).to(freqs.device))
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        return emb[:, None, None, :]
