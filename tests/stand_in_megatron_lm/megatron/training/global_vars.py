"""Megatron-LM's global arguments, as ``megatron.training.global_vars`` keeps them."""

_GLOBAL_ARGS = None


def set_global_variables(args, build_tokenizer=True):
    global _GLOBAL_ARGS
    if build_tokenizer:  # the NullTokenizer's vocabulary, padded to a multiple of 128 as Megatron-LM does
        args.padded_vocab_size = -(-args.vocab_size // 128) * 128
    _GLOBAL_ARGS = args


def get_args():
    return _GLOBAL_ARGS
