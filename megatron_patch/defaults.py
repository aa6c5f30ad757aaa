"""Where a spec-built module finds its ring options when its spec carries none.

``megatron_patch.apply()`` records the options parsed from Megatron-LM's ``--ring-*`` flags here;
without it, Megatron-LM's global args are read when they carry the flags; else the defaults.
"""

from __future__ import annotations

from megatron_patch.options import RingOptions

_recorded: RingOptions | None = None
_applied = False


def mark_applied(value: bool) -> None:
    global _applied
    _applied = value


def applied() -> bool:
    """Whether ``megatron_patch.apply()`` has run in this process."""
    return _applied


def record(options: RingOptions | None) -> None:
    """Set (or clear, with None) the options of this process's ``--ring-attention`` run."""
    global _recorded
    _recorded = options


def megatron_lm_options() -> RingOptions | None:
    """The options of the running Megatron-LM job if it enabled ``--ring-attention``, else None."""
    if _recorded is not None:
        return _recorded
    try:
        from megatron.training import global_vars
    except ImportError:
        return None
    args = getattr(global_vars, "_GLOBAL_ARGS", None)
    if args is None or not getattr(args, "ring_attention", False):
        return None
    return RingOptions.from_args(args)


def current_options() -> RingOptions:
    """The running job's options, or the defaults."""
    return megatron_lm_options() or RingOptions()
