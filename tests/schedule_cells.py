"""Brute force over a schedule: how often each (query, key) pair is computed."""

from __future__ import annotations

import torch

from ring_sp import local_positions
from ring_sp.documents import document_ids


def cell_counts(sched, layout: str, world: int, n: int, docs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """count[b][r][p_local, t_global]: how often the schedule computes query p of rank r against key t,
    for batch element b's documents (a block marked ``documents`` shows same-document cells only)."""
    seq = world * n
    ids = [document_ids(b, torch.arange(seq)) for b in docs]
    counts = torch.zeros(len(docs), world, n, seq, dtype=torch.long)
    for step, per_rank in enumerate(sched.steps):
        for r, blocks in enumerate(per_rank):
            qpos = local_positions(seq, layout, r, world)
            kpos = local_positions(seq, layout, sched.source(step, r), world)
            for blk in blocks:
                i = torch.arange(blk.q_start, blk.q_stop)[:, None]
                j = torch.arange(blk.k_start, blk.k_stop)[None, :]
                d = (i - blk.q_start) - (j - blk.k_start)
                ok = torch.ones_like(d, dtype=torch.bool)
                if blk.band.lo is not None:
                    ok &= d >= blk.band.lo
                if blk.band.hi is not None:
                    ok &= d <= blk.band.hi
                ii, jj = torch.broadcast_tensors(i, j)
                for e, doc in enumerate(ids):
                    cell = ok & (doc[qpos[ii]] == doc[kpos[jj]]) if blk.documents else ok
                    counts[e, r].index_put_((ii[cell], kpos[jj[cell]]), torch.tensor(1), accumulate=True)
    return counts, ids


def visible_cells(layout: str, world: int, n: int, r: int, causal: bool, lookback, reduce_col: bool,
                  ids: torch.Tensor | None = None) -> torch.Tensor:
    """(n, seq) bool: which keys (global) the queries of rank r may see; ``ids``: document ids of the sequence."""
    seq = world * n
    p = local_positions(seq, layout, r, world)[:, None]
    t = torch.arange(seq)[None, :]
    want = ids[p] == ids[t] if ids is not None else torch.ones(n, seq, dtype=torch.bool)
    if causal:
        want &= t <= p
    if lookback is not None:
        want &= p - t < lookback
    if not reduce_col:
        want &= torch.isin(t, local_positions(seq, layout, r, world))
    return want
