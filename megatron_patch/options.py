"""Ring-attention options, the ``--ring-*`` command-line flags, and their validation.

The ring is Megatron's context-parallel group: ``--ring-attention`` shards every sequence of
``--seq-length`` tokens over the ``--context-parallel-size`` ranks of that group (as Megatron's
own context parallelism does) and passes K/V blocks around it. No extra process group is made.
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass, fields

from ring_sp import kernels
from ring_sp.layout import LAYOUTS, check_seq_len, get_layout

# Rotary/positional flavours whose per-rank positions this package computes for every layout;
# others (yarn, mrope) use Megatron's own zigzag slicing and so only work with layout zigzag.
LAYOUT_AWARE_POSITIONS = ("rope", "learned_absolute", "none")


@dataclass(frozen=True)
class RingOptions:
    """How the ring core attention runs; every rank of a context-parallel group must agree.

    layout: how a sequence is sharded over the ring (``zigzag``: Megatron's own split).
    backend: block kernel (``ring_sp.kernels.names()`` or ``auto``).
    max_lookback: sliding window in tokens (key t visible to query p iff 0 <= p - t < L), or None.
    reduce_col: False attends to this rank's own K/V only (local attention).
    bucket_size: tile length of the ``torch`` backend.
    ring_size: None or the context-parallel size (sub-rings are refused, see ``check_ring_size``).
    documents: every batch carries document boundaries (Megatron-LM's ``--reset-attention-mask``); a
    batch without them is refused instead of attending across documents.
    """

    layout: str = "zigzag"
    backend: str = "auto"
    max_lookback: int | None = None
    reduce_col: bool = True
    bucket_size: int | None = None
    ring_size: int | None = None
    documents: bool = False

    def check(self) -> None:
        """Raise ValueError naming the flag if a field is malformed."""
        if self.layout not in LAYOUTS:
            raise ValueError(f"--ring-layout {self.layout!r} is unknown: use one of {', '.join(LAYOUTS)}")
        if not isinstance(self.backend, str) or (self.backend != "auto" and self.backend not in kernels.names()):
            raise ValueError(f"--ring-backend {self.backend!r} is unknown: use auto or one of "
                             f"{', '.join(kernels.names())}")
        for flag, value in (("--ring-max-lookback", self.max_lookback), ("--ring-bucket-size", self.bucket_size),
                            ("--ring-size", self.ring_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{flag} {value!r}: pass a positive integer or leave it out")
        if not isinstance(self.reduce_col, bool):
            raise ValueError(f"reduce_col={self.reduce_col!r}: pass True or False (--no-ring-reduce-col)")

    @property
    def megatron_native(self) -> bool:
        """Whether the layout is Megatron's own context-parallel split (its data split and RoPE need no help)."""
        return get_layout(self.layout).megatron_native

    def check_ring_size(self, context_parallel_size: int) -> None:
        """The ring is the whole context-parallel group: refuse a different ``ring_size``.

        Sub-rings inside one context-parallel group would need different sequences per sub-ring,
        which Megatron's data loader does not deliver (every context-parallel rank reads the same
        sample); a context-parallel size equal to the ring size gives the same thing, with the rest
        of the ranks as data parallelism.
        """
        if self.ring_size is not None and self.ring_size != context_parallel_size:
            raise ValueError(
                f"--ring-size {self.ring_size} differs from --context-parallel-size {context_parallel_size}: "
                f"the ring is Megatron's context-parallel group, so set --context-parallel-size "
                f"{self.ring_size} (the remaining ranks become data parallel) and drop --ring-size"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RingOptions:
        """Options from parsed ``--ring-*`` flags (missing flags take their defaults)."""
        default = cls()
        return cls(
            layout=getattr(args, "ring_layout", default.layout),
            backend=getattr(args, "ring_backend", default.backend),
            max_lookback=getattr(args, "ring_max_lookback", default.max_lookback),
            reduce_col=getattr(args, "ring_reduce_col", default.reduce_col),
            bucket_size=getattr(args, "ring_bucket_size", default.bucket_size),
            ring_size=getattr(args, "ring_size", default.ring_size),
            documents=bool(getattr(args, "reset_attention_mask", False)),
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
    group.add_argument(
        "--ring-layout", choices=LAYOUTS, default="zigzag",
        help="How each sequence is sharded over the ring: zigzag (default; Megatron's own context-parallel "
             "split, 2*CP chunks, rank r holds chunks r and 2CP-1-r), striped (token t on rank t mod CP) or "
             "contiguous (rank r holds [r*S/CP, (r+1)*S/CP)). The data split and RoPE positions follow it.")
    group.add_argument(
        "--ring-backend", default="auto",
        help="Block kernel: auto or one of ring_sp.kernels.names() (e.g. torch, triton).")
    group.add_argument(
        "--ring-max-lookback", type=int, default=None, metavar="L",
        help="Sliding window on every layer: token p attends to keys t with 0 <= p - t < L; ring passes beyond "
             "the window are skipped. Megatron's --window-size L-1,0 is honoured too (per layer, with "
             "--window-attn-skip-freq); given both, they must agree.")
    group.add_argument(
        "--no-ring-reduce-col", dest="ring_reduce_col", action="store_false",
        help="Attend only to the keys this rank holds (local attention; changes the model).")
    group.add_argument(
        "--ring-bucket-size", type=int, default=None,
        help="Tile length of the torch block backend (bounds the scores materialised at once).")
    group.add_argument(
        "--ring-size", type=int, default=None,
        help="Optional; must equal --context-parallel-size (sub-rings inside a context-parallel group "
             "are not supported: lower --context-parallel-size instead).")
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
    options.check()
    if not getattr(args, "ring_attention", False):
        changed = [f.name for f in fields(RingOptions)
                   if f.name != "documents" and getattr(options, f.name) != getattr(RingOptions(), f.name)]
        if changed:
            raise ValueError(f"ring options {', '.join(changed)} were given without --ring-attention: add "
                             "--ring-attention or drop them")
        return
    if isinstance(context_parallel_size, bool) or not isinstance(context_parallel_size, int) \
            or context_parallel_size < 1:
        raise ValueError(f"--context-parallel-size {context_parallel_size!r}: pass a positive integer (the ring size)")
    options.check_ring_size(context_parallel_size)
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
    window = lookback_from_window(getattr(args, "window_size", None))
    if window is not None and options.max_lookback is not None and window != options.max_lookback:
        raise ValueError(f"--window-size {tuple(args.window_size)} means a lookback of {window} tokens but "
                         f"--ring-max-lookback is {options.max_lookback}: give one of them")
    if getattr(args, "transformer_impl", None) == "transformer_engine" and not transformer_engine_installed():
        raise ValueError("--transformer-impl transformer_engine asks for Transformer Engine layers, which are not "
                         "installed: pass --transformer-impl local, or install transformer_engine")
