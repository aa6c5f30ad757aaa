"""RoPE of a ring's THD packed sequences: every token rotated by its position inside its document.

For packed sequences Megatron's ``GPTModel`` builds the whole rotary table (``packed_seq=True``,
``max_seqlen`` rows), and ``megatron.core.transformer.attention`` calls ``apply_rotary_pos_emb(t, freqs,
config, cu_seqlens=..., cp_group=...)``, which restarts positions at every document and, with context
parallelism, takes each document's 2 × CP zigzag chunks (Transformer Engine's split), reading the
boundaries on the host in every layer. A ring's THD batch is split by ``megatron_patch.packed`` instead.

``install()`` replaces that name with one that, for the config of a model whose core attention is a ring
over more than one rank (``register``), takes the table row of each local token's in-document position
(``ring_sp.document_positions`` under the ring's layout: computed, checked and agreed on by the ring's
ranks once per batch) and rotates [t, heads, dim] as [seq, batch 1, heads, dim], through the name it
replaced (so through liger's RoPE where that wraps it too, in either order). Every
other call (no ``cu_seqlens``, another model, context parallelism 1) is Megatron's own.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import weakref

from torch import Tensor

from megatron_patch.documents import boundaries, read_once
from megatron_patch.packed import SEEN
from ring_sp.comm import gather_signatures
from ring_sp.documents import document_positions, fingerprint

ATTENTION = "megatron.core.transformer.attention"  # the module whose apply_rotary_pos_emb name is replaced

# id(config) -> (weakref to the TransformerConfig, the ring's process group, its layout)
_RINGS: dict[int, tuple] = {}
# (id(cu_seqlens), id(freqs), local tokens, id(group), layout) -> (weakrefs to both, cu_seqlens version, table)
_TABLES: dict[tuple, tuple] = {}
_KEEP = 8  # tables kept: the batches in flight (pipeline schedules, recompute), not every batch seen


def register(config, group, layout: str) -> None:
    """Calls with ``config`` and ``cu_seqlens`` are a ring's THD batch over ``group`` split with ``layout``."""
    for key in [k for k, entry in _RINGS.items() if entry[0]() is None]:
        del _RINGS[key]
    _RINGS[id(config)] = (weakref.ref(config), group, layout)


def ring_of(config) -> tuple | None:
    """(group, layout) of the ring registered for ``config``, or None."""
    entry = _RINGS.get(id(config))
    return None if entry is None or entry[0]() is not config else entry[1:]


def local_table(freqs: Tensor, cu_seqlens: Tensor, local: int, group, layout: str) -> Tensor:
    """The rows of ``freqs`` ([rows, 1, 1, dim], Megatron's whole table) for this rank's ``local`` tokens:
    [local, 1, 1, dim]. Once per batch (per ``cu_seqlens`` tensor); the ranks of ``group`` check the
    boundaries together (one small all_gather) and all raise ValueError if any rank cannot use them."""
    key = (id(cu_seqlens), id(freqs), local, id(group), layout)
    seen = _TABLES.get(key)
    if seen is not None and seen[0]() is cu_seqlens and seen[1]() is freqs and seen[2] == cu_seqlens._version:
        return seen[3]
    world, rank = group.size(), group.rank()
    try:
        bounds = read_once(cu_seqlens, boundaries)
        positions = document_positions(bounds, local * world, layout, rank, world)
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        if longest > freqs.shape[0]:
            raise ValueError(f"the longest document of cu_seqlens holds {longest} tokens but the rotary table has "
                             f"{freqs.shape[0]} rows: PackedSeqParams.max_seqlen_q must be at least the longest "
                             "document's length (of cu_seqlens_padded when given)")
    except ValueError:
        gather_signatures(group, (1, 0))  # fail the peers too, or they would wait for this rank
        raise
    rows = gather_signatures(group, (0, fingerprint((bounds,))))
    if any(row[0] for row in rows):
        raise ValueError(f"ranks {[n for n, row in enumerate(rows) if row[0]]} of the ring rejected the THD batch's "
                         "cu_seqlens (their own error says why)")
    if len({row[1] for row in rows}) > 1:
        raise ValueError("the ranks of one ring disagree on the THD batch's cu_seqlens: every rank must get the "
                         "boundaries of the whole stream (split the stream, keep cu_seqlens whole)")
    table = freqs.index_select(0, positions.to(freqs.device))
    if len(_TABLES) >= _KEEP:
        del _TABLES[next(iter(_TABLES))]
    _TABLES[key] = (weakref.ref(cu_seqlens), weakref.ref(freqs), cu_seqlens._version, table)
    SEEN["rope"] = True
    return table


def wrap(original):
    """``apply_rotary_pos_emb`` that rotates a registered ring's THD tokens by their in-document positions."""
    signature = inspect.signature(original)
    names = list(signature.parameters)
    at = names.index("cu_seqlens") if "cu_seqlens" in names else len(names)

    @functools.wraps(original)
    def apply_rotary_pos_emb(*args, **kwargs):
        if kwargs.get("cu_seqlens", args[at] if len(args) > at else None) is None:  # not packed: no binding cost
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        given = bound.arguments
        cu_seqlens = given["cu_seqlens"]
        ring = ring_of(given.get("config"))
        if ring is None:
            return original(*args, **kwargs)
        t = given["t"]  # [t, heads, dim]
        given["freqs"] = local_table(given["freqs"], cu_seqlens, t.shape[0], *ring)
        given["t"], given["cu_seqlens"] = t.unsqueeze(1), None  # as [seq, batch 1, heads, dim]
        # through the name Megatron's layers call, whatever wraps it now (liger's RoPE: megatron_patch.liger)
        return importlib.import_module(ATTENTION).apply_rotary_pos_emb(*bound.args, **bound.kwargs).squeeze(1)

    return apply_rotary_pos_emb


def install() -> bool:
    """Replace ``apply_rotary_pos_emb`` in ``megatron.core.transformer.attention`` (once); False if it is absent."""
    attention = importlib.import_module(ATTENTION)
    current = getattr(attention, "apply_rotary_pos_emb", None)
    if current is None:
        return False
    if not getattr(current, "_megatron_patch", False):
        replacement = wrap(current)
        replacement._megatron_patch = True
        attention.apply_rotary_pos_emb = replacement
    return True


def installed() -> bool:
    attention = importlib.import_module(ATTENTION)
    return getattr(getattr(attention, "apply_rotary_pos_emb", None), "_megatron_patch", False)

