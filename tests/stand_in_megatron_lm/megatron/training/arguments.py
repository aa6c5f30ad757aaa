"""Megatron-LM's argument parsing, reduced to the flags ``python -m megatron_patch check`` passes."""

import argparse

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


def parse_args(extra_args_provider=None, ignore_unknown_args=False):
    parser = argparse.ArgumentParser()
    for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length", "--max-position-embeddings",
                 "--micro-batch-size", "--global-batch-size", "--train-iters", "--vocab-size"):
        parser.add_argument(flag, type=int)
    parser.add_argument("--context-parallel-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1234)
    for flag in ("--lr", "--attention-dropout", "--hidden-dropout"):
        parser.add_argument(flag, type=float, default=0.1)
    for flag in ("--tokenizer-type", "--position-embedding-type", "--transformer-impl"):
        parser.add_argument(flag)
    for flag in ("--mock-data", "--use-cpu-initialization", "--stand-in-override-core-attention",
                 "--stand-in-swap-after-build"):
        parser.add_argument(flag, action="store_true")
    for flag in ("rope-fusion", "masked-softmax-fusion", "bias-dropout-fusion", "bias-swiglu-fusion",
                 "persist-layer-norm", "gradient-accumulation-fusion", "create-attention-mask-in-dataloader"):
        parser.add_argument(f"--no-{flag}", dest=flag.replace("-", "_"), action="store_false")
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    return parser.parse_known_args()[0] if ignore_unknown_args else parser.parse_args()


def validate_args(args, defaults={}):  # noqa: B006 -- Megatron-LM's signature
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def core_transformer_config_from_args(args):
    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        context_parallel_size=args.context_parallel_size, attention_dropout=args.attention_dropout,
        hidden_dropout=args.hidden_dropout, use_cpu_initialization=args.use_cpu_initialization,
        apply_rope_fusion=args.rope_fusion, masked_softmax_fusion=args.masked_softmax_fusion,
        bias_dropout_fusion=args.bias_dropout_fusion, gradient_accumulation_fusion=args.gradient_accumulation_fusion,
        persist_layer_norm=args.persist_layer_norm, params_dtype=torch.float32)
