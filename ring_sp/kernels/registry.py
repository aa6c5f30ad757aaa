"""The block backends and how one is chosen.

A backend computes one block of attention with no distribution:

- ``forward(q, k, v, state, visibility, scale)`` folds the K/V block into ``state`` in place.
- ``backward(do, q, k, v, out, lse, delta, dq, dk, dv, visibility, scale)`` adds this
  block's gradients to the accumulators dq, dk, dv in place (float32, or see ``adds_once``), given the *final* output
  ``out`` and log-sum-exp ``lse`` of the query rows and delta = rowsum(do · out).
- ``unsupported(q, k, visibility)`` says why it cannot compute such a block (None: it can).
- ``uses_delta`` (optional, default True): its backward reads ``delta``. The ring computes delta (one pass
  over do and out in float32) only for backends that read it and passes None to the others.
- ``adds_once`` (optional, default False): its backward adds to each element of dq, dk, dv at most once
  (one fused call). Where such a block is all a position has (a ring of one), the ring hands it zeroed
  gradients in the inputs' dtype instead of float32 accumulators (exact: 0 + x).
- ``takes_document_runs`` (optional, default False): it computes a block of several documents from the
  documents' runs (rows and columns of each), so the schedule should keep such blocks whole
  (``schedule.WHOLE``) rather than cut them for a kernel that masks by document ids.

Shapes: q, do, out, dq (batch, seq_q, heads, head_dim); k, v, dk, dv (batch, seq_k, kv_heads,
head_dim), heads % kv_heads == 0, query head i using K/V head i // (heads // kv_heads); lse,
delta (batch, heads, seq_q). ``visibility`` (:class:`Visibility`): band, key mask, documents.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from torch import Tensor

from ring_sp.kernels.state import State
from ring_sp.kernels.visibility import Visibility

log = logging.getLogger("ring_sp")


class Backend(Protocol):
    name: str
    auto_devices: tuple[str, ...] | None  # device types "auto" may use it on (None: any)

    def unsupported(self, q: Tensor, k: Tensor, visibility: Visibility) -> str | None:
        """Why this backend cannot compute such a block, or None if it can."""

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, state: State, visibility: Visibility, scale: float,
        *, fresh: bool = False, out: Tensor | None = None,
    ) -> None:
        """Fold K/V block (k, v) into ``state`` of query rows q. ``fresh``: the state holds no keys yet
        (empty, as ``State.empty`` made it; a backend may skip reading it). ``out`` (shaped like q): no
        later block reaches these rows: write their normalised output there; ``state.acc`` may then be
        left stale, ``state.m`` and ``state.lse`` are final."""

    def backward(
        self,
        do: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        delta: Tensor | None,
        dq: Tensor,
        dk: Tensor,
        dv: Tensor,
        visibility: Visibility,
        scale: float,
    ) -> None: ...


# name -> (factory taking the torch backend's bucket size, priority: higher is tried first by "auto")
_FACTORIES: dict[str, tuple[Callable[[int | None], Backend], int]] = {}
_INSTANCES: dict[tuple[str, int | None], Backend] = {}
_LOGGED: set[tuple] = set()


def register(name: str, factory: Callable[[int | None], Backend], priority: int) -> None:
    """Make a backend available by ``name``; ``auto`` tries higher ``priority`` first."""
    _FACTORIES[name] = (factory, priority)


def names() -> list[str]:
    """Registered backend names, in the order ``auto`` tries them."""
    return sorted(_FACTORIES, key=lambda n: -_FACTORIES[n][1])


def get(name: str, bucket_size: int | None = None) -> Backend:
    if name not in _FACTORIES:
        raise ValueError(f"backend={name!r} is unknown: use 'auto' or one of {', '.join(names())}")
    key = (name, bucket_size)
    if key not in _INSTANCES:
        _INSTANCES[key] = _FACTORIES[name][0](bucket_size)
    return _INSTANCES[key]


def choose(name: str, q: Tensor, k: Tensor, visibility: Visibility, bucket_size: int | None = None) -> Backend:
    """The backend that computes a block: ``name`` itself, or for ``auto`` the first that can.

    Raises ValueError when the named backend (or, for ``auto``, every backend) cannot serve it.
    """
    candidates = names() if name == "auto" else [name]
    reasons = []
    for candidate in candidates:
        backend = get(candidate, bucket_size)
        devices = getattr(backend, "auto_devices", None)
        if name == "auto" and devices is not None and q.device.type not in devices:
            continue
        reason = backend.unsupported(q, k, visibility)
        if reason is None:
            if name == "auto":
                key = (q.device.type, q.dtype, q.shape[-1], visibility.kind, candidate)
                if key not in _LOGGED:
                    _LOGGED.add(key)
                    log.debug("backend auto: %s for %s blocks (%s, %s, head_dim %d)",
                              candidate, visibility.kind, q.device.type, q.dtype, q.shape[-1])
            return backend
        reasons.append(f"{candidate}: {reason}")
    raise ValueError(f"backend={name!r} cannot compute a {visibility.kind} block of these inputs "
                     f"({'; '.join(reasons)}): pick another backend or backend='auto'")
