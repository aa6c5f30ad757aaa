"""The ``--ring-*`` command-line flags of Megatron-LM, and their validation against Megatron's own flags.

The ring is Megatron's context-parallel group: ``--ring-attention`` shards every sequence of
``--seq-length`` tokens over the ``--context-parallel-size`` ranks of that group (as Megatron's
own context parallelism does) and passes K/V blocks around it. No extra process group is made.
The other flags, with their types, defaults and help, come from ``ring_sp.options.RingOptions``.
"""

from __future__ import annotations

import argparse
import importlib.util

from ring_sp.layout import check_seq_len
from ring_sp.options import DEFAULTS, FLAGS, OPTIONS, RingOptions, add_flags

# Rotary/positional flavours whose per-rank positions this package computes for every layout;
# others (yarn, mrope) use Megatron's own zigzag slicing and so only work with layout zigzag.
LAYOUT_AWARE_POSITIONS = ("rope", "learned_absolute", "none")


def check_ring_size(options: RingOptions, context_parallel_size: int) -> None:
    """The ring is the whole context-parallel group: refuse a different ``ring_size``.

    Sub-rings inside one context-parallel group would need different sequences per sub-ring,
    which Megatron's data loader does not deliver (every context-parallel rank reads the same
    sample); a context-parallel size equal to the ring size gives the same thing, with the rest
    of the ranks as data parallelism.
    """
    if options.ring_size is not None and options.ring_size != context_parallel_size:
        raise ValueError(
            f"--ring-size {options.ring_size} differs from --context-parallel-size {context_parallel_size}: "
            f"the ring is Megatron's context-parallel group, so set --context-parallel-size "
            f"{options.ring_size} (the remaining ranks become data parallel) and drop --ring-size"
        )


def add_ring_attention_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--ring-*`` flags to ``parser`` and return it (a Megatron-LM ``extra_args_provider``)."""
    group = parser.add_argument_group(title="ring attention (ring_sp)")
    group.add_argument(
        "--ring-attention", action="store_true",
        help="Replace the core attention of every GPT layer with exact ring attention. The ring is "
             "the context-parallel group: its size is --context-parallel-size (CP), each rank holds "
             "seq_length/CP tokens of every sequence and K/V blocks travel the ring. Needs "
             "--attention-dropout 0.")
    add_flags(group)
    return parser


def transformer_engine_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def lookback_from_window(window_size) -> int | None:
    """Megatron's causal ``window_size`` (left, right) as a lookback L = left + 1 (None: no window)."""
    if not window_size:
        return None
    left, right = window_size
    if right not in (0, -1):
        raise ValueError(f"window_size={tuple(window_size)}: ring attention is causal, so the right side of "
                         "the window must be 0 (--window-size L-1,0)")
    return None if left < 0 else left + 1


def validate_ring_args(args: argparse.Namespace, context_parallel_size: int) -> None:
    """Raise ValueError (naming the flag and the fix) unless the ``--ring-*`` flags are usable.

    ``context_parallel_size`` is Megatron's ``--context-parallel-size``: the ring size. Other
    Megatron-LM flags are checked when present on ``args`` (``seq_length``, ``attention_dropout``,
    ``position_embedding_type``, ``window_size``, ``transformer_impl``, ...).
    """
    options = RingOptions.from_args(args)
    options.check(FLAGS)
    if not getattr(args, "ring_attention", False):
        changed = [option.flag for name, option in OPTIONS.items()
                   if option.flag and option.ours and getattr(options, name) != getattr(DEFAULTS, name)]
        if changed:
            raise ValueError(f"ring flags {', '.join(changed)} were given without --ring-attention: add "
                             "--ring-attention or drop them")
        return
    if isinstance(context_parallel_size, bool) or not isinstance(context_parallel_size, int) \
            or context_parallel_size < 1:
        raise ValueError(f"--context-parallel-size {context_parallel_size!r}: pass a positive integer (the ring size)")
    check_ring_size(options, context_parallel_size)
    seq_length = getattr(args, "seq_length", None)
    if seq_length is not None:
        try:
            check_seq_len(options.layout, seq_length, context_parallel_size)
        except ValueError as error:
            raise ValueError(f"--seq-length {seq_length}: {error} (--context-parallel-size "
                             f"{context_parallel_size}, --ring-layout {options.layout})") from None
    dropout = getattr(args, "attention_dropout", None)
    if dropout:
        raise ValueError(f"--attention-dropout {dropout}: ring attention has no attention dropout; pass "
                         "--attention-dropout 0")
    position = getattr(args, "position_embedding_type", None)
    if position is not None and position not in LAYOUT_AWARE_POSITIONS and not options.megatron_native:
        raise ValueError(f"--position-embedding-type {position} keeps Megatron's zigzag positions: use "
                         f"--ring-layout zigzag, or one of {', '.join(LAYOUT_AWARE_POSITIONS)}")
    if position == "relative":
        raise ValueError("--position-embedding-type relative (an attention bias) is not supported by ring attention")
    if getattr(args, "multi_latent_attention", False):
        raise ValueError("--multi-latent-attention is not supported by ring attention")
    variant = getattr(args, "experimental_attention_variant", None)
    if variant is not None:
        raise ValueError(f"--experimental-attention-variant {variant} has its own core attention, which ring attention "
                         "would replace: drop one of them")
    if getattr(args, "hybrid_context_parallel", False):
        raise ValueError("--hybrid-context-parallel (per-sample context-parallel groups) is not supported by ring "
                         "attention: drop it")
    if getattr(args, "use_legacy_models", False):
        raise ValueError("--use-legacy-models builds Megatron's legacy GPT, whose attention ring attention does not "
                         "replace: drop --use-legacy-models")
    comm = getattr(args, "cp_comm_type", None)
    comm = [comm] if isinstance(comm, str) else list(comm or [])
    if any(kind != "p2p" for kind in comm):
        raise ValueError(f"--cp-comm-type {' '.join(comm)}: ring attention moves K/V around the context-parallel "
                         "ring itself (point to point); drop --cp-comm-type or pass p2p")
    if getattr(args, "hierarchical_context_parallel_sizes", None):
        raise ValueError("--hierarchical-context-parallel-sizes (for --cp-comm-type a2a+p2p) is not used by ring "
                         "attention, whose ring is the whole context-parallel group: drop it")
    kernel = getattr(args, "attention_backend", None)
    kernel = getattr(kernel, "name", kernel)  # Megatron's AttnBackend enum, or its name
    if kernel not in (None, "auto", "local"):
        raise ValueError(f"--attention-backend {kernel} chooses Transformer Engine's attention kernel, which ring "
                         "attention replaces: drop it, and choose the ring's kernel with --ring-backend")
    window = lookback_from_window(getattr(args, "window_size", None))
    if window is not None and options.max_lookback is not None and window != options.max_lookback:
        raise ValueError(f"--window-size {tuple(args.window_size)} means a lookback of {window} tokens but "
                         f"--ring-max-lookback is {options.max_lookback}: give one of them")
    if getattr(args, "transformer_impl", None) == "transformer_engine" and not transformer_engine_installed():
        raise ValueError("--transformer-impl transformer_engine asks for Transformer Engine layers, which are not "
                         "installed: pass --transformer-impl local, or install transformer_engine")
