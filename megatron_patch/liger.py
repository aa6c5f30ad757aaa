"""liger-kernel's Triton kernels in Megatron-core's GPT (``--fused-kernels liger``).

- ``with_liger_kernels(spec, config)``: a copy of a GPT layer spec whose two norms are liger's RMSNorm
  (``liger_kernel.megatron.LigerMegatronRMSNorm``, Megatron's norm interface; RMSNorm models only) and
  whose MLP is :class:`LigerSwiGLUMLP` (gated SiLU without biases: one kernel for silu(gate) · up that
  keeps only its input for backward). Returns the spec and the names of what it swapped.
- :meth:`LigerLossGPTModel.convert`: the training loss (``labels`` given) through liger's fused linear
  cross-entropy, which never holds the whole (tokens × vocab) logits; tensor parallel 1 only (the output
  layer's weight must be whole on the rank).
- RoPE through liger's Triton kernel (:class:`LigerRoPE`: one pass forward, one copy and one pass backward,
  where Megatron's own path makes about six elementwise passes each way and rounds to bf16 four times).
  Megatron-core applies RoPE through the module-level ``apply_rotary_pos_emb`` of
  ``megatron.core.transformer.attention``, once for q and once for k, which no layer spec can swap:
  ``with_liger_kernels`` marks the config and wraps that name (:func:`install_rope`); calls with a marked
  config go to the kernel, every other call to the function it wrapped.

The final norm of the block stays Megatron's (one norm per model).
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import weakref

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.mlp import MLP
from torch import Tensor

KERNELS = ("rms_norm", "swiglu", "rope", "cross_entropy")
ATTENTION = "megatron.core.transformer.attention"  # where Megatron-core's layers look up apply_rotary_pos_emb


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
    """A copy of GPT layer ``spec`` with liger's RMSNorm and SwiGLU where ``config`` allows; (spec, swapped).
    Also marks ``config`` for liger's RoPE where it applies (:func:`use_liger_rope`)."""
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
    if rope_applies(config):
        use_liger_rope(config)
        swapped.append("rope")
    return spec, swapped


def rope_applies(config) -> bool:
    """Whether ``config``'s rotation is what :class:`LigerRoPE` computes (halves rotated, not interleaved pairs)
    and this megatron-core's attention looks up ``apply_rotary_pos_emb`` by module-level name (the one we wrap)."""
    return (not config.rotary_interleaved and not config.multi_latent_attention
            and hasattr(importlib.import_module(ATTENTION), "apply_rotary_pos_emb"))


def use_liger_rope(config) -> None:
    """Rotate q and k of every layer built with ``config`` by liger's kernel (marks ``config``)."""
    if not rope_applies(config):
        raise ValueError("liger's RoPE rotates halves of each head through megatron.core.transformer.attention's "
                         "apply_rotary_pos_emb: rotary_interleaved, multi-latent attention or a megatron-core without "
                         "that name keep Megatron's RoPE")
    config.liger_rope = True
    install_rope()


def rope_marked(config) -> bool:
    """Whether ``config``'s RoPE runs through liger's kernel (``with_liger_kernels`` marked it)."""
    return getattr(config, "liger_rope", False)


_TABLE: list = [None]  # (weakref to the last freqs table, its version, mscale, cos, sin): one table a step


def cos_sin(freqs: Tensor, mscale: float) -> tuple[Tensor, Tensor]:
    """cos and sin of Megatron's table ``freqs`` [s, 1, 1, d] times ``mscale``: float32 [s, d] each, computed
    once for every layer that rotates by the same table (Megatron's own path computes them in every call)."""
    last = _TABLE[0]
    if last is not None and last[0]() is freqs and last[1] == freqs._version and last[2] == mscale:
        return last[3], last[4]
    angles = freqs.reshape(freqs.shape[0], freqs.shape[-1]).float()
    cos, sin = torch.cos(angles) * mscale, torch.sin(angles) * mscale
    _TABLE[0] = (weakref.ref(freqs), freqs._version, mscale, cos, sin)
    return cos, sin


class LigerRoPE(torch.autograd.Function):
    """``t`` [s, b, h, d] rotated as Megatron's ``_apply_rotary_pos_emb_bshd`` rotates it (halves, full head),
    by float32 ``cos`` and ``sin`` [s, d], through liger's kernel (float32 arithmetic, one rounding).

    The kernel rotates in place: ``t`` itself when it is a contiguous intermediate result of its own (marked
    dirty for autograd; Megatron's query), else a contiguous copy (views such as Megatron's key, leaves, tensors
    made under no_grad). It takes q and k together, as [1, b·h, s, d] and a one-head scratch k
    (what Megatron passes is one of them at a time). Backward rotates a copy of the gradient back."""

    @staticmethod
    def forward(ctx, t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        own = t.is_contiguous() and t._base is None and t.grad_fn is not None  # an autograd result, not a view
        x = t if own else t.clone(memory_format=torch.contiguous_format)
        _rotate(x, cos, sin, backward=False)
        if own:
            ctx.mark_dirty(t)
        ctx.save_for_backward(cos, sin)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        g = grad.clone(memory_format=torch.contiguous_format)  # the incoming gradient may be read elsewhere
        _rotate(g, cos, sin, backward=True)
        return g, None, None


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> None:
    """Rotate contiguous ``x`` [s, b, h, d] in place (by -angle when ``backward``)."""
    from liger_kernel.ops.rope import rope_backward, rope_forward

    s, b, h, d = x.shape
    q = x.view(1, s, b * h, d).transpose(1, 2)  # liger's [batch, heads, seq, dim] view of the same memory
    k = x.new_empty(1, s, 1, d).transpose(1, 2)
    (rope_backward if backward else rope_forward)(q, k, cos, sin)


def _rope_call(original):
    """``apply_rotary_pos_emb`` that sends calls with a marked config to :class:`LigerRoPE`."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(*args, **kwargs):
        config = kwargs.get("config", args[2] if len(args) > 2 else None)
        if config is None or not rope_marked(config):
            return original(*args, **kwargs)
        bound = _signature(original).bind(*args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        if given.get("cu_seqlens") is not None:  # THD packed: Megatron's per-document path (or packed_rope's)
            return original(*args, **kwargs)
        t, freqs = given["t"], given["freqs"]
        if t.dim() != 4 or tuple(freqs.shape) != (t.shape[0], 1, 1, t.shape[-1]):
            raise ValueError(f"liger's RoPE rotates t [seq, batch, heads, dim] by a table [seq, 1, 1, dim] of the "
                             f"whole head; got t {tuple(t.shape)} and freqs {tuple(freqs.shape)} (partial or "
                             "per-sample rotary tables): use --fused-kernels none")
        _ROPE_CALLS[0] += 1
        return LigerRoPE.apply(t, *cos_sin(freqs, float(given.get("mscale", 1.0))))

    apply_rotary_pos_emb._liger_rope = True
    return apply_rotary_pos_emb


_ROPE_CALLS = [0]  # calls that went through LigerRoPE, for checks that it ran


@functools.cache
def _signature(function) -> inspect.Signature:
    return inspect.signature(function)


def install_rope() -> None:
    """Wrap ``apply_rotary_pos_emb`` of ``megatron.core.transformer.attention`` with :func:`_rope_call` (once)."""
    attention = importlib.import_module(ATTENTION)
    if not getattr(attention.apply_rotary_pos_emb, "_liger_rope", False):  # functools.wraps passes it outwards
        attention.apply_rotary_pos_emb = _rope_call(attention.apply_rotary_pos_emb)


def rope_calls() -> int:
    """How many rotations liger's RoPE kernel has made in this process."""
    return _ROPE_CALLS[0]


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
