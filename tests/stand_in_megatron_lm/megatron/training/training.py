"""Megatron-LM's training loop entry points, with their signatures (core 0.16); none of them runs here."""


def pretrain(train_valid_test_dataset_provider, model_provider, model_type, forward_step_func,
             process_non_loss_data_func=None, extra_args_provider=None, args_defaults={},  # noqa: B006
             get_embedding_ranks=None, get_position_embedding_ranks=None, non_loss_data_func=None, store=None,
             inprocess_call_wrapper=None):
    raise RuntimeError("the stand-in Megatron-LM cannot train (Megatron-LM's pretrain needs CUDA)")


def setup_model_and_optimizer(model_type, model_provider_func, *args, **kwargs):
    raise RuntimeError("the stand-in Megatron-LM cannot train")


def train_step(forward_step_func, data_iterator, model, optimizer, opt_param_scheduler, config,
               forward_backward_func, iteration=None):
    raise RuntimeError("the stand-in Megatron-LM cannot train")
