"""Stand-ins for the Transformer Engine modules of Megatron-core's TE layer spec (Transformer Engine
cannot be installed here), so that ``get_gpt_layer_with_transformer_engine_spec`` and
``get_gpt_decoder_block_spec(use_transformer_engine=True)`` build on CPU.

The spec they give has Transformer Engine's structure: the input layer norm fused into ``linear_qkv``
and ``linear_fc1`` (``TELayerNormColumnParallelLinear``) and ``TEDotProductAttention`` as the core
attention. The stand-in core attention refuses to be built: under ``--ring-attention`` it never is.
"""

from __future__ import annotations

from contextlib import contextmanager

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.torch_norm import WrappedTorchNorm


class StandInLayerNormColumnParallelLinear(ColumnParallelLinear):
    """``TELayerNormColumnParallelLinear``: a layer norm on the input, then the column-parallel linear."""

    def __init__(self, input_size, output_size, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.norm = WrappedTorchNorm(config=config, hidden_size=input_size, eps=config.layernorm_epsilon)

    def forward(self, input_, *args, **kwargs):
        return super().forward(self.norm(input_), *args, **kwargs)


class StandInTEDotProductAttention(MegatronModule):
    """``TEDotProductAttention``: only its name and place in the spec matter; building it is an error."""

    def __init__(self, *args, **kwargs):
        raise AssertionError("the Transformer Engine core attention was built: ring attention did not replace it")


class StandInTESpecProvider(LocalSpecProvider):
    """``TESpecProvider`` with the stand-ins (norms and the MoE experts stay Megatron-core's local ones)."""

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self) -> type:
        return StandInLayerNormColumnParallelLinear

    def core_attention(self) -> type:
        return StandInTEDotProductAttention


STAND_INS = {"TESpecProvider": StandInTESpecProvider, "TENorm": WrappedTorchNorm}


@contextmanager
def te_stand_ins():
    """Megatron-core's TE spec functions use the stand-ins (``TESpecProvider``, ``TENorm``) inside the context."""
    missing = object()
    before = {name: getattr(gpt_layer_specs, name, missing) for name in STAND_INS}
    for name, stand_in in STAND_INS.items():
        setattr(gpt_layer_specs, name, stand_in)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is missing:
                delattr(gpt_layer_specs, name)
            else:
                setattr(gpt_layer_specs, name, value)
