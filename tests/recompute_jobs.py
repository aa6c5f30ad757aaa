"""Jobs for the gloo pool: a ring GPT under each activation-recompute setting, counting how often the
ring's forward runs per training step, and its loss and gradients."""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.transformer_config import TransformerConfig

import ring_sp.attention as attention
from launch.job import cpu_recompute_rng
from megatron_patch import LayoutRotaryEmbedding, RingOptions, get_gpt_layer_ring_spec, ring_gpt_model, shard_batch
from tests.megatron_jobs import VOCAB, megatron_parallel

LAYERS, SEQ = 3, 16
# name -> (recompute_granularity, recompute_modules, recompute_method, recompute_num_layers, plain attention class)
SETTINGS = {
    "none": (None, None, None, None, False),
    "selective_core_attn": ("selective", ["core_attn"], None, None, False),  # Megatron-LM's --recompute-activations
    "selective_mlp": ("selective", ["mlp"], None, None, False),  # the job's selective
    "full": ("full", None, "uniform", 1, False),
    # control: Megatron's own SelfAttention around the ring core attention checkpoints it and runs the ring twice
    "selective_core_attn_stock": ("selective", ["core_attn"], None, None, True),
}


def _config(cp: int, granularity, modules, method, layers_recomputed) -> TransformerConfig:
    return TransformerConfig(
        num_layers=LAYERS, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
        context_parallel_size=cp, use_cpu_initialization=True, masked_softmax_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        attention_dropout=0.0, hidden_dropout=0.0, params_dtype=torch.float32, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        recompute_granularity=granularity, recompute_modules=modules, recompute_method=method,
        recompute_num_layers=layers_recomputed)


@contextlib.contextmanager
def counted_ring(cp: int):
    """Megatron's groups for a ring of ``cp``; yields (this rank's zigzag shard of one batch, the list that gets
    an entry per ring forward)."""
    cpu_recompute_rng()  # Megatron's checkpoint saves the CUDA RNG state too; on CPU only the CPU one draws
    calls = []
    original = attention._ring_forward

    def counting(*args):
        calls.append(1)
        return original(*args)

    with megatron_parallel(1, cp):
        group = parallel_state.get_context_parallel_group()
        g = torch.Generator().manual_seed(7)
        tokens = torch.randint(0, VOCAB, (1, SEQ), generator=g)
        batch = shard_batch({"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
                             "position_ids": torch.arange(SEQ)[None]}, "zigzag", group)
        attention._ring_forward = counting
        try:
            yield batch, calls
        finally:
            attention._ring_forward = original


def ring_forwards_per_step(cp: int) -> dict:
    """Per setting: {"forwards": ring forwards in one forward + backward, "loss": ..., "grads": {name: grad}}."""
    out = {}
    with counted_ring(cp) as (batch, calls):
        for name, (granularity, modules, method, n, stock) in SETTINGS.items():
            options = RingOptions(layout="zigzag")
            config = _config(cp, granularity, modules, method, n)
            torch.manual_seed(0)
            if stock:  # the ring spec, then its attention module set back to Megatron's own
                spec = get_gpt_layer_ring_spec(options, normalization="RMSNorm")
                spec.submodules.self_attention.module = SelfAttention
                model = GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                                 position_embedding_type="rope")
                LayoutRotaryEmbedding.convert(model.rotary_pos_emb, "zigzag")
            else:
                model = ring_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, options=options)
            calls.clear()
            loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).sum()
            loss.backward()
            out[name] = {"forwards": len(calls), "loss": loss.item(),
                         "grads": {k: p.grad.clone() for k, p in model.named_parameters()}}
    return out


def whole_layers_and_selective(cp: int) -> dict:
    """The job's GPT (launch.model) with 3 layers, without recompute and with two of auto's plans, "full
    recompute of the first layer, selective (MLP) in the others" and "selective in the first 2 layers" (the
    fields recompute.resolve sets). Per setting: ring
    forwards and each layer's MLP forwards in one forward + backward, describe_selective, loss and gradients."""
    from launch.args import parse_and_check
    from launch.model import build_model
    from launch.train import describe_selective

    flags = ["--ring-attention", "--context-parallel-size", str(cp), "--seq-length", str(SEQ), "--num-layers",
             str(LAYERS), "--hidden-size", "32", "--ffn-hidden-size", "48", "--num-attention-heads", "4",
             "--num-query-groups", "2", "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear",
             "--vocab-size", str(VOCAB), "--recompute-granularity", "none"]
    out = {}
    with counted_ring(cp) as (batch, calls):
        for name, plan in (("none", (None, None, None, 0)), ("whole_1_mlp_rest", ("full", "block", 1, LAYERS - 1)),
                           ("selective_first_2", ("selective", None, None, 2))):
            with mock.patch.dict(os.environ, WORLD_SIZE=str(cp)):  # as the launcher sets it
                args, _ = parse_and_check(flags)
            (args.recompute_granularity, args.recompute_method, args.recompute_num_layers,
             args.recompute_mlp_layers) = plan
            torch.manual_seed(args.seed)  # as the job does before building
            model = build_model(args, VOCAB)
            mlp_calls = [0] * len(model.decoder.layers)
            for i, layer in enumerate(model.decoder.layers):
                layer.mlp.linear_fc1.register_forward_pre_hook(
                    lambda *_, i=i, seen=mlp_calls: seen.__setitem__(i, seen[i] + 1))
            calls.clear()
            loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).sum()
            loss.backward()
            out[name] = {"forwards": len(calls), "mlp_forwards": mlp_calls, "loss": loss.item(),
                         "says": describe_selective(model),
                         "grads": {k: p.grad.clone() for k, p in model.named_parameters()}}
    return out
