"""Ring attention inside Megatron-core's GPT layers, and the ``--ring-attention`` flag for Megatron-LM.

- ``get_gpt_layer_ring_spec(options)``: Megatron's GPT layer spec with ``RingCoreAttention``;
  ``ring_gpt_layer_spec``: the same, module-level, for Megatron-LM's ``--spec megatron_patch ring_gpt_layer_spec``.
- ``ring_gpt_model(config, ...)``: a GPTModel with that spec and RoPE positions that follow the layout;
  ``shard_batch(batch, layout, cp_group)``: the matching data split.
- ``add_ring_attention_args`` / ``validate_ring_args`` / ``RingOptions.from_args``: the flags.
- ``apply()``: make Megatron-LM's ``pretrain_gpt.py`` honour them (``python -m megatron_patch pretrain_gpt.py``),
  or stop every rank with ``RingAttentionNotApplied``; ``python -m megatron_patch check PATH`` reports on a checkout.
"""

from megatron_patch.batch import shard_batch
from megatron_patch.core_attention import RingCoreAttention
from megatron_patch.guard import RingAttentionNotApplied
from megatron_patch.megatron_lm import apply, configure, restore
from megatron_patch.options import RingOptions, add_ring_attention_args, validate_ring_args
from megatron_patch.rope import LayoutRotaryEmbedding
from megatron_patch.spec import get_gpt_layer_ring_spec, ring_gpt_layer_spec, ring_gpt_model, with_ring_core_attention

__all__ = [
    "LayoutRotaryEmbedding",
    "RingAttentionNotApplied",
    "RingCoreAttention",
    "RingOptions",
    "add_ring_attention_args",
    "apply",
    "configure",
    "restore",
    "get_gpt_layer_ring_spec",
    "ring_gpt_layer_spec",
    "ring_gpt_model",
    "shard_batch",
    "validate_ring_args",
    "with_ring_core_attention",
]
