"""Jobs for the gloo pool: a GPT with liger-kernel's SwiGLU, RoPE and fused linear cross-entropy against the same
GPT with Megatron's modules (on CPU the Triton kernels run in Triton's interpreter)."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch import RingOptions, get_gpt_layer_ring_spec, ring_gpt_model
from tests.megatron_jobs import VOCAB, megatron_parallel

SEQ = 32


def _config(normalization: str, dtype=torch.float32) -> TransformerConfig:
    return TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
        use_cpu_initialization=True, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, attention_dropout=0.0, hidden_dropout=0.0,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, normalization=normalization, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, init_method_std=0.2)


def _step(model, tokens, labels):
    loss = model(tokens, torch.arange(tokens.shape[1], device=tokens.device)[None], None, labels=labels)
    (loss * torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).view_as(loss)).sum().backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters()}


def liger_matches_plain(normalization: str = "LayerNorm", device: str = "cpu", dtype=torch.float32) -> dict:
    """Plain and liger models from one seed, one forward + backward on the same tokens: which liger modules
    ran, the largest per-token loss difference and, per parameter, the largest gradient difference relative
    to the gradient's largest entry."""
    from megatron_patch.liger import LigerLossGPTModel, LigerSwiGLUMLP, rope_calls, with_liger_kernels

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g).to(device)
    labels = torch.roll(tokens, -1, 1)
    with megatron_parallel(1, 1):
        spec = get_gpt_layer_ring_spec(RingOptions(), normalization=normalization)
        models = []
        for liger in (False, True):
            torch.manual_seed(0)
            config = _config(normalization, dtype)  # one each: with_liger_kernels marks its config's RoPE
            layer = with_liger_kernels(spec, config)[0] if liger else spec
            model = ring_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, options=RingOptions(),
                                   transformer_layer_spec=layer, position_embedding_type="rope"
                                   ).to(device=device, dtype=dtype)
            if liger:
                LigerLossGPTModel.convert(model)
            models.append(model)
        plain_loss, plain_grads = _step(models[0], tokens, labels)
        calls = rope_calls()
        loss, grads = _step(models[1], tokens, labels)
        liger = models[1]
        ran = sorted({type(m).__name__ for m in liger.modules() if "Liger" in type(m).__name__})
        return {"modules": ran, "rope_calls": rope_calls() - calls, "loss_dtype": str(loss.dtype),
                "loss_shape": tuple(loss.shape),
                "loss": (loss.float() - plain_loss.float()).abs().max().item(),
                "grads": {k: ((grads[k].float() - v.float()).abs().max() / v.float().abs().max()).item()
                          for k, v in plain_grads.items()},
                "isinstance_mlp": any(isinstance(m, LigerSwiGLUMLP) for m in liger.modules())}
