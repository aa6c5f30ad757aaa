"""The ring's per-step schedule: which blocks of attention each ring position computes.

At ring step s, position r holds the K/V block that started on position (r − s) mod W. Its
work at that step is a list of :class:`Block` s: a rectangle of its local query rows × the
block's local key columns, with a :class:`Band` saying which cells are visible. Fully masked
rectangles never appear, and steps after the last one that carries visible work are dropped.

Pure index math: no torch.distributed here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property, lru_cache

from ring_sp.kernels.band import Band
from ring_sp.layout import Segment, check_local_seq, segments

FULL = Band()
CAUSAL = Band(lo=0)


@dataclass(frozen=True)
class Block:
    """Query rows [q_start, q_stop) attend key columns [k_start, k_stop) under ``band``.

    The band is relative to the block's own corner: row q_start + i, column k_start + j.
    """

    q_start: int
    q_stop: int
    k_start: int
    k_stop: int
    band: Band = FULL

    @property
    def area(self) -> int:
        """Number of visible (query, key) pairs."""
        a, b = self.q_stop - self.q_start, self.k_stop - self.k_start
        lo = -(b - 1) if self.band.lo is None else self.band.lo
        hi = a - 1 if self.band.hi is None else self.band.hi
        return sum(max(0, min(b, i - lo + 1) - max(0, i - hi)) for i in range(a))


@dataclass(frozen=True)
class Schedule:
    """``steps[s][r]``: the blocks ring position r computes at step s."""

    world: int
    steps: tuple[tuple[tuple[Block, ...], ...], ...]

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    def source(self, step: int, position: int) -> int:
        """The ring position whose K/V block ``position`` holds at ``step``."""
        return (position - step) % self.world

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

        def meets(x: Block, y: Block) -> bool:
            return x.q_start < y.q_stop and y.q_start < x.q_stop

        flags = [(not any(meets(b, a) for a in order[:n]), not any(meets(b, a) for a in order[n + 1:]))
                 for n, b in enumerate(order)]
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


def _merge_full(blocks: list[Block]) -> list[Block]:
    """Join full blocks that share rows and touch in columns, or share columns and touch in rows."""
    blocks = sorted(blocks, key=lambda b: (b.q_start, b.k_start))
    merged = True
    while merged:
        merged = False
        for i, x in enumerate(blocks):
            for j, y in enumerate(blocks):
                if i == j or x.band != FULL or y.band != FULL:
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


def _position_blocks(
    layout: str, world: int, local_seq: int, position: int, source: int, causal: bool, lookback: int | None
) -> tuple[Block, ...]:
    if not causal:
        return (Block(0, local_seq, 0, local_seq),)
    if source == position and lookback is None:
        # Local positions increase with the local index in every layout: causal in global
        # positions is causal in local indices.
        return (Block(0, local_seq, 0, local_seq, CAUSAL),)
    q_segs = segments(layout, position, world, local_seq)
    k_segs = segments(layout, source, world, local_seq)
    found = [_segment_block(q, k, causal, lookback) for q in q_segs for k in k_segs]
    return tuple(_merge_full([b for b in found if b is not None]))


@lru_cache(maxsize=256)
def plan(
    layout: str,
    world: int,
    local_seq: int,
    *,
    causal: bool = False,
    lookback: int | None = None,
    reduce_col: bool = True,
) -> Schedule:
    """The schedule of a ring of ``world`` positions, each holding ``local_seq`` tokens.

    ``lookback`` (needs ``causal``): key t is visible to query p only if p − t < lookback.
    ``reduce_col=False``: each position attends only to its own K/V block.
    """
    check_local_seq(layout, local_seq, world)
    if lookback is not None and (not causal or lookback < 1):
        raise ValueError("lookback needs causal=True and a value of at least 1")
    n_candidates = world if reduce_col else 1
    steps = [
        tuple(
            _position_blocks(layout, world, local_seq, r, (r - s) % world, causal, lookback)
            for r in range(world)
        )
        for s in range(n_candidates)
    ]
    last = max(s for s, step in enumerate(steps) if s == 0 or any(step))
    return Schedule(world, tuple(steps[: last + 1]))
