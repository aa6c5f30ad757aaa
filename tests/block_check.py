"""Check one block backend against the float64 reference: forward (continuing a state) and backward."""

from __future__ import annotations

import torch

from ring_sp import kernels
from ring_sp.kernels import Band, BlockDocuments, State, Visibility
from tests.reference import rel_err


def band_pairs(sq: int, sk: int, band: Band) -> torch.Tensor:
    d = torch.arange(sq)[:, None] - torch.arange(sk)[None, :]
    ok = torch.ones(sq, sk, dtype=torch.bool)
    if band.lo is not None:
        ok &= d >= band.lo
    if band.hi is not None:
        ok &= d <= band.hi
    return ok


def random_documents(batch: int, n: int, generator: torch.Generator, most: int = 4) -> torch.Tensor:
    """(batch, n) int32 non-decreasing document ids, a different split per batch element."""
    return torch.sort(torch.randint(0, most, (batch, n), generator=generator), dim=1).values.to(torch.int32)


def listed_documents(sq: int, sk: int, generator: torch.Generator, same: bool):
    """Document ids shared by both batch elements, with their runs (rows, columns of each document, in order):
    every document with rows has columns; ``same``: each document's rows and columns coincide (sq == sk)."""
    q_doc = random_documents(1, sq, generator)[0]
    if same:
        k_doc = q_doc.clone()
    else:  # every document of the rows gets at least one column, and there may be one with columns only
        present = sorted(set(q_doc.tolist()) | {int(q_doc.max()) + 1})
        k_doc = torch.tensor(present + torch.randint(0, len(present), (sk - len(present),), generator=generator)
                             .apply_(lambda i: present[i]).tolist(), dtype=torch.int32).sort().values
    touched = sorted(set(q_doc.tolist()) | set(k_doc.tolist()))
    runs = tuple((int((q_doc == d).sum()), int((k_doc == d).sum())) for d in touched)
    return q_doc.expand(2, sq).contiguous(), k_doc.expand(2, sk).contiguous(), runs


def _allowed(vis, mask):
    """(batch or 1, 1, sq, sk) bool from visibility (sq, sk) or (batch, sq, sk) and a key mask."""
    ok = (vis if vis.dim() == 3 else vis[None])[:, None]
    return ok if mask is None else ok & mask[:, None, None, :]


def _dense(q, k, v, vis, mask, scale):
    """float64 attention of q over keys k/v with visibility vis ((batch,) sq, sk) and key mask; (out, lse)."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    ok = _allowed(vis, mask)
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, float("inf"))[..., None])
    return torch.einsum("bhij,bjhd->bihd", p, v), lse


def check_block(backend_name: str, *, sq: int, sk: int, heads: int, kv_heads: int, head_dim: int, band: Band,
                masked: bool, dtype: torch.dtype, device: str = "cpu", seed: int = 0,
                bucket_size: int | None = None, documents: bool | str = False) -> dict[str, float]:
    """Relative errors of out, lse, dq, dk, dv for two K/V blocks folded one after the other.

    The first block is full (it starts the state: ``fresh``), the second has ``band`` (and, with
    ``documents``, random document ids per row and column, different per batch element; ``"runs"``: the same
    in both elements, listed as the schedule's WHOLE blocks list them, each document's rows and columns
    at the same offsets under a causal band): the backend
    must continue the state the first left. "written": the second block again, from the same
    state, writing the normalised output itself (``out``, the rows' last block); "alone": the
    second block as the only one (fresh and last, as at W = 1). The backward is checked for the
    second block alone, given the final out and lse, as the ring calls it.
    """
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    q = rnd(2, sq, heads, head_dim)
    k1, v1 = rnd(2, sk, kv_heads, head_dim), rnd(2, sk, kv_heads, head_dim)
    k2, v2 = rnd(2, sk, kv_heads, head_dim), rnd(2, sk, kv_heads, head_dim)
    do = rnd(2, sq, heads, head_dim)
    mask = (torch.rand(2, sk, generator=g) > 0.25) if masked else None
    if masked:
        mask[0, : sk // 2] = False
    q_doc, k_doc, runs = None, None, ()
    if documents == "runs":
        q_doc, k_doc, runs = listed_documents(sq, sk, g, same=band.lo is not None)
    elif documents:
        q_doc, k_doc = (random_documents(2, n, g) for n in (sq, sk))
    scale = head_dim ** -0.5
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    qc, k1c, v1c, k2c, v2c, doc = map(cast, (q, k1, v1, k2, v2, do))
    mask_c = None if mask is None else mask.to(device)
    first = Visibility(Band(), mask_c)
    second = Visibility(band, mask_c,
                        None if q_doc is None else BlockDocuments(q_doc.to(device), k_doc.to(device), runs))
    backend = kernels.get(backend_name, bucket_size)
    state = State.empty(qc)
    backend.forward(qc, k1c, v1c, state, first, scale, fresh=True)
    after_first = State(state.acc.clone(), state.m.clone(), state.lse.clone())
    backend.forward(qc, k2c, v2c, state, second, scale)
    out = state.output()
    written = torch.full_like(qc, float("nan"))
    backend.forward(qc, k2c, v2c, after_first, second, scale, out=written)
    alone, alone_state = torch.full_like(qc, float("nan")), State.empty(qc)
    backend.forward(qc, k2c, v2c, alone_state, second, scale, fresh=True, out=alone)

    # Reference: both blocks at once (keys concatenated), visibility per block.
    vis2 = band_pairs(sq, sk, band)
    if q_doc is not None:
        vis2 = vis2[None] & (q_doc[:, :, None] == k_doc[:, None, :])
    vis = torch.cat([torch.ones_like(vis2), vis2], -1)
    kk, vv = torch.cat([k1, k2], 1), torch.cat([v1, v2], 1)
    mm = None if mask is None else torch.cat([mask, mask], 1)
    ref_out, ref_lse = _dense(q, kk, vv, vis, mm, scale)
    ref_alone, ref_alone_lse = _dense(q, k2, v2, vis2, mask, scale)
    errors = {"out": rel_err(out.cpu(), ref_out), "written": rel_err(written.cpu(), ref_out),
              "alone": rel_err(alone.cpu(), ref_alone)}
    for key, lse, ref in (("lse", state.lse, ref_lse), ("written lse", after_first.lse, ref_lse),
                          ("alone lse", alone_state.lse, ref_alone_lse)):
        finite = torch.isfinite(ref)
        same_support = torch.equal(torch.isfinite(lse.cpu()), finite)
        errors[key] = rel_err(lse.cpu()[finite], ref[finite]) if same_support else float("inf")

    # Backward of the second block given the final out/lse, against autograd of the dense form.
    qr, k2r, v2r = (t.clone().requires_grad_() for t in (q, k2, v2))
    s = _dense_scores(qr, torch.cat([k1, k2r], 1), vis, mm, scale)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    g2 = q.shape[2] // k1.shape[2]
    out_r = torch.einsum("bhij,bjhd->bihd", p, torch.cat([v1, v2r], 1).repeat_interleave(g2, 2))
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(out_r, (qr, k2r, v2r), do)
    # dq of block 2 alone: total dq minus block 1's share (computed from the dense form too).
    ref_dq1 = _dq_of_block(q, k1, v1, do, ref_out, ref_lse, torch.ones(sq, sk, dtype=torch.bool), mask, scale)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out_c = out.to(dtype)
    delta = (doc.to(acc) * out_c.to(acc)).sum(-1).transpose(1, 2)
    dq = torch.zeros(qc.shape, dtype=acc, device=device)
    dk = torch.zeros(k2c.shape, dtype=acc, device=device)
    dv = torch.zeros(v2c.shape, dtype=acc, device=device)
    backend.backward(doc, qc, k2c, v2c, out_c, state.lse, delta, dq, dk, dv, second, scale)
    errors["dq"] = rel_err(dq.cpu(), ref_dq - ref_dq1)
    errors["dk"] = rel_err(dk.cpu(), ref_dk)
    errors["dv"] = rel_err(dv.cpu(), ref_dv)
    return errors


def _dense_scores(q, k, vis, mask, scale):
    g = q.shape[2] // k.shape[2]
    s = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(g, 2)) * scale
    return s.masked_fill(~_allowed(vis, mask), float("-inf"))


def _dq_of_block(q, k, v, do, out, lse, vis, mask, scale):
    """dq contributed by one block given the final out and lse (float64, the flash backward formula)."""
    g = q.shape[2] // k.shape[2]
    kr, vr = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = _dense_scores(q, k, vis, mask, scale)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, float("inf"))[..., None])
    dp = torch.einsum("bihd,bjhd->bhij", do, vr)
    delta = (do * out).sum(-1).transpose(1, 2)
    ds = p * (dp - delta[..., None]) * scale
    return torch.einsum("bhij,bjhd->bihd", ds, kr)


BANDS = [Band(), Band(lo=0), Band(lo=1), Band(lo=-3), Band(lo=2, hi=9), Band(hi=4), Band(lo=-5, hi=-1)]
