"""liger-kernel's Triton kernels in Megatron-core's GPT (``--fused-kernels liger``).

- ``with_liger_kernels(spec, config)``: a copy of a GPT layer spec whose two norms are liger's RMSNorm
  (``liger_kernel.megatron.LigerMegatronRMSNorm``, Megatron's norm interface; RMSNorm models only) and
  whose MLP is :class:`LigerSwiGLUMLP` (gated SiLU without biases: one kernel for silu(gate) · up that
  keeps only its input for backward). Returns the spec and the names of what it swapped.
- :meth:`LigerLossGPTModel.convert`: the training loss (``labels`` given) through liger's fused linear
  cross-entropy, which never holds the whole (tokens × vocab) logits; tensor parallel 1 only (the output
  layer's weight must be whole on the rank).
- RoPE stays Megatron's, on the per-layout table of ``LayoutRotaryEmbedding``: Megatron-core applies it
  through a module-level function, once for q and once for k, which no layer spec can swap (its only
  fused switch, ``apply_rope_fusion``, is Transformer Engine's), and liger's RoPE kernel rotates q and k
  together. It is a few elementwise passes per layer, under 1% of a long-context step.

The final norm of the block stays Megatron's (one norm per model).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.mlp import MLP
from torch import Tensor

KERNELS = ("rms_norm", "swiglu", "cross_entropy")


def _ops():
    import liger_kernel.ops as ops  # imported on first use: it loads Triton and every liger kernel

    return ops


class LigerSwiGLUMLP(MLP):
    """Megatron's MLP with liger's fused SwiGLU between fc1 and fc2 (gated SiLU, no bias, no clamp).

    fc1's output holds gate and up side by side on its last dim, [seq, batch, 2 · ffn / tp], as
    Megatron's own ``glu`` splits it; other calls (per-token scales of MoE experts) take Megatron's path."""

    def forward(self, hidden_states: Tensor, per_token_scale: Tensor | None = None, **kwargs):
        if per_token_scale is not None:
            return super().forward(hidden_states, per_token_scale, **kwargs)
        x, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            raise ValueError("LigerSwiGLUMLP: fc1 has a bias, which liger's SwiGLU kernel does not add: use "
                             "--disable-bias-linear or --fused-kernels none")
        shape = x.shape
        x = _ops().LigerFusedGateUpSiLUMulFunction.apply(x.reshape(-1, shape[-1]), False)
        return self.linear_fc2(x.view(*shape[:-1], shape[-1] // 2))


def swiglu_applies(config) -> bool:
    """Whether ``config``'s MLP is what ``LigerSwiGLUMLP`` computes."""
    return (config.gated_linear_unit and config.activation_func is F.silu and not config.add_bias_linear
            and getattr(config, "activation_func_clamp_value", None) is None
            and not getattr(config, "glu_linear_offset", 0.0) and not config.bias_activation_fusion
            and not getattr(config, "use_te_activation_func", False))


def with_liger_kernels(spec, config) -> tuple[object, list[str]]:
    """A copy of GPT layer ``spec`` with liger's RMSNorm and SwiGLU where ``config`` allows; (spec, swapped)."""
    from liger_kernel.megatron import LigerMegatronRMSNorm

    spec = copy.deepcopy(spec)
    sub = spec.submodules
    swapped = []
    if config.normalization == "RMSNorm":
        sub.input_layernorm = LigerMegatronRMSNorm
        sub.pre_mlp_layernorm = LigerMegatronRMSNorm
        swapped.append("rms_norm")
    if swiglu_applies(config) and getattr(sub.mlp, "module", None) is MLP:
        sub.mlp.module = LigerSwiGLUMLP
        swapped.append("swiglu")
    return spec, swapped


def fused_loss_applies(model: GPTModel) -> bool:
    """Whether the output layer's weight is whole on this rank (no tensor parallelism, no MTP)."""
    return (model.config.tensor_model_parallel_size == 1 and not getattr(model.config, "mtp_num_layers", None)
            and model.post_process)


class LigerLossGPTModel(GPTModel):
    """A GPTModel whose training loss is liger's fused linear cross-entropy (same per-token loss [b, s])."""

    @classmethod
    def convert(cls, model: GPTModel) -> LigerLossGPTModel:
        """Turn ``model`` into this class in place (its modules and weights are untouched)."""
        if not fused_loss_applies(model):
            raise ValueError("the fused linear cross-entropy needs the whole output layer on the rank: tensor "
                             "parallel size 1, no multi-token prediction")
        model.__class__ = cls
        return model

    def _postprocess(self, hidden_states: Tensor, **kwargs) -> Tensor:
        labels = kwargs.get("labels")
        if labels is None or kwargs.get("mtp_in_postprocess") or kwargs.get("inference_context") is not None:
            return super()._postprocess(hidden_states=hidden_states, **kwargs)
        weight = (self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights
                  else self.output_layer.weight)
        s, b, h = hidden_states.shape
        loss = _ops().LigerFusedLinearCrossEntropyFunction.apply(
            hidden_states.reshape(s * b, h), weight, labels.transpose(0, 1).reshape(s * b),
            None, None, -100, 0.0, 0.0, "none", None, False, torch.float32)[0]
        return loss.view(s, b).transpose(0, 1).float()  # [b, s], as Megatron's compute_language_model_loss
