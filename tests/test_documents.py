"""Packed sequences (document masks): the schedule against brute force, the ring against the float64
reference (simulated W ≤ 8, gloo W ≤ 4), the skip counts, bad boundaries, and document positions."""

import itertools
import random

import pytest
import torch

from ring_sp import (
    document_positions,
    local_positions,
    merge,
    ring_attention,
    ring_attention_simulated,
    schedule,
    split,
)
from ring_sp.comm import SimulatedRing
from ring_sp.documents import check_documents, document_ids
from ring_sp.layout import LAYOUTS, segments
from ring_sp.schedule import plan
from tests.reference import dense_attention
from tests.ring_cases import check_simulated, document_cases
from tests.schedule_cells import cell_counts, visible_cells
from tests.test_ring_distributed import check_distributed


def _bounds(seq: int, rng: random.Random, longest: int) -> tuple[int, ...]:
    out = [0]
    while out[-1] < seq:
        out.append(min(seq, out[-1] + rng.randint(1, longest)))
    return tuple(out)


# (document pattern, document grid): 1 = every piece unmasked on its own, 10**6 = all grouped (only the
# block's edges are on the grid), None = grouped unless a piece fills its block.
PATTERNS = [("random", 1), ("random", 3), ("random", 10**6), ("ones", 10**6), ("whole", 3), ("per_batch", 3),
            ("random", None), ("whole", None), ("random", schedule.WHOLE), ("ones", schedule.WHOLE)]
SCHEDULE_CASES = [
    (layout, world, n, causal, lookback, reduce_col, grid, pattern)
    for layout, world, n, (causal, lookback), reduce_col, (pattern, grid) in itertools.product(
        LAYOUTS, [1, 2, 3, 5], [2, 6], [(False, None), (True, None), (True, 3)], [True, False], PATTERNS)
]


@pytest.mark.parametrize("layout,world,n,causal,lookback,reduce_col,grid,pattern", SCHEDULE_CASES)
def test_schedule_covers_exactly_the_visible_pairs(layout, world, n, causal, lookback, reduce_col, grid, pattern):
    seq = world * n
    rng = random.Random(hash((layout, world, n, causal, lookback, reduce_col, grid, pattern)) % 2**32)
    if pattern == "random":
        docs = (_bounds(seq, rng, 4),)
    elif pattern == "ones":
        docs = (tuple(range(seq + 1)),)
    elif pattern == "whole":
        docs = ((0, seq),)
    else:
        docs = (_bounds(seq, rng, 5), _bounds(seq, rng, 3))
    sched = plan(layout, world, n, causal=causal, lookback=lookback, reduce_col=reduce_col, documents=docs,
                 document_grid=grid)
    counts, ids = cell_counts(sched, layout, world, n, docs)
    for e, doc in enumerate(ids):
        for r in range(world):
            want = visible_cells(layout, world, n, r, causal, lookback, reduce_col, doc)
            assert torch.equal(counts[e, r], want.long()), f"element {e} rank {r}: computed != visible (or twice)"
    # Skip counts against brute force: segment pairs with no visible cell in any batch element.
    seen_by = [torch.stack([visible_cells(layout, world, n, r, causal, lookback, True, doc) for doc in ids]).any(0)
               for r in range(world)]
    skipped, busy_offsets = 0, set()
    for offset in range(world if reduce_col else 1):
        for r in range(world):
            source = (r - offset) % world
            for qs in segments(layout, r, world, n):
                for ks in segments(layout, source, world, n):
                    keys = local_positions(seq, layout, source, world)[ks.local_start:ks.local_start + ks.length]
                    seen = bool(seen_by[r][qs.local_start:qs.local_start + qs.length][:, keys].any())
                    skipped += not seen
                    if seen:
                        busy_offsets.add(offset)
    c = sched.counts
    assert c.skipped_blocks == skipped
    assert c.passes == len(busy_offsets | {0}) and sched.offsets == tuple(sorted(busy_offsets | {0}))
    assert c.skipped_passes == (world if reduce_col else 1) - c.passes
    assert c.blocks == sum(len(b) for step in sched.steps for b in step)
    for step in sched.steps:
        assert all(blk.area > 0 for blocks in step for blk in blocks)
    if grid == 1 and len(docs) == 1:  # every piece is on the grid: a block per piece, none masked by document
        assert not any(blk.documents for step in sched.steps for blocks in step for blk in blocks)
    if grid == schedule.WHOLE:
        check_runs(sched, layout, world, n, docs[0])


def check_runs(sched, layout: str, world: int, n: int, bounds: tuple[int, ...]) -> None:
    """Every block of several documents lists, per document in order, its query rows and key columns
    (brute force from the document ids of its rows and columns)."""
    ids = document_ids(bounds, torch.arange(world * n))
    for step, per_rank in enumerate(sched.steps):
        for r, blocks in enumerate(per_rank):
            qpos = local_positions(world * n, layout, r, world)
            kpos = local_positions(world * n, layout, sched.source(step, r), world)
            for blk in blocks:
                assert bool(blk.runs) == blk.documents
                if not blk.documents:
                    continue
                rows, cols = ids[qpos[blk.q_start:blk.q_stop]], ids[kpos[blk.k_start:blk.k_stop]]
                touched = sorted(set(rows.tolist()) | set(cols.tolist()))
                want = tuple((int((rows == d).sum()), int((cols == d).sum())) for d in touched)
                assert blk.runs == want, (blk, want)


def test_whole_blocks_keep_every_document_diagonal():
    """document_grid=WHOLE (for kernels that take document boundaries, cuDNN's ragged attention): under
    contiguous and zigzag every block of several documents holds each document's rows and columns at the
    same offsets (a causal block: each document's own causal square, so a top-left causal mask per
    document is exact); a block inside one document needs no mask."""
    rng = random.Random(3)
    for layout, world, causal in itertools.product(("contiguous", "zigzag"), (1, 2, 4), (True, False)):
        n = 32
        for _ in range(5):
            bounds = _bounds(world * n, rng, 20)
            sched = plan(layout, world, n, causal=causal, documents=(bounds,), document_grid=schedule.WHOLE)
            check_runs(sched, layout, world, n, bounds)
            for step in sched.steps:
                for blk in (b for blocks in step for b in blocks if b.documents):
                    assert blk.band == (schedule.CAUSAL if causal else schedule.FULL)
                    assert all(rows == cols for rows, cols in blk.runs), blk
                    assert (blk.q_start, blk.q_stop) == (blk.k_start, blk.k_stop)
    with pytest.raises(ValueError, match="document_grid"):
        plan("contiguous", 2, 8, causal=True, documents=((0, 3, 16),), document_grid=-1)


def test_documents_inside_shards_need_no_communication():
    """contiguous, every document inside one shard: one pass, no transfer, nothing sent."""
    world, n = 4, 12
    docs = (0, 5, 12, 13, 20, 24, 30, 36, 47, 48)
    sched = plan("contiguous", world, n, causal=True, documents=(docs,))
    assert (sched.counts.passes, sched.counts.skipped_passes, sched.counts.transfers) == (1, 3, 0)

    class Recording(SimulatedRing):
        hops = []

        def exchange(self, sends, hops, buffers):
            if any(x is not None for x in sends) and hops % self.size:
                self.hops.append(hops)
            return super().exchange(sends, hops, buffers)

    q = torch.randn(1, world * n, 2, 8, dtype=torch.float64)
    qs = [t.requires_grad_() for t in split(q, "contiguous", world)]
    outs = ring_attention_simulated(qs, qs, qs, causal=True, cu_seqlens=docs, transport=Recording(world))
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    assert Recording.hops == []
    # One document crossing a shard boundary: one pass more, and only that document's columns travel.
    crossing = (0, 5, 14, 20, 24, 30, 36, 48)
    sched = plan("contiguous", world, n, causal=True, documents=(crossing,))
    assert sched.offsets == (0, 1) and sched.counts.transfers == 1
    # position 1 needs columns 5–11 of position 0 (document 5–14); by default the masked block's edges
    # are rounded to multiples of schedule.ALIGN (16), so columns 0–11 travel
    assert sched.columns(1, 1) == (0, 12)
    exact = plan("contiguous", world, n, causal=True, documents=(crossing,), document_grid=1)
    assert exact.columns(1, 1) == (5, 12)
    wide = plan("contiguous", 4, 64, causal=True, documents=((0, 100, 140, 256),))
    # document 100–140 runs from position 1 into 2: columns 36–63 of position 1, rounded out to 32–63
    assert wide.columns(1, 2) == (32, 64)


def test_long_documents_go_unmasked_on_the_grid():
    """A document's part on the grid (multiples of document_grid, and the block's edges) gets an unmasked
    block (cuDNN can take it, and its shape recurs whatever the documents); the columns beside it in the same
    rows are masked blocks; its rows off the grid join the short documents' masked blocks."""
    docs = ((0, 40, 41, 43, 46, 100, 128),)
    blocks = plan("contiguous", 1, 128, causal=True, documents=docs, document_grid=16).steps[0][0]
    plain = sorted((b.q_start, b.q_stop, b.k_start, b.k_stop) for b in blocks if not b.documents)
    assert plain == [(0, 32, 0, 32), (48, 96, 48, 96), (112, 128, 112, 128)]
    assert all(b.band.lo == 0 and b.band.hi is None for b in blocks if not b.documents)  # causal squares
    masked = sorted((b.q_start, b.q_stop, b.k_start, b.k_stop) for b in blocks if b.documents)
    # rows 32-47 (document 0-40's tail, three short documents, 46-100's head); rows 48-95 beside the
    # plain block (columns 46-47); rows 96-111 (46-100's tail, 100-128's head; columns rounded out to 16);
    # rows 112-127 beside the last plain block (columns 100-111)
    assert masked == [(32, 48, 0, 48), (48, 96, 46, 48), (96, 112, 32, 112), (112, 128, 100, 112)], masked
    # the default grid, blocks of 16k tokens, documents up to 24k long: unmasked shapes from a bounded set
    # (multiples of the grid), whatever the documents
    rng, shapes, grid = random.Random(0), set(), schedule.DOCUMENT_GRID
    for _ in range(20):
        sched = plan("contiguous", 8, 16384, causal=True, documents=(_bounds(8 * 16384, rng, 24000),))
        shapes |= {(b.q_stop - b.q_start, b.k_stop - b.k_start) for step in sched.steps for bs in step
                   for b in bs if not b.documents}
    assert len(shapes) > 3 and all(a % grid == 0 and b % grid == 0 for a, b in shapes), shapes


def test_only_whole_blocks_go_unmasked_when_the_grid_is_none():
    """document_grid=None: a document gets a block without a mask only where it fills the whole block, so
    every unmasked block has a shape that recurs whatever the documents (no new cuDNN plan per batch)."""
    docs = ((0, 40, 41, 43, 46, 100, 128),)
    blocks = plan("contiguous", 1, 128, causal=True, documents=docs, document_grid=None).steps[0][0]
    assert all(b.documents for b in blocks) and len(blocks) == 1  # four documents, one masked block
    whole = plan("contiguous", 1, 128, causal=True, documents=((0, 128),), document_grid=None).steps[0][0]
    assert [(b.q_start, b.q_stop, b.k_start, b.k_stop, b.documents) for b in whole] == [(0, 128, 0, 128, False)]
    # ring of 4, a document from 20 to 100: the blocks it fills (rows and columns 32-63 and 64-95 of the
    # sequence) are plain; its parts in the blocks it only touches are masked
    sched = plan("contiguous", 4, 32, causal=True, documents=((0, 20, 100, 128),), document_grid=None)
    shapes = {(b.q_stop - b.q_start, b.k_stop - b.k_start) for step in sched.steps for blocks in step
              for b in blocks if not b.documents}
    assert shapes == {(32, 32)}, shapes


# W = 1–4 run over gloo below (each rank also against the simulated ring); here larger rings with
# auto, and the reference torch backend through the whole ring.
@pytest.mark.parametrize("backend,world", [("auto", 5), ("auto", 8), ("torch", 3)])
def test_simulated_ring_with_documents(world, backend):
    failures = []
    for case in document_cases(dtypes=("float64", "float32")):
        failures += check_simulated(case, world, backend=backend)
    assert not failures, "\n".join(failures[:20])


def test_auto_keeps_blocks_whole_for_the_ragged_op(monkeypatch):
    """Under auto, blocks of several documents stay whole (document_grid=WHOLE) and go to the sdpa backend's
    ragged op (cuDNN's on CUDA; here the CPU one) wherever it takes every such block; with a key mask, the
    striped layout (documents off the diagonal) or a backend that masks by document ids, the grid plan."""
    from ring_sp import attention
    from ring_sp.kernels.sdpa_backend import SdpaBackend

    calls = []
    ragged = SdpaBackend._ragged_forward
    monkeypatch.setattr(SdpaBackend, "_ragged_forward", lambda self, *a: calls.append(1) or ragged(self, *a))
    world, n = 4, 16
    docs = [0, 1, 7, 20, 21, 40, 45, 64]
    q = torch.randn(1, world * n, 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, 1, world * n, 2, 8, dtype=torch.float64)
    for layout, causal in itertools.product(("contiguous", "zigzag"), (True, False)):
        qs, ks, vs = (split(t, layout, world) for t in (q, k, v))
        opts = attention.RingOptions(causal=causal, layout=layout)
        sched = attention._plan(opts, ((*docs,),), world, qs[0], ks[0], None)
        assert any(b.runs for step in sched.steps for blocks in step for b in blocks), (layout, causal)
        calls.clear()
        outs = ring_attention_simulated(qs, ks, vs, causal=causal, layout=layout, cu_seqlens=docs)
        assert calls, (layout, causal)
        ref = _document_reference(q, k, v, docs, causal)
        assert (merge(outs, layout) - ref).abs().max() < 1e-10, (layout, causal)
        grid = attention._plan(attention.RingOptions(causal=causal, layout=layout, backend="torch"), ((*docs,),),
                               world, qs[0], ks[0], None)
        assert not any(b.runs for step in grid.steps for blocks in step for b in blocks)
        assert attention.document_plan(opts, q, k) == "whole", (layout, causal)  # what the job reports
        assert attention.document_plan(attention.RingOptions(causal=causal, layout=layout, backend="torch"), q,
                                       k) == "grid"
    assert attention.document_plan(attention.RingOptions(causal=True, layout="striped"), q, k) == "grid"
    striped = attention._plan(attention.RingOptions(causal=True, layout="striped"), ((*docs,),), world,
                              split(q, "striped", world)[0], ks[0], None)
    assert not any(b.runs for step in striped.steps for blocks in step for b in blocks)
    masked = attention._plan(attention.RingOptions(causal=True), ((*docs,),), world, qs[0], ks[0],
                             torch.ones(1, n, dtype=torch.bool))
    assert not any(b.runs for step in masked.steps for blocks in step for b in blocks)


def _document_reference(q, k, v, docs, causal):
    """float64 attention over the whole sequence, each query inside its own document (and causal)."""
    pos = torch.arange(q.shape[1])
    ids = document_ids(docs, pos)
    visible = ids[:, None] == ids[None, :]
    if causal:
        visible &= pos[:, None] >= pos[None, :]
    return dense_attention(q, k, v, visible_pairs=visible)


def test_simulated_ring_with_documents_in_bf16():
    failures = []
    for case in document_cases(dtypes=("bfloat16",)):
        failures += check_simulated(case, 4)
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_distributed_ring_with_documents(dist_pool, world):
    sizes = [None] + [r for r in range(2, world) if world % r == 0]
    check_distributed(dist_pool(world), document_cases(dtypes=("float64", "float32"), ring_sizes=sizes))


def test_bad_boundaries_name_the_fix():
    q = torch.randn(2, 8, 2, 4)
    for cu, match in [([1, 8], "from 0 to"), ([0, 7], "from 0 to"), ([0, 4, 4, 8], "strictly increasing"),
                      ([[0, 8]] * 3, "3 boundary lists but the batch has 2"), ([0.0, 8.0], "list/tuple of ints"),
                      (torch.tensor([0.0, 8.0]), "integer tensor"), ([0, 9], "S = 8")]:
        with pytest.raises(ValueError, match=match):
            ring_attention(q, q, q, cu_seqlens=cu)
    # Per-batch lists, tensors and a 2-D tensor are all accepted.
    assert check_documents([[0, 3, 8], torch.tensor([0, 8])], 2, 8) == ((0, 3, 8), (0, 8))
    assert check_documents(torch.tensor([[0, 2, 8], [0, 2, 8]]), 2, 8) == ((0, 2, 8),)


def test_ranks_that_disagree_on_boundaries_all_raise(dist_pool):
    results = dist_pool(2).run(ring_cases_disagree)
    assert all("of one ring disagree on cu_seqlens" in r for r in results), results


def ring_cases_disagree() -> str:
    import torch.distributed as dist

    q = torch.randn(1, 4, 2, 4)
    cu = [0, 3, 8] if dist.get_rank() == 0 else [0, 5, 8]
    try:
        ring_attention(q, q, q, cu_seqlens=cu)
    except ValueError as e:
        return str(e)
    return "no error"


def test_document_positions():
    cu = [0, 3, 10, 16]
    full = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5])
    for layout, world in itertools.product(LAYOUTS, [1, 2, 4]):
        for r in range(world):
            got = document_positions(cu, 16, layout, r, world)
            assert torch.equal(got, full[local_positions(16, layout, r, world)])
    per_batch = document_positions([cu, [0, 16]], 16, "zigzag", 1, 2)
    assert per_batch.shape == (2, 8)
    assert torch.equal(per_batch[1], local_positions(16, "zigzag", 1, 2))



def test_megatron_document_masks():
    """Boundaries from EOD tokens (Megatron-LM's --reset-attention-mask: the EOD ends its document), their
    compact mask and back, and position ids that restart in every document."""
    from megatron_patch import boundaries_from_eod, document_mask, reset_position_ids
    from megatron_patch.documents import documents_of, is_document_mask

    eod = 9
    tokens = torch.tensor([[1, 9, 2, 3, 9, 4, 5, 9], [1, 2, 3, 4, 5, 6, 7, 8]])
    bounds = boundaries_from_eod(tokens, eod)
    assert bounds == [[0, 2, 5, 8], [0, 8]]
    mask = document_mask(bounds, 2, 8)
    assert is_document_mask(mask) and not is_document_mask(torch.zeros(2, 1, 8, 8, dtype=torch.bool))
    assert documents_of(mask) == bounds
    assert reset_position_ids(bounds, 8).tolist() == [[0, 1, 0, 1, 2, 0, 1, 2], list(range(8))]
    with pytest.raises(ValueError, match="strictly increasing"):
        document_mask([[0, 3, 3, 8]], 1, 8)
