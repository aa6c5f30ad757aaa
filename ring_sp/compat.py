"""Drop-in for ring-attention-pytorch users: the seed's ``ring_flash_attn_cuda`` signature.

Differences from the original, all on purpose: any device and dtype (not CUDA fp16/bf16 only),
the key mask works together with ``causal`` (the original dropped it), the state stays float32
between ring steps, and GQA is accepted (k, v with fewer heads than q).
"""

from __future__ import annotations

from torch import Tensor

from ring_sp.attention import ring_attention


def ring_flash_attn_cuda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    causal: bool = False,
    bucket_size: int = 1024,
    ring_reduce_col: bool = False,
    striped_ring_attn: bool = False,
    max_lookback_seq_len: int | None = None,
    ring_size: int | None = None,
) -> Tensor:
    """q, k, v: (batch, local_seq, heads, head_dim) of this rank; mask: (batch, local_seq) bool.

    ``ring_reduce_col=True`` passes K/V around the ring; False (the original default) attends to
    the local K/V only. ``striped_ring_attn`` selects the striped layout, otherwise contiguous.
    """
    return ring_attention(
        q, k, v,
        causal=causal,
        mask=mask,
        layout="striped" if striped_ring_attn else "contiguous",
        ring_reduce_col=ring_reduce_col,
        bucket_size=bucket_size,
        max_lookback_seq_len=max_lookback_seq_len,
        ring_size=ring_size,
    )
