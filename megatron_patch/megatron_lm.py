"""``apply()``: make an unmodified Megatron-LM ``pretrain_gpt.py`` honour ``--ring-attention``.

Call it before ``pretrain_gpt.py`` runs its imports (``python -m megatron_patch pretrain_gpt.py ...``
does). It replaces, by module attribute, the few Megatron functions that the script looks up:

- ``megatron.training.arguments.parse_args`` (and the copy bound in ``megatron.training.initialize``):
  adds the ``--ring-*`` flags to Megatron-LM's parser, validates them, records the options.
- ``gpt_layer_specs.get_gpt_layer_local_spec`` / ``get_gpt_layer_with_transformer_engine_spec``:
  with ``--ring-attention``, the returned layer spec gets the ring core attention.
- ``gpt_model.RotaryEmbedding``: RoPE positions follow ``--ring-layout`` (Megatron's own otherwise).
- ``get_batch_on_this_cp_rank`` (``megatron.core.utils`` and ``megatron.training.utils``): the data
  split follows ``--ring-layout`` (Megatron's own for zigzag or without ``--ring-attention``).

Without ``--ring-attention`` every replaced function behaves as Megatron's own.
"""

from __future__ import annotations

import functools
import importlib

import torch.distributed as dist

from megatron_patch import defaults
from megatron_patch.batch import shard_batch
from megatron_patch.documents import boundaries_from_eod, document_mask
from megatron_patch.options import RingOptions, add_ring_attention_args, validate_ring_args
from megatron_patch.rope import LayoutRotaryEmbedding
from megatron_patch.spec import with_ring_core_attention

_ORIGINALS: dict[tuple[str, str], object] = {}


def _replace(module_name: str, attr: str, make) -> bool:
    """Set ``module.attr = make(original)`` once; False if the module or attribute does not exist."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    if not hasattr(module, attr):
        return False
    original = getattr(module, attr)
    if (module_name, attr) in _ORIGINALS or getattr(original, "_megatron_patch", False):
        return True  # done already (maybe bound here from a module replaced before)
    _ORIGINALS[(module_name, attr)] = original
    replacement = make(original)
    replacement._megatron_patch = True
    setattr(module, attr, replacement)
    return True


def configure(args) -> RingOptions | None:
    """Validate parsed Megatron-LM ``args`` and record their ring options (None without ``--ring-attention``)."""
    validate_ring_args(args, getattr(args, "context_parallel_size", 1))
    options = RingOptions.from_args(args) if getattr(args, "ring_attention", False) else None
    defaults.record(options)
    return options


def _wrap_parse_args(original):
    @functools.wraps(original)
    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        def provider(parser):
            if extra_args_provider is not None:
                parser = extra_args_provider(parser)
            if "--ring-attention" not in parser._option_string_actions:
                parser = add_ring_attention_args(parser)
            return parser

        args = original(provider, ignore_unknown_args)
        configure(args)
        return args

    return parse_args


def _wrap_layer_spec(original):
    @functools.wraps(original)
    def get_layer_spec(*args, **kwargs):
        spec = original(*args, **kwargs)
        options = defaults.megatron_lm_options()
        return spec if options is None else with_ring_core_attention(spec, options)

    return get_layer_spec


def _wrap_batch_split(original):
    @functools.wraps(original)
    def get_batch_on_this_cp_rank(batch, *args, **kwargs):
        options = defaults.megatron_lm_options()
        if options is None:
            return original(batch, *args, **kwargs)
        mask = None
        if options.documents:  # from the whole sequences, before the split; replaces Megatron's dense mask
            tokens = batch["tokens"]
            mask = document_mask(boundaries_from_eod(tokens, _eod_token()), *tokens.shape)
            batch["attention_mask"] = None
        if options.layout == "zigzag":  # Megatron's own split is the zigzag layout
            batch = original(batch, *args, **kwargs)
        else:
            group = kwargs.get("cp_group")
            if group is None:
                group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
            batch.update(shard_batch(batch, options.layout, group))
        if mask is not None:
            batch["attention_mask"] = mask
        return batch

    return get_batch_on_this_cp_rank


def _eod_token() -> int:
    """The end-of-document token id of Megatron-LM's tokenizer (what --reset-attention-mask splits on)."""
    try:
        from megatron.training import get_tokenizer
    except ImportError:
        raise ValueError("--reset-attention-mask with ring attention needs Megatron-LM's tokenizer "
                         "(megatron.training) to find document ends") from None
    return get_tokenizer().eod


def apply() -> list[str]:
    """Install the replacements described in the module docstring; returns what was replaced.

    Idempotent. Works with megatron-core alone (then only the core functions are replaced; the
    ``megatron.training`` ones are skipped).
    """
    done = []
    targets = [
        ("megatron.training.arguments", "parse_args", _wrap_parse_args),
        ("megatron.training.initialize", "parse_args", _wrap_parse_args),
        ("megatron.core.models.gpt.gpt_layer_specs", "get_gpt_layer_local_spec", _wrap_layer_spec),
        ("megatron.core.models.gpt.gpt_layer_specs", "get_gpt_layer_with_transformer_engine_spec", _wrap_layer_spec),
        ("megatron.core.models.gpt.gpt_model", "RotaryEmbedding", lambda original: LayoutRotaryEmbedding),
        ("megatron.core.utils", "get_batch_on_this_cp_rank", _wrap_batch_split),
        ("megatron.training.utils", "get_batch_on_this_cp_rank", _wrap_batch_split),
    ]
    for module_name, attr, make in targets:
        if _replace(module_name, attr, make):
            done.append(f"{module_name}.{attr}")
    defaults.mark_applied(True)
    return done


def restore() -> None:
    """Undo ``apply()``: put Megatron's own functions back and forget the recorded options."""
    for (module_name, attr), original in _ORIGINALS.items():
        setattr(importlib.import_module(module_name), attr, original)
    _ORIGINALS.clear()
    defaults.record(None)
    defaults.mark_applied(False)
