"""The ring's schedule: which blocks of attention each ring position computes, at which ring offset.

At a step of offset o, position r holds (the needed columns of) the K/V block of position
(r − o) mod W. Its work there is a list of :class:`Block` s: a rectangle of its local query rows ×
the source's local key columns, with a :class:`Band` saying which cells are visible and, with
packed sequences, whether the rectangle holds several documents (then only same-document cells
are visible). Rectangles with nothing visible never appear, and offsets at which no position has
work are skipped altogether: K/V travel straight from their owner to the position that needs
them, and only the columns it needs.

Pure index maths: no torch.distributed, no kernels here.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache

from ring_sp.band import Band
from ring_sp.documents import Documents
from ring_sp.layout import Segment, check_local_seq, segments

FULL = Band()
CAUSAL = Band(lo=0)
# Inside one document a block needs no document mask, and cuDNN computes it fastest. But PyTorch keys
# cuDNN's execution plans on exact lengths and builds new ones for every new shape, and training packs new
# document lengths into every batch. So a document's part of a block goes unmasked only on a grid: its rows
# and columns cut at multiples of DOCUMENT_GRID local indices (and at the block's own edges), which gives
# shapes from a small set that recurs every step. The rest of the part, off the grid, joins its neighbours
# in blocks masked by document (Triton). None: a document goes unmasked only where it fills a whole block.
# 0 (WHOLE): no cuts at all; a block of several documents stays one block that lists each document's rows and
# columns (``Block.runs``), for a kernel that takes document boundaries itself (cuDNN's ragged attention).
DOCUMENT_GRID: int | None = 4096
WHOLE = 0


@dataclass(frozen=True)
class Block:
    """Query rows [q_start, q_stop) attend key columns [k_start, k_stop) under ``band``.

    The band is relative to the block's own corner: row q_start + i, column k_start + j.
    ``documents``: the block spans several documents, so a cell is visible only if its row and
    column also share one (the kernel masks by document ids). ``runs`` (plans with ``WHOLE`` blocks):
    for each document the block touches, in order, how many of its query rows and key columns it holds.
    """

    q_start: int
    q_stop: int
    k_start: int
    k_stop: int
    band: Band = FULL
    documents: bool = False
    runs: tuple[tuple[int, int], ...] = ()

    @property
    def area(self) -> int:
        """Number of cells the band shows (an upper bound on the visible pairs of a document block)."""
        a, b = self.q_stop - self.q_start, self.k_stop - self.k_start
        lo = -(b - 1) if self.band.lo is None else self.band.lo
        hi = a - 1 if self.band.hi is None else self.band.hi
        return sum(max(0, min(b, i - lo + 1) - max(0, i - hi)) for i in range(a))


@dataclass(frozen=True)
class Counts:
    """What a schedule computes and what it never touches, over all positions of the ring.

    blocks: blocks computed; skipped_blocks: (query segment × key segment) pairs with nothing
    visible, never computed; passes: ring offsets computed (the local one included);
    skipped_passes: offsets at which no position has work (no compute, no transfer);
    transfers: K/V slices sent from one position to another (0: no communication at all).
    """

    blocks: int
    skipped_blocks: int
    passes: int
    skipped_passes: int
    transfers: int


@dataclass(frozen=True, eq=False)  # plan() caches schedules: identity is equality, and hashing is cheap
class Schedule:
    """``steps[s][r]``: the blocks ring position r computes at step s, whose offset is ``offsets[s]``."""

    world: int
    steps: tuple[tuple[tuple[Block, ...], ...], ...]
    offsets: tuple[int, ...] = (0,)
    skipped_blocks: int = 0
    skipped_passes: int = 0

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    def source(self, step: int, position: int) -> int:
        """The ring position whose K/V block ``position`` holds at ``step``."""
        return (position - self.offsets[step]) % self.world

    def columns(self, step: int, position: int) -> tuple[int, int] | None:
        """The key columns [start, stop) of its source that ``position`` needs at ``step`` (None: none)."""
        return self._columns[step][position]

    @cached_property
    def _columns(self) -> tuple[tuple[tuple[int, int] | None, ...], ...]:
        return tuple(tuple((min(b.k_start for b in blocks), max(b.k_stop for b in blocks)) if blocks else None
                           for blocks in step) for step in self.steps)

    @cached_property
    def counts(self) -> Counts:
        blocks = sum(len(b) for step in self.steps for b in step)
        transfers = sum(cols is not None for s in range(1, self.n_steps) for cols in self._columns[s])
        return Counts(blocks, self.skipped_blocks, self.n_steps, self.skipped_passes, transfers)

    def roles(self, position: int) -> tuple[tuple[tuple[bool, bool], ...], ...]:
        """``roles(r)[s][j]`` = (fresh, final) of block j of position r at step s.

        fresh: no earlier block of r touches any of its query rows (their state is still empty);
        final: no later block does (it may write their normalised output). Blocks run in step
        order, and in list order within a step.
        """
        return self._roles[position]

    @cached_property
    def _roles(self) -> tuple[tuple[tuple[tuple[bool, bool], ...], ...], ...]:
        # Computed once per schedule (plan() caches schedules), not on every ring call.
        return tuple(self._position_roles(r) for r in range(self.world))

    def _position_roles(self, position: int) -> tuple[tuple[tuple[bool, bool], ...], ...]:
        order = [b for step in self.steps for b in step[position]]
        spans = [(b.q_start, b.q_stop) for b in order]
        flags = []
        for n, (start, stop) in enumerate(spans):
            fresh = not any(s < stop and start < e for s, e in spans[:n])
            final = not any(s < stop and start < e for s, e in spans[n + 1:])
            flags.append((fresh, final))
        out, n = [], 0
        for step in self.steps:
            out.append(tuple(flags[n:n + len(step[position])]))
            n += len(step[position])
        return tuple(out)


def _trim(a: int, b: int, band: Band) -> Block | None:
    """The visible part of an a×b block under ``band``, or None if nothing is visible.

    With a window (``band.hi`` set) the block shrinks to the rows and columns that see
    anything; without one it keeps its corner, so strictly causal blocks stay aligned.
    """
    lo, hi = band.lo, band.hi
    if lo is not None and hi is not None and lo > hi:
        return None
    r0 = 0 if lo is None else max(0, lo)
    r1 = a if hi is None else min(a, hi + b)
    c0 = 0 if hi is None else max(0, -hi)
    c1 = b if lo is None else min(b, a - lo)
    if r0 >= r1 or c0 >= c1:
        return None
    if hi is None:
        r0, r1, c0, c1 = 0, a, 0, b
    shift = r0 - c0
    lo = None if lo is None or lo - shift <= -(c1 - c0 - 1) else lo - shift
    hi = None if hi is None or hi - shift >= r1 - r0 - 1 else hi - shift
    return Block(r0, r1, c0, c1, Band(lo, hi))


def _sub_block(block: Block, r0: int, r1: int, c0: int, c1: int, documents: bool = False) -> Block | None:
    """The visible part of rows [r0, r1) × columns [c0, c1) (local indices) of ``block``, or None."""
    shift = (r0 - block.q_start) - (c0 - block.k_start)
    lo = None if block.band.lo is None else block.band.lo - shift
    hi = None if block.band.hi is None else block.band.hi - shift
    part = _trim(r1 - r0, c1 - c0, Band(lo, hi))
    if part is None:
        return None
    return Block(part.q_start + r0, part.q_stop + r0, part.k_start + c0, part.k_stop + c0, part.band, documents)


def _segment_block(q: Segment, k: Segment, causal: bool, lookback: int | None) -> Block | None:
    """Visible part of query segment ``q`` × key segment ``k`` (same stride) in local indices.

    Query position p = q.global_start + stride·i and key position t = k.global_start + stride·j,
    so t ≤ p and p − t < lookback become bounds on i − j.
    """
    delta, stride = q.global_start - k.global_start, q.stride
    lo = -(delta // stride) if causal else None
    hi = (lookback - 1 - delta) // stride if lookback is not None else None
    block = _trim(q.length, k.length, Band(lo, hi))
    if block is None:
        return None
    return replace(
        block,
        q_start=block.q_start + q.local_start,
        q_stop=block.q_stop + q.local_start,
        k_start=block.k_start + k.local_start,
        k_stop=block.k_stop + k.local_start,
    )


def _local_range(seg: Segment, start: int, stop: int) -> tuple[int, int]:
    """The local indices [lo, hi) of ``seg`` whose global positions lie in [start, stop)."""
    first = max(0, -((seg.global_start - start) // seg.stride))
    last = min(seg.length, -((seg.global_start - stop) // seg.stride))
    return seg.local_start + first, seg.local_start + max(first, last)


def _global_span(seg: Segment, lo: int, hi: int) -> tuple[int, int]:
    """Global positions of local indices lo and hi − 1 of ``seg``."""
    at = lambda i: seg.global_start + seg.stride * (i - seg.local_start)  # noqa: E731
    return at(lo), at(hi - 1)


def _clipped(q: Segment, k: Segment, block: Block, bounds: tuple[int, ...], overlap: bool):
    """(r0, r1, c0, c1): the rows and columns of ``block`` (local indices, possibly empty) in each document, in
    order, over the documents that may hold both a row and a column of it (``overlap``) or either."""
    (q_first, q_last), (k_first, k_last) = (_global_span(q, block.q_start, block.q_stop),
                                            _global_span(k, block.k_start, block.k_stop))
    lo, hi = (max, min) if overlap else (min, max)
    first, last = lo(q_first, k_first), hi(q_last, k_last)
    for d in range(bisect.bisect_right(bounds, first) - 1, bisect.bisect_right(bounds, last)):
        r0, r1 = _local_range(q, bounds[d], bounds[d + 1])
        c0, c1 = _local_range(k, bounds[d], bounds[d + 1])
        yield max(r0, block.q_start), min(r1, block.q_stop), max(c0, block.k_start), min(c1, block.k_stop)


def _document_pieces(q: Segment, k: Segment, base: Block, bounds: tuple[int, ...]) -> list[Block]:
    """The visible part of ``base`` (a block of q × k) inside each document, in document order."""
    pieces = []
    for r0, r1, c0, c1 in _clipped(q, k, base, bounds, overlap=True):
        if r0 < r1 and c0 < c1:
            piece = _sub_block(base, r0, r1, c0, c1)
            if piece is not None:
                pieces.append(piece)
    return pieces


# A masked block starts and ends on multiples of this many local rows and columns where its neighbours
# allow: Triton specialises kernels on the divisibility of lengths and pointers by 16, and new documents
# every batch would otherwise meet new variants (seen: 12x slower).
ALIGN = 16


def _last_column(block: Block) -> int:
    """One past the last column that any row of ``block`` sees (a causal block keeps its full width)."""
    if block.band.lo is None:
        return block.k_stop
    return min(block.k_stop, block.k_start + block.q_stop - block.q_start - block.band.lo)


def _hull(base: Block, pieces: list[Block], rows: tuple[int, int]) -> Block:
    """One block over ``pieces`` (of several documents), masked by document in the kernel; its edges rounded
    outwards to multiples of ``ALIGN``, its rows inside ``rows`` (those no other block of ``base`` computes)."""
    q0, q1 = min(p.q_start for p in pieces), max(p.q_stop for p in pieces)
    k0, k1 = min(p.k_start for p in pieces), max(_last_column(p) for p in pieces)
    q0, k0 = max(rows[0], q0 - q0 % ALIGN), max(base.k_start, k0 - k0 % ALIGN)
    q1, k1 = min(rows[1], -(-q1 // ALIGN) * ALIGN), min(base.k_stop, -(-k1 // ALIGN) * ALIGN)
    block = _sub_block(base, q0, q1, k0, k1, documents=True)
    assert block is not None
    return block


def _on_grid(start: int, stop: int, edge0: int, edge1: int, grid: int | None) -> tuple[int, int]:
    """The longest [a, b) inside [start, stop) whose ends are grid points: multiples of ``grid`` or the
    block's edges ``edge0``, ``edge1`` (``grid`` None: the edges only). Empty (a >= b) if there is none."""
    a = start if start == edge0 else -(-start // grid) * grid if grid else edge1
    b = stop if stop == edge1 else stop // grid * grid if grid else edge0
    return a, b


def _group(base: Block, pieces: list[Block], grid: int | None) -> list[Block]:
    """The blocks of ``base`` for its document ``pieces`` (in document order, so in row order). Each piece's
    part on the grid gets an unmasked block; the columns beside it in the same rows, a masked block each;
    its rows above and below, with the neighbouring documents' pieces, one masked block per run."""
    out, run, free = [], [], base.q_start  # free: the first row no unmasked part has claimed

    def close(stop: int) -> None:
        if run:
            out.append(_hull(base, run, (free, stop)))
            run.clear()

    for piece in pieces:
        a, b = _on_grid(piece.q_start, piece.q_stop, base.q_start, base.q_stop, grid)
        c, d = _on_grid(piece.k_start, piece.k_stop, base.k_start, base.k_stop, grid)
        core = _sub_block(piece, a, b, c, d) if a < b and c < d else None
        if core is None:
            run.append(piece)
            continue
        above = _sub_block(piece, piece.q_start, a, piece.k_start, piece.k_stop) if piece.q_start < a else None
        run += [above] if above else []
        close(a)
        sides = [_sub_block(piece, a, b, c0, c1, documents=True) if c0 < c1 else None
                 for c0, c1 in ((piece.k_start, c), (d, piece.k_stop))]
        out += [core, *(side for side in sides if side)]
        free = b
        below = _sub_block(piece, b, piece.q_stop, piece.k_start, piece.k_stop) if b < piece.q_stop else None
        run += [below] if below else []
    close(base.q_stop)
    return out


def _runs(q: Segment, k: Segment, block: Block, bounds: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """(query rows, key columns) of ``block`` in each document that holds any of them, in document order."""
    runs = ((max(0, r1 - r0), max(0, c1 - c0)) for r0, r1, c0, c1 in _clipped(q, k, block, bounds, overlap=False))
    return tuple(run for run in runs if any(run))


def _segment_blocks(q: Segment, k: Segment, causal: bool, lookback: int | None, documents: Documents | None,
                    grid: int | None) -> list[Block]:
    base = _segment_block(q, k, causal, lookback)
    if base is None or documents is None:
        return [] if base is None else [base]
    per_element = [_document_pieces(q, k, base, bounds) for bounds in documents]
    if len(documents) == 1 and grid == WHOLE:
        pieces = per_element[0]
        if len(pieces) < 2:  # inside one document (or none): no mask needed
            return pieces
        return [replace(base, documents=True, runs=_runs(q, k, base, documents[0]))]
    if len(documents) == 1:
        return _group(base, per_element[0], grid)
    pieces = [p for ps in per_element for p in ps]  # boundaries differ across the batch: one masked block
    return [_hull(base, pieces, (base.q_start, base.q_stop))] if pieces else []


def _merge_full(blocks: list[Block]) -> list[Block]:
    """Join full blocks that share rows and touch in columns, or share columns and touch in rows."""
    blocks = sorted(blocks, key=lambda b: (b.q_start, b.k_start))
    merged = True
    while merged:
        merged = False
        for i, x in enumerate(blocks):
            for j, y in enumerate(blocks):
                if i == j or x.band != FULL or y.band != FULL or x.documents or y.documents:
                    continue
                same_rows = (x.q_start, x.q_stop) == (y.q_start, y.q_stop) and x.k_stop == y.k_start
                same_cols = (x.k_start, x.k_stop) == (y.k_start, y.k_stop) and x.q_stop == y.q_start
                if same_rows or same_cols:
                    joined = Block(x.q_start, y.q_stop, x.k_start, y.k_stop)
                    blocks = [b for n, b in enumerate(blocks) if n not in (i, j)] + [joined]
                    blocks.sort(key=lambda b: (b.q_start, b.k_start))
                    merged = True
                    break
            if merged:
                break
    return blocks


def _position_blocks(layout: str, world: int, local_seq: int, position: int, source: int, causal: bool,
                     lookback: int | None, documents: Documents | None, grid: int | None
                     ) -> tuple[tuple[Block, ...], int]:
    """(blocks of ``position`` against ``source``'s K/V, segment pairs with nothing visible)."""
    found, skipped = [], 0
    for q in segments(layout, position, world, local_seq):
        for k in segments(layout, source, world, local_seq):
            blocks = _segment_blocks(q, k, causal, lookback, documents, grid)
            skipped += not blocks
            found += blocks
    if documents is None and not causal:
        return (Block(0, local_seq, 0, local_seq),), skipped
    if documents is None and source == position and lookback is None:
        # Local positions increase with the local index in every layout: causal in global
        # positions is causal in local indices, so one causal block covers the pairs.
        return (Block(0, local_seq, 0, local_seq, CAUSAL),), skipped
    return tuple(_merge_full(found)), skipped


@lru_cache(maxsize=256)
def plan(
    layout: str,
    world: int,
    local_seq: int,
    *,
    causal: bool = False,
    lookback: int | None = None,
    reduce_col: bool = True,
    documents: Documents | None = None,
    document_grid: int | None = DOCUMENT_GRID,
) -> Schedule:
    """The schedule of a ring of ``world`` positions, each holding ``local_seq`` tokens.

    ``lookback`` (needs ``causal``): key t is visible to query p only if p − t < lookback.
    ``reduce_col=False``: each position attends only to its own K/V block. ``documents``
    (from ``ring_sp.documents.check_documents``): a key is visible only inside its query's document.
    ``document_grid``: where a document's part of a block is cut for an unmasked block (see ``DOCUMENT_GRID``;
    ``WHOLE``: never, blocks carry their documents' ``runs``).
    """
    check_local_seq(layout, local_seq, world)
    if document_grid is not None and (not isinstance(document_grid, int) or document_grid < 0):
        raise ValueError(f"document_grid={document_grid!r}: use a positive number of rows, None (unmasked only where "
                         "a document fills a block) or 0 (WHOLE: no cuts)")
    if lookback is not None and (not causal or lookback < 1):
        raise ValueError("lookback needs causal=True and a value of at least 1")
    candidates = world if reduce_col else 1
    steps, offsets, skipped = [], [], 0
    for offset in range(candidates):
        step = []
        for r in range(world):
            blocks, n = _position_blocks(layout, world, local_seq, r, (r - offset) % world, causal, lookback,
                                         documents, document_grid)
            step.append(blocks)
            skipped += n
        if offset == 0 or any(step):
            steps.append(tuple(step))
            offsets.append(offset)
    return Schedule(world, tuple(steps), tuple(offsets), skipped, candidates - len(offsets))
