"""The job's Megatron-core GPT: its TransformerConfig, its layer spec (ring or dense attention) and, for one
pipeline stage, the whole ``GPTModel``.

Initialisation does not depend on the pipeline split: every transformer layer draws its weights
from a seed of its global layer number (:class:`SeededTransformerLayer`), the embedding from
``--seed`` before anything else, and the output layer right after the last layer, as
``GPTModel`` builds them. So ``--pipeline-model-parallel-size`` 1 and 2 start from the same weights.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

from launch import recompute


def dtype_of(args) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def padded_vocab(size: int, tensor: int) -> int:
    """Padded as Megatron-LM does, to a multiple of 128 that the tensor-parallel ranks split evenly."""
    vocab = -(-size // 128) * 128
    while vocab % tensor:
        vocab += 128
    return vocab


def layer_seed(seed: int, layer_number: int) -> int:
    return (seed * 1_000_003 + layer_number) % 2**31


class SeededTransformerLayer(TransformerLayer):
    """Megatron-core's ``TransformerLayer`` whose weights come from a seed of its global layer number.

    ``seed`` comes from the layer spec's params; the global number is Megatron's (the layer number
    within the pipeline stage plus the stage's offset). ``last_mlp_layer``: with a self-recomputing MLP, the
    last layer of the stage whose MLP recomputes itself (``launch.recompute.last_mlp_layer``)."""

    def __init__(self, config, submodules, layer_number: int = 1, *args, seed: int = 0,
                 last_mlp_layer: int | None = None, **kwargs):
        offset = get_transformer_layer_offset(config, kwargs.get("vp_stage"))
        torch.manual_seed(layer_seed(seed, layer_number + offset))
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        if getattr(type(self.mlp), "recomputed", False):
            self.mlp.recompute_self = recompute.mlp_recomputes(config, layer_number, last_mlp_layer)


def transformer_config(args):
    """Megatron-core's TransformerConfig from the job's flags (CPU-safe fusions off)."""
    from megatron.core.transformer import TransformerConfig

    dtype = dtype_of(args)
    pipeline = args.pipeline_model_parallel_size
    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        normalization=args.normalization, gated_linear_unit=args.swiglu, add_bias_linear=args.add_bias_linear,
        activation_func=torch.nn.functional.silu if args.swiglu else torch.nn.functional.gelu,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std, tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline, pipeline_dtype=dtype if pipeline > 1 else None,
        context_parallel_size=args.context_parallel_size, bf16=args.bf16, fp16=args.fp16, params_dtype=dtype,
        use_cpu_initialization=True, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        # selective: the MLPs recompute themselves (layer_spec: recompute.recomputed_mlp), not through Megatron's
        # reentrant checkpoint, whose backward on CPU recursed until memory ran out (seen with megatron-core 0.16.1)
        recompute_granularity=None if args.recompute_granularity == "selective" else args.recompute_granularity,
        recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers)


def layer_spec(args, config):
    """Megatron's local GPT layer spec with ring core attention (--ring-attention) or dense attention
    over the whole sequence (PyTorch's fused attention: Megatron's own DotProductAttention needs CUDA);
    liger's RMSNorm and SwiGLU with --fused-kernels liger; self-recomputing MLPs with selective recompute."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_patch import RingOptions, with_ring_core_attention

    spec = get_gpt_layer_local_spec(normalization=args.normalization, qk_layernorm=config.qk_layernorm)
    if args.fused_kernels == "liger":
        from megatron_patch.liger import with_liger_kernels

        spec, _ = with_liger_kernels(spec, config)
    last_mlp = recompute.last_mlp_layer(args)
    if last_mlp != 0:
        spec.submodules.mlp.module = recompute.recomputed_mlp(spec.submodules.mlp.module)
    if args.ring_attention:
        spec = with_ring_core_attention(spec, RingOptions.from_args(args))
    else:
        from launch.dense_attention import DenseCoreAttention

        spec.submodules.self_attention.submodules.core_attention = DenseCoreAttention
    spec.module = SeededTransformerLayer
    spec.params = {**spec.params, "seed": args.seed, "last_mlp_layer": last_mlp}
    return spec


def rope_layout(args) -> str:
    """The layout RoPE positions follow: the ring's, or the whole sequence's without the ring."""
    return args.ring_layout if args.ring_attention else "contiguous"


def build_model(args, vocab_size: int, fused_loss: bool = True):
    """The whole ``GPTModel`` (one pipeline stage); ``torch.manual_seed(args.seed)`` first. With
    --fused-kernels liger and ``fused_loss``, liger's fused linear cross-entropy is the training loss."""
    from megatron.core.models.gpt import GPTModel

    from megatron_patch import LayoutRotaryEmbedding, RingOptions, ring_gpt_model

    config = transformer_config(args)
    spec = layer_spec(args, config)
    common = dict(vocab_size=vocab_size, max_sequence_length=args.max_position_embeddings,
                  position_embedding_type=args.position_embedding_type, transformer_layer_spec=spec,
                  share_embeddings_and_output_weights=args.tie_embeddings_and_output_weights)
    if args.ring_attention:
        model = ring_gpt_model(config, options=RingOptions.from_args(args), **common)
    else:
        model = GPTModel(config, **common)
        if args.position_embedding_type == "rope":  # Megatron's own table moves itself to CUDA
            LayoutRotaryEmbedding.convert(model.rotary_pos_emb, rope_layout(args))
    if args.fused_kernels == "liger" and fused_loss:
        from megatron_patch.liger import LigerLossGPTModel, fused_loss_applies

        if fused_loss_applies(model):
            LigerLossGPTModel.convert(model)
    return model


def fused_kernels(args, model) -> list[str]:
    """The liger kernels ``model`` (a GPTModel or a pipeline stage's module) runs; empty with --fused-kernels none."""
    if args.fused_kernels != "liger":
        return []
    from megatron_patch.liger import LigerLossGPTModel, LigerSwiGLUMLP, rope_marked

    modules = list(model.modules())
    return [name for name, there in (
        ("RMSNorm", any(type(m).__name__ == "LigerMegatronRMSNorm" for m in modules)),
        ("SwiGLU", any(isinstance(m, LigerSwiGLUMLP) for m in modules)),
        ("RoPE", args.position_embedding_type == "rope"
         and any(rope_marked(m.config) for m in modules if type(m).__name__ == "SelfAttention")),
        ("fused linear cross-entropy", isinstance(model, LigerLossGPTModel))) if there]
