"""Every variant of ring attention as a list of cases, each checked against the float64 reference.

Used in-process (simulated ring) and inside gloo workers (distributed ring). Each rank compares
its own shard of out, dq, dk, dv with the same shard of the dense reference on the full
sequence of its ring.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ring_sp import local_positions, ring_attention, ring_attention_simulated, schedule, split
from ring_sp.documents import check_documents, document_ids
from tests.reference import make_inputs, reference_grads, rel_err

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
# Relative error bounds against the float64 reference. float64 and float32: the accumulation
# precision. bfloat16: a multiple of the error of the same dense attention computed in bf16 (at
# least 1e-3). The median ratio is ~0.6; the worst, ~2.1, comes from queries that see one or two
# keys, where dq and dk nearly cancel and delta = rowsum(dO·O) is taken from the bf16 output we
# return (as flash-attention and PyTorch's SDPA do), hence the factor 3.
BOUNDS = {"float64": 1e-10, "float32": 1e-5}
BF16_FACTOR = 3.0
LOCAL_SEQ, BATCH, HEADS, HEAD_DIM, BUCKET = 6, 2, 4, 8, 4


@dataclass(frozen=True)
class Case:
    layout: str
    causal: bool
    masked: bool
    gqa: bool
    lookback: int | None
    reduce_col: bool
    ring_size: int | None
    dtype: str
    documents: str | None = None  # a pattern of DOCUMENTS
    grid: int | None = schedule.DOCUMENT_GRID  # the schedule's document grid

    def __str__(self):
        docs = "" if self.documents is None else f" documents={self.documents} grid={self.grid}"
        return (f"{self.layout} causal={self.causal} mask={self.masked} gqa={self.gqa} lookback={self.lookback} "
                f"reduce_col={self.reduce_col} ring_size={self.ring_size} {self.dtype}{docs}")


def cases(world: int, dtypes=tuple(DTYPES), lookbacks=(5, 13), ring_sizes=None) -> list[Case]:
    if ring_sizes is None:
        ring_sizes = [None] + [r for r in range(1, world) if world % r == 0]
    out = []
    for layout, causal, masked, gqa, lookback, reduce_col, ring_size, dtype in itertools.product(
            ("contiguous", "striped", "zigzag"), (False, True), (False, True), (False, True), (None, *lookbacks),
            (True, False), ring_sizes, dtypes):
        if lookback is None or causal:
            out.append(Case(layout, causal, masked, gqa, lookback, reduce_col, ring_size, dtype))
    return out


DOCUMENTS = ("random", "ones", "whole", "coprime", "per_batch")


def _random_bounds(seq: int, rng: random.Random) -> list[int]:
    """Boundaries with random lengths 1–9 (length 1 included)."""
    bounds = [0]
    while bounds[-1] < seq:
        bounds.append(min(seq, bounds[-1] + rng.choice([1, 1, 2, 3, 5, 7, 9])))
    return bounds


def cu_seqlens(pattern: str | None, seq: int, seed: int):
    """The ``cu_seqlens`` argument of a document pattern over a sequence of ``seq`` tokens."""
    rng = random.Random(seed)
    if pattern is None:
        return None
    if pattern == "random":
        return _random_bounds(seq, rng)
    if pattern == "ones":
        return torch.arange(seq + 1)  # as a tensor, to cover that form
    if pattern == "whole":
        return (0, seq)
    if pattern == "coprime":  # 5 and 7 are coprime with 2·W for every W here
        bounds = [0]
        while bounds[-1] < seq:
            bounds.append(min(seq, bounds[-1] + (5, 7)[len(bounds) % 2]))
        return bounds
    assert pattern == "per_batch"
    return [_random_bounds(seq, rng) for _ in range(BATCH)]


def document_cases(dtypes=("float64",), ring_sizes=(None,)) -> list[Case]:
    """Documents with every layout, causal or not, each pattern; masks, GQA, windows, local attention and
    the document grid rotate over the cases (all of them, not their product)."""
    out = []
    for n, (layout, causal, pattern, dtype, ring_size) in enumerate(itertools.product(
            ("contiguous", "striped", "zigzag"), (False, True), DOCUMENTS, dtypes, ring_sizes)):
        lookback = (None, 4, None, 9)[n % 4] if causal else None
        out.append(Case(layout, causal, n % 2 == 0, n % 3 == 0, lookback, n % 5 != 4, ring_size, dtype, pattern,
                        (1, 2, 10**6, None)[(n // 2) % 4]))
    return out


def _visible_pairs(case: Case, world: int, seed: int = 0) -> torch.Tensor:
    seq = world * LOCAL_SEQ
    pos = torch.arange(seq)
    vis = torch.ones(seq, seq, dtype=torch.bool)
    if case.causal:
        vis &= pos[:, None] >= pos[None, :]
    if case.lookback is not None:
        vis &= pos[:, None] - pos[None, :] < case.lookback
    if not case.reduce_col:
        owner = torch.empty(seq, dtype=torch.long)
        for r in range(world):
            owner[local_positions(seq, case.layout, r, world)] = r
        vis &= owner[:, None] == owner[None, :]
    docs = check_documents(cu_seqlens(case.documents, seq, seed), BATCH, seq)
    if docs is not None:
        ids = torch.stack([document_ids(b, pos) for b in docs])
        vis = vis[None] & (ids[:, :, None] == ids[:, None, :])
    return vis


def ring_problem(case: Case, world: int, seed: int):
    """Full-sequence inputs of one ring and the reference results (float64, and the dtype's own)."""
    dtype = DTYPES[case.dtype]
    q, k, v, mask, do = make_inputs(BATCH, world * LOCAL_SEQ, HEADS, 2 if case.gqa else HEADS, HEAD_DIM, dtype,
                                    masked=case.masked, seed=seed)
    vis = _visible_pairs(case, world, seed)
    ref = reference_grads(q, k, v, do, mask=mask, visible_pairs=vis)
    own = reference_grads(q, k, v, do, mask=mask, visible_pairs=vis, dtype=dtype) if case.dtype == "bfloat16" else None
    return (q, k, v, mask, do), ref, own


# Documents of length 1: each query sees one key, so the exact dq and dk are 0 and what is compared is
# rounding noise: dp = do·v (kernel) against delta = rowsum(do·out) (a separate pass), as in every
# flash-style backward; in float32 that noise is ~1e-7 of |do||v|, about 1e-4 of the test's zero floor.
SINGLE_KEY_FLOAT32 = 2e-4


def _bounds(case: Case, world: int, ref, own) -> list[float]:
    if case.dtype == "float32" and case.documents == "ones":
        return [BOUNDS["float32"], SINGLE_KEY_FLOAT32, SINGLE_KEY_FLOAT32, BOUNDS["float32"]]
    if case.dtype != "bfloat16":
        return [BOUNDS[case.dtype]] * 4
    # bf16: the error of the same dense attention computed in bf16, per tensor, times a factor.
    return [BF16_FACTOR * max(rel_err(o, r), 1e-3) for o, r in zip(own, ref)]


def _shards(case: Case, world: int, tensors):
    return [None if t is None else split(t, case.layout, world) for t in tensors]


def _simulated(case: Case, world: int, inputs, backend: str = "auto", seed: int = 0):
    """out, dq, dk, dv of every position, from the simulated ring."""
    schedule.DOCUMENT_GRID = case.grid
    q, k, v, mask, do = inputs
    qs, ks, vs, ms, dos = _shards(case, world, inputs)
    qs = [t.clone().requires_grad_() for t in qs]
    ks = [t.clone().requires_grad_() for t in ks]
    vs = [t.clone().requires_grad_() for t in vs]
    outs = ring_attention_simulated(qs, ks, vs, masks=ms, causal=case.causal, layout=case.layout,
                                    ring_reduce_col=case.reduce_col, bucket_size=BUCKET,
                                    max_lookback_seq_len=case.lookback, backend=backend,
                                    cu_seqlens=cu_seqlens(case.documents, world * LOCAL_SEQ, seed))
    torch.autograd.backward(outs, dos)
    return [(o.detach(), q_.grad, k_.grad, v_.grad) for o, q_, k_, v_ in zip(outs, qs, ks, vs)]


def check_simulated(case: Case, world: int, seed: int = 0, backend: str = "auto") -> list[str]:
    """Failures (empty if none) of the simulated ring of ``world`` positions on ``case``."""
    inputs, ref, own = ring_problem(case, world, seed)
    ref_shards = _shards(case, world, ref)
    bounds = _bounds(case, world, ref, own)
    blind = _shards(case, world, [_blind_queries(case, world, inputs[3], seed)])[0]
    failures = []
    for r, got in enumerate(_simulated(case, world, inputs, backend, seed)):
        for name, g, want, bound in zip(("out", "dq", "dk", "dv"), got, (s[r] for s in ref_shards), bounds):
            err = rel_err(g, want)
            if not err <= bound:
                failures.append(f"{case} W={world} position {r} {name}: rel err {err:.2e} > {bound:.2e}")
        failures += [f"{case} W={world} position {r}: {x}" for x in _zero_where_blind(got, blind[r])]
    return failures


def _blind_queries(case: Case, world: int, mask, seed: int) -> torch.Tensor:
    """(batch, seq) bool: queries that see no key at all."""
    vis = _visible_pairs(case, world, seed)
    vis = vis if vis.dim() == 3 else vis[None].expand(BATCH, -1, -1)
    if mask is not None:
        vis = vis & mask[:, None, :]
    return ~vis.any(-1)


def _zero_where_blind(got, blind: torch.Tensor) -> list[str]:
    """Queries that see nothing must get exactly 0 output and 0 dq (not NaN, not noise)."""
    out, dq = got[0], got[1]
    bad = []
    for name, t in (("out", out), ("dq", dq)):
        if blind.any() and not bool((t[blind] == 0).all()):
            bad.append(f"{name} is not exactly 0 on the {int(blind.sum())} queries that see no key")
    return bad


def run_distributed(case_list: list[Case]) -> list[tuple[str, list[float], list[float], float, list[str]]]:
    """On every rank of the world: each case over real gloo rings; per case this rank's
    (case, errors of out/dq/dk/dv, their bounds, max |distributed − simulated|, failures on queries
    that see no key)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    results = []
    for case in case_list:
        size = case.ring_size or world
        ring, position = rank // size, rank % size
        seed = 1000 * ring + 7
        schedule.DOCUMENT_GRID = case.grid
        inputs, ref, own = ring_problem(case, size, seed=seed)
        mine = [None if s is None else s[position] for s in _shards(case, size, inputs)]
        q, k, v, mask, do = mine
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out = ring_attention(q, k, v, causal=case.causal, mask=mask, layout=case.layout,
                             ring_reduce_col=case.reduce_col, bucket_size=BUCKET,
                             max_lookback_seq_len=case.lookback, ring_size=case.ring_size,
                             cu_seqlens=cu_seqlens(case.documents, size * LOCAL_SEQ, seed))
        out.backward(do)
        got = (out.detach(), q.grad, k.grad, v.grad)
        want = [s[position] for s in _shards(case, size, ref)]
        sim = _simulated(case, size, inputs, seed=seed)[position]
        gap = max((g.double() - s.double()).abs().max().item() for g, s in zip(got, sim))
        blind = _shards(case, size, [_blind_queries(case, size, inputs[3], seed)])[0][position]
        results.append((str(case), [rel_err(g, w) for g, w in zip(got, want)], _bounds(case, size, ref, own), gap,
                        _zero_where_blind(got, blind)))
    return results


def zigzag_matches_megatron(seq: int) -> bool:
    """Megatron-core's own context-parallel batch split equals our zigzag positions on this rank."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    tokens = torch.arange(seq).repeat(2, 1)
    got = get_batch_on_this_cp_rank({"tokens": tokens}, cp_group=dist.group.WORLD)["tokens"]
    want = local_positions(seq, "zigzag", dist.get_rank(), dist.get_world_size())
    return bool(torch.equal(got[0], want) and torch.equal(got[1], want))
