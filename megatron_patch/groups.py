"""Megatron's context-parallel group (the ring), found one way for the core attention and the data split."""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state


def context_parallel_group(pg_collection=None, model_comm_pgs=None, *, required: bool = True):
    """Megatron's context-parallel group: ``pg_collection.cp`` (0.15+), ``model_comm_pgs.cp`` (0.13–0.14),
    else ``parallel_state``'s; None when torch.distributed is not initialised (one process). Without
    ``parallel_state``'s groups: ValueError if ``required``, else None (no ring: nothing is split)."""
    for holder in (pg_collection, model_comm_pgs):
        group = getattr(holder, "cp", None)
        if group is not None:
            return group
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = parallel_state.get_context_parallel_group(check_initialized=False)
    if group is None and required:
        raise ValueError("the context-parallel group is unknown: call megatron.core.parallel_state."
                         "initialize_model_parallel(...) first, or pass pg_collection")
    return group
