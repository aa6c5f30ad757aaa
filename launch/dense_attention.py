"""Plain dense causal attention as a Megatron-core core attention: the run *without* ring attention.

PyTorch's ``scaled_dot_product_attention`` over the whole, unsharded sequence: the baseline the
ring runs are compared with, on CPU (Megatron's own ``DotProductAttention`` needs CUDA, FACTS.md)
and on GPUs (where SDPA runs flash / cuDNN, while Megatron's local attention materialises the
seq × seq scores and would make a weak long-context baseline). It refuses a context-parallel
size above 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from megatron_patch.documents import documents_of, is_document_mask
from ring_sp.documents import document_ids


class DenseCoreAttention(MegatronModule):
    """Causal (or full) softmax attention of one rank's whole sequence; GQA groups expanded."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, model_comm_pgs=None):
        super().__init__(config=config)
        if getattr(config, "context_parallel_size", 1) != 1:
            raise ValueError("dense attention holds the whole sequence on one rank: use --context-parallel-size 1 "
                             "or --ring-attention")
        self.causal = attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias: Tensor | None = None,
                packed_seq_params=None) -> Tensor:
        """query [s, b, heads, d], key/value [s, b, groups, d] → [s, b, heads · d]."""
        s, b, h, d = query.shape
        groups = key.shape[2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # (b, heads, s, d)
        k, v = (t.repeat_interleave(h // groups, dim=1) for t in (k, v))
        mask = None
        if is_document_mask(attention_mask):  # packed documents: block-diagonal (and causal) visibility
            pos = torch.arange(s, device=q.device)
            ids = torch.stack([document_ids(b, pos) for b in documents_of(attention_mask)])
            mask = (ids[:, None, :, None] == ids[:, None, None, :]) & (pos[:, None] >= pos[None, :] if self.causal
                                                                       else True)
        elif attention_mask is not None:
            raise ValueError("dense attention takes no mask but a document mask (--reset-attention-mask)")
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and mask is None, attn_mask=mask,
                                             scale=self.softmax_scale, dropout_p=self.dropout if self.training else 0.0)
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
