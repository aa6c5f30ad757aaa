"""The correctness part: every variant of ``ring_sp.ring_attention`` over the process group against float64."""

from __future__ import annotations

import itertools
import math
import traceback
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.common import table
from benchmarks.multi_gpu.ranks import Ctx
from ring_sp import ring_attention, split
from ring_sp.reference import dense_grads, rel_err, visible_pairs

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLOOR = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 0.0, "float16": 0.0}


@dataclass(frozen=True)
class Case:
    layout: str
    causal: bool
    masked: bool
    kv_heads: int
    window: int | None
    reduce_col: bool
    ring_size: int | None
    dtype: str
    backend: str

    def options(self) -> dict:
        """The keywords that ``ring_attention`` and ``visible_pairs`` share."""
        return dict(causal=self.causal, layout=self.layout, max_lookback_seq_len=self.window,
                    ring_reduce_col=self.reduce_col)


def cases(ctx: Ctx) -> list[Case]:
    a = ctx.args
    w, gqa, mha = a.check_window, a.check_kv_heads, a.check_heads
    sub_rings = [r for r in range(1, ctx.world) if ctx.world % r == 0]
    variants = [  # (causal, masked, kv_heads, window, reduce_col, ring_size)
        (False, False, gqa, None, True, None),
        (True, False, gqa, None, True, None),
        (True, True, gqa, None, True, None),
        (False, True, mha, None, True, None),
        (True, False, mha, None, True, None),
        (True, False, gqa, w, True, None),
        (True, True, mha, w, True, None),
        (True, False, gqa, None, False, None),
        *[(True, False, gqa, None, True, r) for r in sub_rings],
        *[(False, True, gqa, None, True, r) for r in sub_rings[-1:]],
    ]
    return [Case(layout, *variant, dtype, backend) for dtype, backend, variant, layout in itertools.product(
        a.dtypes.split(","), a.backends.split(","), variants, ("contiguous", "striped", "zigzag"))]


def _sdpa_grads(q, k, v, do, mask, vis) -> list[Tensor]:
    """PyTorch's own SDPA over the full sequence in the inputs' dtype: out, dq, dk, dv."""
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    allowed = vis[None, None] if mask is None else vis[None, None] & mask[:, None, None, :]
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed, enable_gqa=True)
    out.backward(do.transpose(1, 2))
    return [t.transpose(1, 2) for t in (out, qt.grad, kt.grad, vt.grad)]


def check_case(ctx: Ctx, case: Case, index: int) -> dict:
    """This rank's errors and bounds for out, dq, dk, dv (or why the case was skipped)."""
    a, dev = ctx.args, ctx.device
    ring = case.ring_size or ctx.world
    position, ring_id = ctx.rank % ring, ctx.rank // ring
    local, dtype = a.check_local, DTYPES[case.dtype]
    g = torch.Generator().manual_seed(a.seed + 1000 * index + ring_id)  # one sequence per sub-ring
    seq = ring * local
    q = torch.randn(a.check_batch, seq, a.check_heads, a.check_head_dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(a.check_batch, seq, case.kv_heads, a.check_head_dim, generator=g, dtype=torch.float64)
            for _ in range(2))
    do = torch.randn(q.shape, generator=g, dtype=torch.float64)
    # Drop every 7th key: no two in a row, and key 0 stays, so every query keeps a visible key.
    mask = (torch.arange(seq) % 7 != 3).expand(a.check_batch, seq).to(dev) if case.masked else None
    q, k, v, do = (t.to(dev, dtype) for t in (q, k, v, do))
    vis = visible_pairs(seq, **case.options(), ring_size=ring, device=dev)
    ref = dense_grads(q, k, v, do, mask=mask, visible=vis)
    own = _sdpa_grads(q, k, v, do, mask, vis)
    mine = [split(t, case.layout, ring)[position].detach().clone() for t in (q, k, v, do)]
    ql, kl, vl = (t.requires_grad_() for t in mine[:3])
    try:
        out = ring_attention(ql, kl, vl, **case.options(), ring_size=case.ring_size, backend=case.backend,
                             mask=None if mask is None else split(mask, case.layout, ring)[position],
                             bucket_size=a.check_bucket if not ctx.cuda else None)
    except ValueError as error:  # every rank raises together (e.g. a backend that cannot serve a block)
        return dict(skipped=str(error))
    out.backward(mine[3])
    if a.perturb and ctx.rank == ctx.world - 1:  # negative control: the check must now fail
        ql.grad.mul_(1 + a.perturb)
    errors, bounds = [], []
    for got, want, sdpa in zip((out, ql.grad, kl.grad, vl.grad), ref, own):
        r_shard = split(want, case.layout, ring)[position]
        errors.append(rel_err(got, r_shard))
        bounds.append(max(FLOOR[case.dtype], 2 * rel_err(split(sdpa, case.layout, ring)[position], r_shard)))
    return dict(errors=errors, bounds=bounds)


def run(ctx: Ctx) -> tuple[dict, bool]:
    """Every case on every rank; one row per case, its worst rank's ratios of error to bound."""
    todo = cases(ctx)
    ctx.log(f"correctness: {len(todo)} cases on W={ctx.world} ({ctx.device.type})")
    mine = []
    for i, case in enumerate(todo):
        try:
            mine.append(check_case(ctx, case, i))
        except Exception:  # report it; the other ranks fail the same case the same way or time out
            mine.append(dict(error=traceback.format_exc(limit=4)))
    per_rank = ctx.gather(mine)
    rows, ok = [], True
    for i, case in enumerate(todo):
        results = [r[i] for r in per_rank]
        row = dict(asdict(case), world=ctx.world)
        if any("error" in r for r in results):
            row.update(status="ERROR", detail=next(r["error"] for r in results if "error" in r))
            ok = False
        elif any("skipped" in r for r in results):
            row.update(status="skipped", detail=results[0].get("skipped", ""))
        else:
            ratios = [max(r["errors"][t] / r["bounds"][t] if r["bounds"][t] > 0 else math.inf
                          for r in results) for t in range(4)]
            ratios = [x if math.isfinite(x) else math.inf for x in ratios]
            row.update(errors=[max(r["errors"][t] for r in results) for t in range(4)],
                       bounds=[min(r["bounds"][t] for r in results) for t in range(4)], ratios=ratios,
                       status="ok" if all(x <= 1 for x in ratios) else "FAIL")
            ok &= row["status"] == "ok"
        rows.append(row)
    a = ctx.args
    data = dict(rows=rows, passed=ok, n_failed=sum(r["status"] in ("FAIL", "ERROR") for r in rows), world=ctx.world,
                sizes=dict(batch=a.check_batch, local=a.check_local, heads=a.check_heads, head_dim=a.check_head_dim,
                           window=a.check_window))
    return data, ok


def markdown(data: dict) -> str:
    a = data["sizes"]
    rows = []
    for r in data["rows"]:
        head = [r["layout"], r["causal"], r["masked"], r["kv_heads"], r["window"] or "-", r["reduce_col"],
                r["ring_size"] or r["world"], r["dtype"], r["backend"]]
        if "ratios" in r:
            rows.append(head + [f"{x:.2f}" if x < 100 else f"{x:.1e}" for x in r["ratios"]]
                        + [f"{max(r['errors']):.1e}", r["status"]])
        else:
            rows.append(head + [""] * 5 + [r["status"]])
    lines = ["## Correctness\n",
             f"W = {data['world']}; each rank: batch {a['batch']}, {a['local']} tokens, {a['heads']} query heads, "
             f"head_dim {a['head_dim']}; window {a['window']} tokens. Columns out, dq, dk, dv: the worst ratio, "
             "over ranks, of the error against float64 to its bound (max(F, 2 × PyTorch SDPA's error in the same "
             "dtype on the same shard); F = 1e-10 fp64, 1e-5 fp32, 0 bf16/fp16); ≤ 1 passes. "
             f"**{'all passed' if data['passed'] else str(data['n_failed']) + ' FAILED'}** "
             f"({sum(r['status'] == 'ok' for r in data['rows'])} ok, "
             f"{sum(r['status'] == 'skipped' for r in data['rows'])} skipped).\n",
             *table(["layout", "causal", "mask", "kv heads", "window", "reduce_col", "ring_size", "dtype", "backend",
                     "out", "dq", "dk", "dv", "worst err", "status"], rows)]
    details = [f"- {r['layout']} {r['status']}: {r['detail'].strip().splitlines()[-1]}" for r in data["rows"]
               if r["status"] != "ok" and r.get("detail")]
    return "\n".join(lines + ([""] + sorted(set(details)) if details else [])) + "\n"


summary = markdown  # what the console gets at the end: the whole table
