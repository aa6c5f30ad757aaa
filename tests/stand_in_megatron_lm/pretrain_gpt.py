"""Stand-in for Megatron-LM's ``pretrain_gpt.py`` (Megatron-LM cannot be fetched in CI): the shape of its
``__main__`` up to ``pretrain(...)`` as before core 0.18, building megatron-core's GPTModel from the
local layer spec. Two switches make it behave like a troublesome Megatron-LM:
``--stand-in-override-core-attention`` sets the spec's core attention to DotProductAttention (as
0.19's GPTModelBuilder does for ``--attention-backend local``); ``--stand-in-swap-after-build``
replaces every layer's built core attention with a new DotProductAttention (something no hook at
build time can prevent: the guard must catch it).
"""

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.utils import get_batch_on_this_cp_rank
from megatron.training import get_args, pretrain
from megatron.training.arguments import core_transformer_config_from_args


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    args = get_args()
    config = core_transformer_config_from_args(args)
    spec = get_gpt_layer_local_spec()
    if args.stand_in_override_core_attention:
        spec.submodules.self_attention.submodules.core_attention = DotProductAttention
    model = GPTModel(config, spec, vocab_size=args.padded_vocab_size, max_sequence_length=args.seq_length,
                     position_embedding_type=args.position_embedding_type, pre_process=pre_process,
                     post_process=post_process)
    if args.stand_in_swap_after_build:
        for layer in model.decoder.layers:
            attention = layer.self_attention
            attention.core_attention = DotProductAttention(config, attention.layer_number, attention.attn_mask_type,
                                                           "self")
    return model


def forward_step(data_iterator, model):
    batch = get_batch_on_this_cp_rank(next(data_iterator))
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])


if __name__ == "__main__":
    pretrain(None, model_provider, None, forward_step, args_defaults={"tokenizer_type": "NullTokenizer"})
