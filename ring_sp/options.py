"""Ring-attention options, defined once: the fields of :class:`RingOptions`.

Each field carries an :class:`Option` (its metadata) that says what values it takes (a
:class:`Kind`) and how a user writes it in each place where it can be set:

- the keyword argument of ``ring_sp.ring_attention`` / ``ring_attention_simulated``;
- the Megatron-LM flag (``--ring-*``, added by ``megatron_patch``; a few are Megatron's own);
- the key of the ``"ring_attention"`` section of a DeepSpeed JSON config (read by ``launch``).

:func:`check_option` is the one check of a value; its ``ValueError`` names the option as the
user wrote it there (:data:`KWARGS`, :data:`FLAGS`, :class:`Json`) and says the fix. A new
option is a field here plus its keyword in the two signatures; ``tests/test_options.py`` fails
until every place has it.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ring_sp import kernels
from ring_sp.layout import LAYOUTS, get_layout


class Kind:
    """The values an option takes: ``fix`` says how to correct a bad one (None: it is fine), ``code`` maps a
    good one to an int (the ranks of a ring compare these), ``argparse`` gives its flag's keywords."""

    unknown = False  # a bad value is an unknown name

    def fix(self, value, view: View, none_ok: bool) -> str | None:
        raise NotImplementedError

    def code(self, value) -> int:
        raise NotImplementedError

    def argparse(self, default) -> dict:
        return {}


class Switch(Kind):
    """True or False; on the command line a flag without a value (``--no-...`` when the default is True)."""

    def fix(self, value, view, none_ok):
        return None if isinstance(value, bool) else f"{view.verb} {view.literal(True)} or {view.literal(False)}"

    def code(self, value) -> int:
        return int(value)

    def argparse(self, default) -> dict:
        return {"action": "store_false" if default else "store_true"}


class Count(Kind):
    """A positive int, or None for unset."""

    def fix(self, value, view, none_ok):
        if (value is None and none_ok) or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return None
        return f"{view.verb} a positive integer" + (f" or {view.none}" if none_ok else "")

    def code(self, value) -> int:
        return value or 0

    def argparse(self, default) -> dict:
        return {"type": int}


class Scale(Kind):
    """A positive finite number, or None for 1/sqrt(head_dim)."""

    def fix(self, value, view, none_ok):
        if value is None or (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            return None
        return f"{view.verb} a positive finite float or {view.none} for 1/sqrt(head_dim)"

    def code(self, value) -> int:
        return 0 if value is None else int(round(float(value) * 2**40))


class Name(Kind):
    """One of a registry's ``names()`` (or ``"auto"`` when ``auto``). ``open``: names can be registered after
    a parser is built, so the flag lists no choices and the check runs later."""

    unknown = True

    def __init__(self, names: Callable[[], Sequence[str]], auto: bool = False, open: bool = False):
        self.names, self.auto, self.open = names, auto, open

    def allowed(self) -> tuple[str, ...]:
        return ("auto",) * self.auto + tuple(self.names())

    def fix(self, value, view, none_ok):
        if isinstance(value, str) and value in self.allowed():
            return None
        return f"use {view.literal('auto') + ' or ' if self.auto else ''}one of {', '.join(self.names())}"

    def code(self, value) -> int:
        return self.allowed().index(value)

    def argparse(self, default) -> dict:
        return {} if self.open else {"choices": self.allowed()}


_SAME = object()  # kwarg_default: the field's own default


def _dest(flag: str | None) -> str | None:
    """The argparse destination of ``--name`` or ``--no-name``."""
    return None if flag is None else flag.removeprefix("--").removeprefix("no-").replace("-", "_")


@dataclass(frozen=True)
class Option:
    """How one :class:`RingOptions` field is written; None where it cannot be.

    kwarg: keyword of ``ring_attention`` and, if ``simulated``, of ``ring_attention_simulated``; its
    default there is ``kwarg_default`` when given, else the field's.
    flag: Megatron-LM flag, added by ``megatron_patch`` if ``ours``, else Megatron's own.
    json: key of the DeepSpeed ``"ring_attention"`` section; its value fills ``json_flag`` (default:
    ``flag``), and may be null only when it fills its own flag.
    """

    kind: Kind
    kwarg: str | None = None
    kwarg_default: Any = _SAME
    simulated: bool = True
    flag: str | None = None
    ours: bool = True
    json: str | None = None
    json_flag: str | None = None
    metavar: str | None = None
    help: str | None = None

    @property
    def dest(self) -> str | None:
        """Where ``flag`` lands on a parsed namespace."""
        return _dest(self.flag)

    @property
    def json_target(self) -> tuple[str, str]:
        """(namespace destination, flag) that the JSON key fills."""
        flag = self.json_flag or self.flag
        return _dest(flag), flag


def _option(default, kind: Kind, **spelling) -> Any:
    return field(default=default, metadata={"option": Option(kind, **spelling)})


@dataclass(frozen=True)
class RingOptions:
    """Everything besides the tensors that every rank of a ring must agree on.

    layout: how a sequence is sharded over the ring (default ``zigzag``, Megatron's own split;
    ``ring_attention``'s keyword defaults to ``contiguous``).
    backend: block kernel (``ring_sp.kernels.names()`` or ``auto``).
    max_lookback: sliding window in tokens (key t visible to query p iff 0 <= p - t < L), or None.
    reduce_col: False attends to this rank's own K/V only (local attention).
    bucket_size: tile length of the ``torch`` backend.
    ring_size: ranks per ring (None: the whole group); under Megatron None or the context-parallel size.
    documents: under Megatron, every batch carries document boundaries (``--reset-attention-mask``), and a
    batch without them is refused; ``ring_attention`` takes the boundaries themselves (``cu_seqlens``).
    causal, softmax_scale: ``ring_attention``'s; under Megatron each layer sets them.
    """

    layout: str = _option(
        "zigzag", Name(lambda: LAYOUTS), kwarg="layout", kwarg_default="contiguous", flag="--ring-layout",
        json="layout",
        help="How each sequence is sharded over the ring: zigzag (default; Megatron's own context-parallel "
             "split, 2*CP chunks, rank r holds chunks r and 2CP-1-r), striped (token t on rank t mod CP) or "
             "contiguous (rank r holds [r*S/CP, (r+1)*S/CP)). The data split and RoPE positions follow it.")
    backend: str = _option(
        "auto", Name(kernels.names, auto=True, open=True), kwarg="backend", flag="--ring-backend", json="backend",
        help="Block kernel: auto or one of ring_sp.kernels.names() (e.g. torch, triton).")
    max_lookback: int | None = _option(
        None, Count(), kwarg="max_lookback_seq_len", flag="--ring-max-lookback", json="max_lookback", metavar="L",
        help="Sliding window on every layer: token p attends to keys t with 0 <= p - t < L; ring passes beyond "
             "the window are skipped. Megatron's --window-size L-1,0 is honoured too (per layer, with "
             "--window-attn-skip-freq); given both, they must agree.")
    reduce_col: bool = _option(
        True, Switch(), kwarg="ring_reduce_col", flag="--no-ring-reduce-col", json="reduce_col",
        help="Attend only to the keys this rank holds (local attention; changes the model).")
    bucket_size: int | None = _option(
        None, Count(), kwarg="bucket_size", flag="--ring-bucket-size", json="bucket_size",
        help="Tile length of the torch block backend (bounds the scores materialised at once).")
    ring_size: int | None = _option(
        None, Count(), kwarg="ring_size", simulated=False, flag="--ring-size", json="size",
        json_flag="--context-parallel-size",
        help="Optional; must equal --context-parallel-size (sub-rings inside a context-parallel group "
             "are not supported: lower --context-parallel-size instead).")
    documents: bool = _option(False, Switch(), flag="--reset-attention-mask", ours=False)
    causal: bool = _option(False, Switch(), kwarg="causal")
    softmax_scale: float | None = _option(None, Scale(), kwarg="softmax_scale")

    def check(self, view: View) -> None:
        """Raise ValueError naming the option as ``view`` spells it (and the fix) unless every field is usable
        there; a field that cannot be written there must keep its default."""
        for name, option in OPTIONS.items():
            value, default = getattr(self, name), getattr(DEFAULTS, name)
            if view.name(option) is not None:
                check_option(name, value, view)
            elif value != default:
                raise ValueError(f"RingOptions.{name}={value!r} cannot be set {view.place}: leave it at {default!r}")
        causal = view.name(OPTIONS["causal"])
        if causal is not None and self.max_lookback is not None and not self.causal:
            lookback = view.name(OPTIONS["max_lookback"])
            raise ValueError(f"{lookback} (a sliding window) needs {causal}=True: pass {causal}=True or drop "
                             f"{lookback}")

    @property
    def megatron_native(self) -> bool:
        """Whether the layout is Megatron's own context-parallel split (its data split and RoPE need no help)."""
        return get_layout(self.layout).megatron_native

    def codes(self) -> tuple[int, ...]:
        """The keyword options as ints, in :func:`keywords` order (what the ranks of a ring compare)."""
        return tuple(option.kind.code(getattr(self, name)) for name, option in OPTIONS.items() if option.kwarg)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``ring_attention`` that these options set."""
        return {option.kwarg: getattr(self, name) for name, option in OPTIONS.items() if option.kwarg}

    @classmethod
    def from_kwargs(cls, arguments: dict[str, Any]) -> RingOptions:
        """Options from a call's arguments (keyword name -> value); other names are ignored."""
        return cls(**{name: arguments[option.kwarg] for name, option in OPTIONS.items()
                      if option.kwarg in arguments})

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RingOptions:
        """Options from parsed Megatron-LM flags (missing flags take their defaults)."""
        return cls(**{name: getattr(args, option.dest, getattr(DEFAULTS, name))
                      for name, option in OPTIONS.items() if option.flag})


OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in fields(RingOptions)}
DEFAULTS = RingOptions()


def keywords() -> tuple[str, ...]:
    """The keyword arguments of ``ring_attention`` that are options, in :meth:`RingOptions.codes` order."""
    return tuple(option.kwarg for option in OPTIONS.values() if option.kwarg)


def kwarg_default(name: str) -> Any:
    """The default of field ``name``'s keyword argument."""
    option = OPTIONS[name]
    return getattr(DEFAULTS, name) if option.kwarg_default is _SAME else option.kwarg_default


def json_keys() -> dict[str, str]:
    """Key of the DeepSpeed ``"ring_attention"`` section -> field name."""
    return {option.json: name for name, option in OPTIONS.items() if option.json}


def add_flags(group) -> None:
    """Add our ``--ring-*`` flags (their types, choices, defaults and help) to an argparse parser or group."""
    for name, option in OPTIONS.items():
        if option.flag and option.ours:
            default = getattr(DEFAULTS, name)
            extra = {"metavar": option.metavar} if option.metavar else {}
            group.add_argument(option.flag, dest=option.dest, default=default, help=option.help, **extra,
                               **option.kind.argparse(default))


class View:
    """A place where a user writes options: an option's name there (None: it cannot be written there), how a
    value is spelled, and how an error quotes what was written."""

    none = "None"  # "no value"
    verb = "pass"  # "<verb> a positive integer"
    is_unknown = " is unknown"  # said of a name that is not allowed
    place = ""  # where, in "cannot be set <place>"

    def name(self, option: Option) -> str | None:
        raise NotImplementedError

    def literal(self, value) -> str:
        return repr(value)

    def said(self, name: str, option: Option, value) -> str:
        raise NotImplementedError

    def none_ok(self, option: Option) -> bool:
        return True


class _Keywords(View):
    place = "as a keyword argument"

    def name(self, option):
        return option.kwarg

    def said(self, name, option, value):
        return f"{option.kwarg}={value!r}"


class _Flags(View):
    none = "leave it out"
    place = "under Megatron, whose layers set it themselves"

    def name(self, option):
        return option.flag

    def literal(self, value) -> str:
        return str(value)

    def said(self, name, option, value):
        if isinstance(option.kind, Switch):  # a switch takes no value on the command line
            return f"{name}={value!r} ({option.flag})"
        return f"{option.flag} {value!r}"


class Json(View):
    """The ``"ring_attention"`` section of a DeepSpeed config; ``where`` names it (``"ds.json: ring_attention"``)."""

    none = "null"
    verb = "use"
    is_unknown = ""
    place = "in the ring_attention section"

    def __init__(self, where: str):
        self.where = where

    def name(self, option):
        return option.json

    def literal(self, value) -> str:
        return json.dumps(value)

    def said(self, name, option, value):
        return f"{self.where}.{option.json} = {value!r}"

    def none_ok(self, option):
        return option.json_flag is None  # what fills another flag (size: --context-parallel-size) needs a value


KWARGS = _Keywords()
FLAGS = _Flags()


def check_option(name: str, value, view: View) -> None:
    """Raise ValueError naming field ``name`` as ``view`` spells it, and the fix, unless ``value`` suits it."""
    option = OPTIONS[name]
    fix = option.kind.fix(value, view, view.none_ok(option))
    if fix is not None:
        raise ValueError(f"{view.said(name, option, value)}{view.is_unknown if option.kind.unknown else ''}: {fix}")
