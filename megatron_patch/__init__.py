"""Ring attention inside Megatron-core's GPT layers, and the ``--ring-attention`` flag for Megatron-LM.

- ``get_gpt_layer_ring_spec(options)``: Megatron's GPT layer spec with ``RingCoreAttention``;
  ``ring_gpt_layer_spec``: the same, module-level, for Megatron-LM's ``--spec megatron_patch ring_gpt_layer_spec``.
- ``ring_gpt_model(config, ...)``: a GPTModel with that spec and RoPE positions that follow the layout;
  ``shard_batch(batch, layout, cp_group)``: the matching data split.
- ``add_ring_attention_args`` / ``validate_ring_args`` / ``RingOptions.from_args``: the flags
  (``RingOptions`` is ``ring_sp.options.RingOptions``, which defines them).
- ``apply()``: make Megatron-LM's ``pretrain_gpt.py`` honour them (``python -m megatron_patch pretrain_gpt.py``),
  or stop every rank with ``RingAttentionNotApplied``; ``python -m megatron_patch check PATH`` reports on a checkout.

Names are imported on first use (PEP 562), so ``megatron_patch.options`` (the flags, no Megatron
import) can be used to check a command line before Megatron-core is imported.
"""

import importlib

# public name -> the submodule that defines it
_SOURCES = {
    "shard_batch": "batch",
    "RingCoreAttention": "core_attention",
    "RingAttentionNotApplied": "guard",
    "boundaries_from_eod": "documents",
    "document_mask": "documents",
    "reset_position_ids": "documents",
    "apply": "megatron_lm",
    "configure": "megatron_lm",
    "restore": "megatron_lm",
    "RingOptions": "options",
    "add_ring_attention_args": "options",
    "validate_ring_args": "options",
    "LayoutRotaryEmbedding": "rope",
    "get_gpt_layer_ring_spec": "spec",
    "ring_gpt_layer_spec": "spec",
    "ring_gpt_model": "spec",
    "with_ring_core_attention": "spec",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module 'megatron_patch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"megatron_patch.{_SOURCES[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))
