"""``apply()``: make an unmodified Megatron-LM ``pretrain_gpt.py`` honour ``--ring-attention``, or stop it.

Call it before ``pretrain_gpt.py`` runs its imports (``python -m megatron_patch pretrain_gpt.py ...``
does). It replaces a few of Megatron's public names (works with Megatron-LM core_v0.16 to main):

- ``megatron.training.arguments.parse_args`` (and the copy bound in ``megatron.training.initialize``
  before 0.18): adds the ``--ring-*`` flags to Megatron-LM's parser, validates them, records the options.
- ``megatron.core.transformer.attention.Attention.__init__``: with ``--ring-attention``, every
  attention layer builds ``RingCoreAttention`` whatever core attention its layer spec names. This is
  where the core attention is built, after every spec function and model builder has had its say
  (Megatron-LM 0.19's ``GPTModelBuilder`` rewrites the spec's core attention; it cannot undo this).
  Selective recompute (``--recompute-activations``) then leaves the ring core attention alone.
- ``megatron.core.models.gpt.gpt_model.RotaryEmbedding``: RoPE positions follow ``--ring-layout``.
- ``get_batch_on_this_cp_rank`` (``megatron.core.utils``, and ``megatron.training.utils`` before 0.18):
  the data split follows ``--ring-layout`` (Megatron's own for zigzag). THD batches (``cu_seqlens``:
  SFT packing, ``--dataloader-inter-document-masking``) are split as one stream with the layout
  (``megatron_patch.packed``), also through ``get_thd_batch_on_this_cp_rank`` (0.16–0.17), and
  ``megatron.core.transformer.attention.apply_rotary_pos_emb`` rotates their tokens by in-document
  position (``megatron_patch.packed_rope``).
- ``megatron.training.training.setup_model_and_optimizer`` and ``train_step``: the guard
  (``megatron_patch.guard``) checks the built model, and after the first step RoPE and the data split;
  if ``--ring-attention`` did not take effect (or ring attention is there without it), every rank raises.

Without ``--ring-attention`` every replaced name behaves as Megatron's own (and the guard only
refuses ring modules).
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect

import torch.distributed as dist

from megatron_patch import defaults, guard, packed_rope
from megatron_patch.batch import shard_batch
from megatron_patch.core_attention import keep_out_of_recompute
from megatron_patch.documents import boundaries_from_eod, document_mask
from megatron_patch.groups import context_parallel_group
from megatron_patch.options import RingOptions, add_ring_attention_args, validate_ring_args
from megatron_patch.packed import is_packed
from megatron_patch.rope import LayoutRotaryEmbedding
from megatron_patch.spec import ring_core_attention_spec

_ORIGINALS: dict[tuple[str, str], object] = {}
_MISSING: dict[str, str] = {}  # required name -> why it could not be replaced


def _owner(path: str):
    """The module, or class inside a module, named by a dotted ``path``; raises ImportError / AttributeError."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            owner = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name == name and cut > 1:
                continue  # a class inside the module above (or a module this version lacks)
            raise
        for attr in parts[cut:]:
            owner = getattr(owner, attr)
        return owner
    raise AssertionError(path)  # unreachable: the loop returns or raises


def _replace(path: str, attr: str, make) -> str:
    """Set ``owner.attr = make(original)`` once. Returns "replaced", "absent" (the package is not
    installed, e.g. megatron.training with megatron-core alone) or why it failed."""
    try:
        owner = _owner(path)
    except ModuleNotFoundError as error:
        if error.name is not None and path.startswith(error.name):
            return "absent"
        return f"importing {path} failed: {error}"
    except (ImportError, AttributeError) as error:
        return f"importing {path} failed: {error}"
    original = getattr(owner, attr, None)
    if original is None:
        return f"{path} has no {attr}"
    if (path, attr) not in _ORIGINALS and not getattr(original, "_megatron_patch", False):
        _ORIGINALS[(path, attr)] = original
        replacement = make(original)
        replacement._megatron_patch = True
        setattr(owner, attr, replacement)
    return "replaced"


def configure(args) -> RingOptions | None:
    """Validate parsed Megatron-LM ``args`` and record their ring options (None without ``--ring-attention``)."""
    validate_ring_args(args, getattr(args, "context_parallel_size", 1))
    options = RingOptions.from_args(args) if getattr(args, "ring_attention", False) else None
    if options is not None and defaults.applied() and _MISSING:
        raise guard.RingAttentionNotApplied(
            f"megatron_patch: --ring-attention cannot be guaranteed with this Megatron-LM ({guard.megatron_version()}):"
            "\n  - " + "\n  - ".join(f"{name}: {why}" for name, why in _MISSING.items())
            + "\nUse a Megatron-LM version that `python -m megatron_patch check PATH` passes "
            f"(tested: {guard.TESTED}) or report this one.")
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


def _wrap_attention_init(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        options = defaults.megatron_lm_options()
        if options is None:
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        submodules = copy.copy(bound.arguments["submodules"])
        if hasattr(submodules, "linear_kv_down_proj"):
            raise ValueError("multi-latent attention (MLA) is not supported by ring attention: drop "
                             "--multi-latent-attention or --ring-attention")
        submodules.core_attention = ring_core_attention_spec(options)
        bound.arguments["submodules"] = submodules
        original(*bound.args, **bound.kwargs)
        keep_out_of_recompute(self)  # --recompute-activations would run the ring again in backward

    return __init__


def _arguments(signature: inspect.Signature, *args, **kwargs) -> dict:
    """The call's arguments by name (empty if they do not fit the signature: the original will say why)."""
    try:
        return signature.bind(*args, **kwargs).arguments
    except TypeError:
        return {}


def _wrap_batch_split(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def get_batch_on_this_cp_rank(batch, *args, **kwargs):
        options = defaults.megatron_lm_options()
        if options is None:
            return original(batch, *args, **kwargs)
        guard.mark_data_split()
        if _arguments(signature, batch, *args, **kwargs).get("is_hybrid_cp"):
            raise ValueError("hybrid context parallelism (--hybrid-context-parallel: per-sample context-parallel "
                             "groups) is not supported by ring attention: drop it")
        group = kwargs.get("cp_group")
        if group is None:
            group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
        if is_packed(batch):  # THD: the ring's split of the stream at every layout (Megatron's cuts each document)
            batch.update(shard_batch(batch, options.layout, group))
            return batch
        mask = None
        if options.documents:  # from the whole sequences, before the split; replaces Megatron's dense mask
            tokens = batch["tokens"]
            mask = document_mask(boundaries_from_eod(tokens, _eod_token()), *tokens.shape)
            batch["attention_mask"] = None
        if options.megatron_native:  # Megatron's own split
            batch = original(batch, *args, **kwargs)
        else:
            batch.update(shard_batch(batch, options.layout, group))
        if mask is not None:
            batch["attention_mask"] = mask
        return batch

    return get_batch_on_this_cp_rank


def _wrap_thd_split(original):
    """Megatron-LM 0.16–0.17's ``get_thd_batch_on_this_cp_rank(batch, cu_seqlens, cu_seqlens_padded, max_seqlen,
    cp_size=None, cp_rank=None) -> (batch, packed_seq_params)``: Megatron's PackedSeqParams, the ring's split."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def get_thd_batch_on_this_cp_rank(batch, cu_seqlens, cu_seqlens_padded, max_seqlen, *args, **kwargs):
        options = defaults.megatron_lm_options()
        if options is None:
            return original(batch, cu_seqlens, cu_seqlens_padded, max_seqlen, *args, **kwargs)
        guard.mark_data_split()
        given = _arguments(signature, batch, cu_seqlens, cu_seqlens_padded, max_seqlen, *args, **kwargs)
        group = context_parallel_group(required=False)
        size = 1 if group is None else dist.get_world_size(group)
        if given.get("cp_size") not in (None, size):
            raise ValueError(f"get_thd_batch_on_this_cp_rank(cp_size={given['cp_size']}) but the context-parallel "
                             f"group (the ring) has {size} ranks: ring attention splits over that group")
        whole, params = original(batch, cu_seqlens, cu_seqlens_padded, max_seqlen, cp_size=1, cp_rank=0)  # uncut
        local = shard_batch(dict(whole, cu_seqlens=cu_seqlens, cu_seqlens_padded=cu_seqlens_padded),
                            options.layout, group)
        whole.update((key, local[key]) for key in whole)
        return whole, params

    return get_thd_batch_on_this_cp_rank


def _eod_token() -> int:
    """The end-of-document token id of Megatron-LM's tokenizer (what --reset-attention-mask splits on)."""
    try:
        from megatron.training import get_tokenizer
    except ImportError:
        raise ValueError("--reset-attention-mask with ring attention needs Megatron-LM's tokenizer "
                         "(megatron.training) to find document ends") from None
    return get_tokenizer().eod


def _print_rank_0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"megatron_patch: {message}", flush=True)


def _wrap_setup_model_and_optimizer(original):
    @functools.wraps(original)
    def setup_model_and_optimizer(*args, **kwargs):
        result = original(*args, **kwargs)
        _print_rank_0("guard passed after the model was built: "
                      + guard.check_model(result[0], defaults.megatron_lm_options() is not None))
        return result

    return setup_model_and_optimizer


def _wrap_train_step(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def train_step(*args, **kwargs):
        result = original(*args, **kwargs)
        if defaults.megatron_lm_options() is not None and not guard.first_step_checked():
            from megatron.core import parallel_state

            model = signature.bind(*args, **kwargs).arguments["model"]
            _print_rank_0("guard passed after the first step: "
                          + guard.check_first_step(model, parallel_state.get_context_parallel_world_size()))
        return result

    return train_step


# (owner, attribute, wrapper, required): a required name that exists in no form refuses --ring-attention.
_TARGETS = [
    ("megatron.training.arguments", "parse_args", _wrap_parse_args, True),
    ("megatron.training.initialize", "parse_args", _wrap_parse_args, False),  # bound there before 0.18
    ("megatron.core.transformer.attention.Attention", "__init__", _wrap_attention_init, True),
    ("megatron.core.models.gpt.gpt_model", "RotaryEmbedding", lambda original: LayoutRotaryEmbedding, True),
    ("megatron.core.utils", "get_batch_on_this_cp_rank", _wrap_batch_split, True),
    ("megatron.training.utils", "get_batch_on_this_cp_rank", _wrap_batch_split, False),  # before 0.18
    ("megatron.core.utils", "get_thd_batch_on_this_cp_rank", _wrap_thd_split, False),  # 0.16-0.17's THD split
    # THD RoPE; also installed by every ring core attention (megatron-core users); the guard catches its absence
    ("megatron.core.transformer.attention", "apply_rotary_pos_emb", packed_rope.wrap, False),
    ("megatron.training.training", "setup_model_and_optimizer", _wrap_setup_model_and_optimizer, True),
    ("megatron.training.training", "train_step", _wrap_train_step, True),
]


def apply() -> list[str]:
    """Install the replacements described in the module docstring; returns the names replaced.

    Idempotent. Works with megatron-core alone (then the ``megatron.training`` names are absent and
    skipped). A required name that exists but cannot be replaced makes ``--ring-attention`` refuse.
    """
    done = []
    _MISSING.clear()
    guard.reset()  # the guard judges what runs from here on
    for path, attr, make, required in _TARGETS:
        outcome = _replace(path, attr, make)
        if outcome == "replaced":
            done.append(f"{path}.{attr}")
        elif required and outcome != "absent":
            _MISSING[f"{path}.{attr}"] = outcome
    defaults.mark_applied(True)
    return done


def missing() -> dict[str, str]:
    """Required names that the last ``apply()`` could not replace, with the reason."""
    return dict(_MISSING)


def restore() -> None:
    """Undo ``apply()``: put Megatron's own names back and forget the recorded options."""
    for (path, attr), original in _ORIGINALS.items():
        setattr(_owner(path), attr, original)
    _ORIGINALS.clear()
    _MISSING.clear()
    guard.reset()
    defaults.record(None)
    defaults.mark_applied(False)
