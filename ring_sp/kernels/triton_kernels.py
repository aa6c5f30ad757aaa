"""Triton kernels for one block of attention: a forward that continues a float32 state, and a backward.

Visibility of key column j to query row i (both relative to the block's corner) is the band
lo ≤ i − j ≤ hi (HAS_LO / HAS_HI say which bounds exist), optionally and-ed with a key mask and,
for blocks that span several documents (HAS_DOCS), with "row and column share a document".
Column (or row) tiles wholly inside the band run without any masking; tiles wholly outside are
never visited. With documents, a row tile visits only the column tiles between the first column
of its first row's document and the last column of its last row's document (and a column tile
likewise), so tiles that share no document are skipped. Document ids are int32 (batch, length)
contiguous arrays; KLo/KHi (per row) and QLo/QHi (per column) give the other axis's range of the
document. Scores are kept in base 2 (scale · log2 e) so the kernels use exp2.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _band_ok(rows, cols, lo, hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """(rows × cols) bool: lo ≤ row − col ≤ hi."""
    d = rows[:, None] - cols[None, :]
    ok = d == d
    if HAS_LO:
        ok &= d >= lo
    if HAS_HI:
        ok &= d <= hi
    return ok


@triton.jit
def _visible(rows, cols, SK, lo, hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """The band and-ed with the column bound cols < SK."""
    return _band_ok(rows, cols, lo, hi, HAS_LO, HAS_HI) & (cols < SK)[None, :]


@triton.jit
def _band_ranges(start, BLOCK_ACROSS: tl.constexpr, BLOCK_ALONG: tl.constexpr, n_along, lo, hi,
                 HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, ROWS: tl.constexpr):
    """Where a tile of BLOCK_ACROSS rows (ROWS) or columns (not ROWS) starting at ``start`` meets the
    band along the other axis (length n_along): tiles in [first, full_first) and [full_last, last)
    need masking, tiles in [full_first, full_last) are visible in every cell. All ≥ 0, the inner
    bounds aligned to BLOCK_ALONG."""
    first = 0
    last = n_along
    full_first = 0
    full_last = n_along
    if ROWS:  # rows i ∈ [start, start + B) see columns i − hi ≤ j ≤ i − lo
        if HAS_HI:
            first = start - hi
            full_first = start + BLOCK_ACROSS - 1 - hi
        if HAS_LO:
            last = start + BLOCK_ACROSS - lo
            full_last = start - lo + 1
    else:  # columns j ∈ [start, start + B) are seen by rows j + lo ≤ i ≤ j + hi
        if HAS_LO:
            first = start + lo
            full_first = start + BLOCK_ACROSS - 1 + lo
        if HAS_HI:
            last = start + BLOCK_ACROSS + hi
            full_last = start + hi + 1
    last = tl.minimum(tl.maximum(last, 0), n_along)
    first = tl.minimum(tl.maximum(first, 0), last)
    first = (first // BLOCK_ALONG) * BLOCK_ALONG
    full_first = tl.minimum(tl.maximum(full_first, first), last)
    full_first = tl.minimum(((full_first + BLOCK_ALONG - 1) // BLOCK_ALONG) * BLOCK_ALONG, tl.maximum(last, first))
    full_last = tl.minimum(tl.maximum(full_last, full_first), n_along)
    full_last = tl.maximum((full_last // BLOCK_ALONG) * BLOCK_ALONG, full_first)
    full_last = tl.minimum(full_last, tl.maximum(last, full_first))
    last = tl.maximum(last, full_last)
    return first, full_first, full_last, last


@triton.jit
def _document_range(start, BLOCK_ACROSS: tl.constexpr, BLOCK_ALONG: tl.constexpr, n_across, Lo, Hi, first, last):
    """[first, last) narrowed to the tiles along the other axis that share a document with the tile of
    BLOCK_ACROSS rows (or columns) at ``start``: from its first element's document start to its last
    element's document end (Lo/Hi already offset to the batch element)."""
    d_first = tl.load(Lo + start)
    d_last = tl.load(Hi + tl.minimum(start + BLOCK_ACROSS, n_across) - 1)
    return tl.maximum(first, (d_first // BLOCK_ALONG) * BLOCK_ALONG), tl.minimum(last, d_last)


@triton.jit
def _row_block(HAS_LO: tl.constexpr):
    """This program's block of query rows. Under a causal bound (lo) the last rows see the most
    keys: launch them first so the grid does not end on a tail of long programs."""
    if HAS_LO:
        return tl.num_programs(0) - 1 - tl.program_id(0)
    return tl.program_id(0)


@triton.jit
def _row_program(H, G, SQ, D, HAS_LO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (batch, head, K/V head, first row, rows, head_dim offsets, row mask, tile mask) of a
    program that owns a block of query rows (grid: row blocks × batch·heads)."""
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    m0 = _row_block(HAS_LO) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < SQ
    return b, h, h // G, m0, offs_m, offs_d, row_ok, row_ok[:, None] & (offs_d[None, :] < D)


@triton.jit
def _row_scores(q, k, rows, cols, mask_base, stride_ms, q_docs, kdoc_base, SK, scale2, lo, hi, BAND: tl.constexpr,
                HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOCS: tl.constexpr,
                IEEE: tl.constexpr):
    """Base-2 scores q · kᵀ of a (rows × cols) tile, −inf where the band (if BAND), the key mask or a
    document boundary hides a key."""
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee") * scale2
    else:
        qk = tl.dot(q, tl.trans(k)) * scale2
    if BAND:
        qk = tl.where(_visible(rows, cols, SK, lo, hi, HAS_LO, HAS_HI), qk, float("-inf"))
    if HAS_MASK:
        keep = tl.load(mask_base + cols * stride_ms, mask=cols < SK, other=0)
        qk = tl.where(keep[None, :] != 0, qk, float("-inf"))
    if HAS_DOCS:
        k_docs = tl.load(kdoc_base + cols, mask=cols < SK, other=-2)
        qk = tl.where(q_docs[:, None] == k_docs[None, :], qk, float("-inf"))
    return qk


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, mask_base, stride_ks, stride_vs, stride_ms, q_docs, kdoc_base,
               offs_m, offs_d, start, end, SK, D, scale2, lo, hi,
               BAND: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_MASK: tl.constexpr,
               HAS_DOCS: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        if BAND:
            kv_mask = (cols[:, None] < SK) & (offs_d[None, :] < D)
        else:
            kv_mask = offs_d[None, :] < D
        if EVEN_D and not BAND:
            k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :])
        else:
            k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = _row_scores(q, k, offs_m, cols, mask_base, stride_ms, q_docs, kdoc_base, SK, scale2, lo, hi,
                         BAND, HAS_LO, HAS_HI, HAS_MASK, HAS_DOCS, IEEE)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if EVEN_D and not BAND:
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :])
        else:
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            acc += tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


# Band bounds vary from block to block: a variant per divisibility class would cost seconds of
# compilation per new band for no gain. Lengths stay specialised: their divisibility lets the
# compiler vectorise the masked loads (seen on the H100: without it the backward lost ~10%).
_VARYING = ["lo", "hi"]


@triton.jit(do_not_specialize=_VARYING)
def forward_kernel(Q, K, V, Mask, Acc, M, Lse, Out, QDoc, KDoc, KLo, KHi,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                   stride_mb, stride_ms, stride_ab, stride_as, stride_ah, stride_lb, stride_lh, stride_ls,
                   stride_ob, stride_os, stride_oh,
                   H, G, SQ, SK, D, scale2, lo, hi,
                   HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOCS: tl.constexpr,
                   EVEN_D: tl.constexpr, IEEE: tl.constexpr, LOAD_ACCUMULATED: tl.constexpr, NORMALIZE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fold one K/V block into the state (Acc, M, Lse). LOAD_ACCUMULATED: continue the stored state
    (else it holds no keys yet and is not read). NORMALIZE: the rows' last block: write the
    normalised output to Out (its dtype) instead of Acc; M and Lse are stored either way."""
    b, h, hk, m0, offs_m, offs_d, row_ok, qd_mask = _row_program(H, G, SQ, D, HAS_LO, BLOCK_M, BLOCK_D)

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :], mask=qd_mask,
                other=0.0)
    acc_ptrs = Acc + b * stride_ab + h * stride_ah + offs_m[:, None] * stride_as + offs_d[None, :]
    stat = b * stride_lb + h * stride_lh + offs_m * stride_ls
    if LOAD_ACCUMULATED:
        acc = tl.load(acc_ptrs, mask=qd_mask, other=0.0)
        m_i = tl.load(M + stat, mask=row_ok, other=float("-inf")) * 1.4426950408889634
        lse2 = tl.load(Lse + stat, mask=row_ok, other=float("-inf")) * 1.4426950408889634
        l_i = tl.where(m_i == float("-inf"), 0.0, tl.math.exp2(lse2 - m_i))
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = Mask + b * stride_mb
    first, full_first, full_last, last = _band_ranges(m0, BLOCK_M, BLOCK_N, SK, lo, hi, HAS_LO, HAS_HI,
                                                      True)
    if HAS_DOCS:  # every visited tile is masked by document
        q_docs = tl.load(QDoc + b * SQ + offs_m, mask=row_ok, other=-1)
        first, last = _document_range(m0, BLOCK_M, BLOCK_N, SQ, KLo + b * SQ, KHi + b * SQ, first, last)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, mask_base, stride_ks, stride_vs, stride_ms,
                                   q_docs, KDoc + b * SK, offs_m, offs_d, first, last, SK, D, scale2, lo, hi,
                                   True, HAS_LO, HAS_HI, HAS_MASK, True, EVEN_D, IEEE, BLOCK_N)
    else:
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, mask_base, stride_ks, stride_vs, stride_ms,
                                   offs_m, KDoc, offs_m, offs_d, first, full_first, SK, D, scale2, lo, hi,
                                   True, HAS_LO, HAS_HI, HAS_MASK, False, EVEN_D, IEEE, BLOCK_N)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, mask_base, stride_ks, stride_vs, stride_ms,
                                   offs_m, KDoc, offs_m, offs_d, full_first, full_last, SK, D, scale2, lo, hi,
                                   False, HAS_LO, HAS_HI, HAS_MASK, False, EVEN_D, IEEE, BLOCK_N)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, mask_base, stride_ks, stride_vs, stride_ms,
                                   offs_m, KDoc, offs_m, offs_d, full_last, last, SK, D, scale2, lo, hi,
                                   True, HAS_LO, HAS_HI, HAS_MASK, False, EVEN_D, IEEE, BLOCK_N)

    if NORMALIZE:  # rows that saw no key get 0
        o = acc * tl.where(l_i > 0.0, 1.0 / l_i, 0.0)[:, None]
        out_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
        tl.store(out_ptrs, o.to(Out.dtype.element_ty), mask=qd_mask)
    else:
        tl.store(acc_ptrs, acc, mask=qd_mask)
    m_ref = tl.where(m_i == float("-inf"), 0.0, m_i)
    tl.store(M + stat, m_i / 1.4426950408889634, mask=row_ok)
    tl.store(Lse + stat, (m_ref + tl.math.log2(l_i)) / 1.4426950408889634, mask=row_ok)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_keep, k_docs, qdoc_base, stride_qs,
                stride_dos, stride_ls, stride_ds, offs_n, offs_d, start, end, SQ, D, scale2, lo, hi,
                BAND: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_MASK: tl.constexpr,
                HAS_DOCS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m0 = tl.arange(0, BLOCK_M)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + offs_m0
        row_ok = rows < SQ
        qd_mask = row_ok[:, None] & (offs_d[None, :] < D)
        q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :], mask=qd_mask, other=0.0)
        lse2 = tl.load(lse_base + rows * stride_ls, mask=row_ok, other=float("inf")) * 1.4426950408889634
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
        delta = tl.load(delta_base + rows * stride_ds, mask=row_ok, other=0.0)
        if IEEE:
            qkT = tl.dot(k, tl.trans(q), input_precision="ieee") * scale2
        else:
            qkT = tl.dot(k, tl.trans(q)) * scale2
        if BAND:
            qkT = tl.where(tl.trans(_band_ok(rows, offs_n, lo, hi, HAS_LO, HAS_HI)), qkT, float("-inf"))
        if HAS_MASK:
            qkT = tl.where(mask_keep[:, None] != 0, qkT, float("-inf"))
        if HAS_DOCS:
            q_docs = tl.load(qdoc_base + rows, mask=row_ok, other=-1)
            qkT = tl.where(k_docs[:, None] == q_docs[None, :], qkT, float("-inf"))
        pT = tl.math.exp2(qkT - lse2[None, :])
        if IEEE:
            dv += tl.dot(pT.to(do.dtype), do, input_precision="ieee")
            dpT = tl.dot(v, tl.trans(do), input_precision="ieee")
        else:
            dv += tl.dot(pT.to(do.dtype), do)
            dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        if IEEE:
            dk += tl.dot(dsT.to(q.dtype), q, input_precision="ieee")
        else:
            dk += tl.dot(dsT.to(q.dtype), q)
    return dk, dv


@triton.jit(do_not_specialize=_VARYING)
def backward_dkdv_kernel(Q, K, V, DO, Lse, Delta, Mask, DK, DV, QDoc, KDoc, QLo, QHi,
                         stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                         stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                         stride_lb, stride_lh, stride_ls, stride_db, stride_dh, stride_ds, stride_mb, stride_ms,
                         stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                         HK, G, SQ, SK, D, scale, scale2, lo, hi,
                         HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOCS: tl.constexpr,
                         IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HK
    hk = pid_bh % HK
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kd_mask = (offs_n < SK)[:, None] & (offs_d[None, :] < D)
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kd_mask,
                other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kd_mask,
                other=0.0)
    keep = tl.full([BLOCK_N], 1, tl.int8)
    if HAS_MASK:  # columns past SK only touch rows of dk/dv that are never stored
        keep = tl.load(Mask + b * stride_mb + offs_n * stride_ms, mask=offs_n < SK, other=0).to(tl.int8)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    first, full_first, full_last, last = _band_ranges(n0, BLOCK_N, BLOCK_M, SQ, lo, hi, HAS_LO, HAS_HI,
                                                      False)
    k_docs = offs_n
    if HAS_DOCS:  # every visited tile is masked by document
        k_docs = tl.load(KDoc + b * SK + offs_n, mask=offs_n < SK, other=-2)
        first, last = _document_range(n0, BLOCK_N, BLOCK_M, SK, QLo + b * SK, QHi + b * SK, first, last)
    for g in range(G):
        h = hk * G + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = Lse + b * stride_lb + h * stride_lh
        delta_base = Delta + b * stride_db + h * stride_dh
        if HAS_DOCS:
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, keep, k_docs, QDoc + b * SQ,
                                 stride_qs, stride_dos, stride_ls, stride_ds, offs_n, offs_d, first, last, SQ, D,
                                 scale2, lo, hi, True, HAS_LO, HAS_HI, HAS_MASK, True, IEEE, BLOCK_M)
        else:
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, keep, k_docs, QDoc,
                                 stride_qs, stride_dos, stride_ls, stride_ds, offs_n, offs_d, first, full_first, SQ,
                                 D, scale2, lo, hi, True, HAS_LO, HAS_HI, HAS_MASK, False, IEEE, BLOCK_M)
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, keep, k_docs, QDoc,
                                 stride_qs, stride_dos, stride_ls, stride_ds, offs_n, offs_d, full_first, full_last,
                                 SQ, D, scale2, lo, hi, False, HAS_LO, HAS_HI, HAS_MASK, False, IEEE, BLOCK_M)
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, keep, k_docs, QDoc,
                                 stride_qs, stride_dos, stride_ls, stride_ds, offs_n, offs_d, full_last, last, SQ,
                                 D, scale2, lo, hi, True, HAS_LO, HAS_HI, HAS_MASK, False, IEEE, BLOCK_M)
    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :]
    tl.store(dk_ptrs, tl.load(dk_ptrs, mask=kd_mask, other=0.0) + dk * scale, mask=kd_mask)
    tl.store(dv_ptrs, tl.load(dv_ptrs, mask=kd_mask, other=0.0) + dv, mask=kd_mask)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, mask_base, stride_ks, stride_vs, stride_ms, q_docs, kdoc_base,
              offs_m, offs_d, start, end, SK, D, scale2, lo, hi,
              BAND: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_MASK: tl.constexpr,
              HAS_DOCS: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        kv_mask = (cols[:, None] < SK) & (offs_d[None, :] < D)
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = _row_scores(q, k, offs_m, cols, mask_base, stride_ms, q_docs, kdoc_base, SK, scale2, lo, hi,
                         BAND, HAS_LO, HAS_HI, HAS_MASK, HAS_DOCS, IEEE)
        p = tl.math.exp2(qk - lse2[:, None])
        if IEEE:
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        if IEEE:
            dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit(do_not_specialize=_VARYING)
def backward_dq_kernel(Q, K, V, DO, Lse, Delta, Mask, DQ, QDoc, KDoc, KLo, KHi,
                       stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                       stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                       stride_lb, stride_lh, stride_ls, stride_db, stride_dh, stride_ds, stride_mb, stride_ms,
                       stride_dqb, stride_dqs, stride_dqh,
                       H, G, SQ, SK, D, scale, scale2, lo, hi,
                       HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOCS: tl.constexpr,
                       IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b, h, hk, m0, offs_m, offs_d, row_ok, qd_mask = _row_program(H, G, SQ, D, HAS_LO, BLOCK_M, BLOCK_D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :], mask=qd_mask,
                other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=qd_mask, other=0.0)
    lse2 = tl.load(Lse + b * stride_lb + h * stride_lh + offs_m * stride_ls, mask=row_ok,
                   other=float("inf")) * 1.4426950408889634
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    delta = tl.load(Delta + b * stride_db + h * stride_dh + offs_m * stride_ds, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = Mask + b * stride_mb
    first, full_first, full_last, last = _band_ranges(m0, BLOCK_M, BLOCK_N, SK, lo, hi, HAS_LO, HAS_HI,
                                                      True)
    if HAS_DOCS:  # every visited tile is masked by document
        q_docs = tl.load(QDoc + b * SQ + offs_m, mask=row_ok, other=-1)
        first, last = _document_range(m0, BLOCK_M, BLOCK_N, SQ, KLo + b * SQ, KHi + b * SQ, first, last)
        dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, mask_base, stride_ks, stride_vs, stride_ms, q_docs,
                       KDoc + b * SK, offs_m, offs_d, first, last, SK, D, scale2, lo, hi, True, HAS_LO, HAS_HI,
                       HAS_MASK, True, IEEE, BLOCK_N)
    else:
        dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, mask_base, stride_ks, stride_vs, stride_ms, offs_m,
                       KDoc, offs_m, offs_d, first, full_first, SK, D, scale2, lo, hi, True, HAS_LO, HAS_HI,
                       HAS_MASK, False, IEEE, BLOCK_N)
        dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, mask_base, stride_ks, stride_vs, stride_ms, offs_m,
                       KDoc, offs_m, offs_d, full_first, full_last, SK, D, scale2, lo, hi, False, HAS_LO, HAS_HI,
                       HAS_MASK, False, IEEE, BLOCK_N)
        dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, mask_base, stride_ks, stride_vs, stride_ms, offs_m,
                       KDoc, offs_m, offs_d, full_last, last, SK, D, scale2, lo, hi, True, HAS_LO, HAS_HI,
                       HAS_MASK, False, IEEE, BLOCK_N)
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :]
    tl.store(dq_ptrs, tl.load(dq_ptrs, mask=qd_mask, other=0.0) + dq * scale, mask=qd_mask)


@triton.jit(do_not_specialize=["S"])
def merge_kernel(Acc, M, Lse, O, LseB,
                 stride_ab, stride_as, stride_ah, stride_mb, stride_mh, stride_ms,
                 stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
                 H, S, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fold a normalised block result (O, LseB) into the running state (Acc, M, Lse), one pass."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < S
    tile_ok = row_ok[:, None] & (offs_d[None, :] < D)
    stat = b * stride_mb + h * stride_mh + rows * stride_ms
    m = tl.load(M + stat, mask=row_ok, other=float("-inf"))
    lse = tl.load(Lse + stat, mask=row_ok, other=float("-inf"))
    lse_b = tl.load(LseB + b * stride_lb + h * stride_lh + rows * stride_ls, mask=row_ok, other=float("-inf"))
    m_new = tl.maximum(m, lse_b)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    keep = tl.exp(m - m_ref)
    add = tl.exp(lse_b - m_ref)
    acc_ptrs = Acc + b * stride_ab + h * stride_ah + rows[:, None] * stride_as + offs_d[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :], mask=tile_ok,
                other=0.0)
    acc = tl.load(acc_ptrs, mask=tile_ok, other=0.0) * keep[:, None] + o.to(tl.float32) * add[:, None]
    tl.store(acc_ptrs, acc, mask=tile_ok)
    tl.store(Lse + stat, m_ref + tl.log(tl.exp(lse - m_ref) + add), mask=row_ok)
    tl.store(M + stat, m_new, mask=row_ok)


@triton.jit(do_not_specialize=["S"])
def accumulate_kernel(Dst, Src, stride_db, stride_ds, stride_dh, stride_sb, stride_ss, stride_sh, H, S, D,
                      BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Dst ((b, s, h, d) strided; float32, or Src's dtype) += Src (any float dtype, same shape), one vectorised
    pass in float32."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows < S)[:, None] & (offs_d[None, :] < D)
    dst = Dst + b * stride_db + h * stride_dh + rows[:, None] * stride_ds + offs_d[None, :]
    src = tl.load(Src + b * stride_sb + h * stride_sh + rows[:, None] * stride_ss + offs_d[None, :], mask=ok, other=0.0)
    tl.store(dst, tl.load(dst, mask=ok, other=0.0) + src.to(tl.float32), mask=ok)
