"""Stand-in for Megatron-LM's ``megatron.training`` (see ``../../pretrain_gpt.py``); ``megatron.core`` is
megatron-core's (``megatron`` is a namespace package in its wheel)."""

from .global_vars import get_args
from .training import pretrain

__all__ = ["get_args", "pretrain"]
