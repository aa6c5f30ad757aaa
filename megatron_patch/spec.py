"""Megatron's GPT layer specs with the ring core attention, and a GPTModel built from them."""

from __future__ import annotations

import copy
import functools

from megatron.core.models.gpt import GPTModel, gpt_layer_specs
from megatron.core.transformer.attention import Attention
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_patch.core_attention import RingCoreAttention, keep_out_of_recompute
from megatron_patch.options import LAYOUT_AWARE_POSITIONS, RingOptions, transformer_engine_installed
from megatron_patch.rope import LayoutRotaryEmbedding
from ring_sp.options import FLAGS


def ring_core_attention_spec(options: RingOptions | None) -> ModuleSpec:
    """The spec of ``RingCoreAttention`` (options None: the running Megatron-LM job's, when built)."""
    return ModuleSpec(module=RingCoreAttention, params={} if options is None else {"options": options})


@functools.cache
def recompute_free(attention_class: type) -> type:
    """A subclass of ``attention_class`` (Megatron's SelfAttention, ...) that never recomputes its ring core
    attention (``keep_out_of_recompute``); same name, same constructor."""
    if getattr(attention_class, "ring_recompute_free", False):
        return attention_class

    def __init__(self, *args, **kwargs):
        attention_class.__init__(self, *args, **kwargs)
        keep_out_of_recompute(self)

    return type(attention_class.__name__, (attention_class,), {"__init__": __init__, "__module__": __name__,
                                                               "ring_recompute_free": True})


def with_ring_core_attention(spec, options: RingOptions | None = None):
    """A copy of a GPT layer spec (or of a block spec's layer specs) whose core attention is the ring's.

    ``options`` None: resolved when the layer is built (``megatron_patch.apply()``'s flags, else defaults).
    """
    if options is not None:
        options.check(FLAGS)
    if hasattr(spec, "layer_specs"):  # TransformerBlockSubmodules (MoE / heterogeneous blocks)
        spec = copy.copy(spec)
        spec.layer_specs = [with_ring_core_attention(layer, options) for layer in spec.layer_specs]
        return spec
    spec = copy.deepcopy(spec)
    attention = getattr(getattr(spec, "submodules", None), "self_attention", None)
    submodules = getattr(attention, "submodules", None)
    if submodules is None or not hasattr(submodules, "core_attention"):
        raise ValueError(f"{spec!r} has no self_attention.submodules.core_attention to replace")
    if hasattr(submodules, "linear_kv_down_proj"):
        raise ValueError("multi-latent attention (MLA) is not supported by ring attention")
    submodules.core_attention = ring_core_attention_spec(options)
    if isinstance(attention.module, type) and issubclass(attention.module, Attention):
        attention.module = recompute_free(attention.module)
    return spec


def get_gpt_layer_ring_spec(options: RingOptions | None = None, *, qk_layernorm: bool = False,
                            transformer_engine: bool = False, **spec_kwargs) -> ModuleSpec:
    """Megatron's GPT layer spec with ring core attention.

    ``transformer_engine=False``: ``get_gpt_layer_local_spec`` (Megatron-core modules only);
    True: ``get_gpt_layer_with_transformer_engine_spec`` (needs Transformer Engine). Other keywords
    (``normalization``, ``num_experts``, ...) go to that function.
    """
    if spec_kwargs.get("multi_latent_attention"):
        raise ValueError("multi_latent_attention=True (MLA) is not supported by ring attention")
    if transformer_engine:
        if not transformer_engine_installed():
            raise ValueError("transformer_engine=True asks for Transformer Engine layers, but transformer_engine "
                             "is not installed: pass transformer_engine=False for the local spec, or install it")
        base = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm, **spec_kwargs)
    else:
        base = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, **spec_kwargs)
    return with_ring_core_attention(base, options)


def ring_gpt_model(config, *, vocab_size: int, max_sequence_length: int, options: RingOptions | None = None,
                   position_embedding_type: str = "rope", transformer_layer_spec=None, **gpt_kwargs) -> GPTModel:
    """A ``GPTModel`` with ring core attention whose RoPE positions follow ``options.layout``.

    ``transformer_layer_spec`` (default: the local ring spec) gets the ring core attention put in.
    Feed it batches sharded by ``shard_batch(batch, options.layout, cp_group)``.
    """
    options = options if options is not None else RingOptions()
    options.check(FLAGS)
    if not options.megatron_native and position_embedding_type not in LAYOUT_AWARE_POSITIONS:
        raise ValueError(f"position_embedding_type={position_embedding_type!r} keeps Megatron's zigzag positions: "
                         f"use layout 'zigzag', or one of {', '.join(LAYOUT_AWARE_POSITIONS)}")
    if transformer_layer_spec is None:
        transformer_layer_spec = get_gpt_layer_ring_spec(
            options, qk_layernorm=getattr(config, "qk_layernorm", False),
            normalization=getattr(config, "normalization", None))
    else:
        transformer_layer_spec = with_ring_core_attention(transformer_layer_spec, options)
    model = GPTModel(config, transformer_layer_spec=transformer_layer_spec, vocab_size=vocab_size,
                     max_sequence_length=max_sequence_length, position_embedding_type=position_embedding_type,
                     **gpt_kwargs)
    if position_embedding_type == "rope" and hasattr(model, "rotary_pos_emb"):
        LayoutRotaryEmbedding.convert(model.rotary_pos_emb, options.layout)
    return model


# For Megatron-LM's `--spec megatron_patch ring_gpt_layer_spec`: the local layer spec, ring options
# taken from the --ring-* flags when the layer is built.
ring_gpt_layer_spec = with_ring_core_attention(gpt_layer_specs.get_gpt_layer_local_spec())
