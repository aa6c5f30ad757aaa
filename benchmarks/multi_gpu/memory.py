"""The memory part: the longest context one attention layer (ring zigzag, forward+backward) fits per GPU."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from benchmarks.common import GIB, fmt, table
from benchmarks.multi_gpu.ranks import Ctx, inputs
from ring_sp import ring_attention


def _layer(ctx: Ctx, n: int) -> tuple[float | None, float | None, float]:
    """Peak allocated and peak reserved GiB (largest over ranks) and seconds of one ring
    forward+backward with n tokens per GPU."""
    q, k, v, do = inputs(ctx, n, ctx.args.seed + ctx.rank)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ctx.barrier()
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ring_attention(q, k, v, causal=True, layout="zigzag", backend="auto").backward(do)
    ctx.sync()
    seconds = time.perf_counter() - t0
    del q, k, v, do
    if not ctx.cuda:
        return None, None, ctx.reduce(seconds)
    return (ctx.reduce(torch.cuda.max_memory_allocated() / GIB), ctx.reduce(torch.cuda.max_memory_reserved() / GIB),
            ctx.reduce(seconds))


def _fit(rows: list[dict], key: str = "peak_gib") -> tuple[float, float] | None:
    """GiB ≈ a + b·n through the last two measured sizes."""
    pts = [(r["tokens"], r[key]) for r in rows if r.get(key) is not None]
    if len(pts) < 2:
        return None
    (n0, p0), (n1, p1) = pts[-2:]
    b = (p1 - p0) / (n1 - n0)
    return p1 - b * n1, b


def _is_oom(error: BaseException) -> bool:
    """An out-of-memory error, also as cuDNN or cuBLAS report it."""
    text = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def _fits(ctx: Ctx, need_gib: float) -> bool:
    """Whether every rank can allocate ``need_gib`` now (no collective runs while a rank is short)."""
    torch.cuda.empty_cache()
    ok = 1.0
    try:
        probe = torch.empty(int(need_gib * GIB), dtype=torch.uint8, device=ctx.device)
        del probe
    except torch.cuda.OutOfMemoryError:
        ok = 0.0
    torch.cuda.empty_cache()
    return ctx.reduce(ok, dist.ReduceOp.MIN) > 0


def run(ctx: Ctx, write_partial: Callable[[dict], None]) -> tuple[dict, bool]:
    """n tokens per GPU doubled until a size does not fit, ``--mem-max`` or the time budget; ``write_partial``
    gets the rows so far before each size is tried (a rank out of memory ends the job)."""
    a = ctx.args
    capacity = None
    if ctx.cuda:  # what PyTorch can use: the cap, or what CUDA, NCCL and others leave free
        if a.mem_fraction < 1:
            torch.cuda.set_per_process_memory_fraction(a.mem_fraction)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        capacity = ctx.reduce(min(total * a.mem_fraction, free + torch.cuda.memory_reserved()) / GIB,
                              dist.ReduceOp.MIN)
    data = dict(rows=[], capacity_gib=capacity, world=ctx.world, mem_fraction=a.mem_fraction,
                shapes=dict(heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim, dtype="bfloat16", layout="zigzag"))
    started, n, last_s = time.perf_counter(), a.mem_start, 0.0
    stop = None
    while stop is None:
        if n > a.mem_max:
            stop = f"reached --mem-max {a.mem_max}"
            break
        left = a.mem_budget_s - (time.perf_counter() - started)
        if data["rows"] and 4 * last_s > left:
            stop = f"time budget: {n} tokens/GPU would take ~{4 * last_s:.0f} s, {max(left, 0):.0f} s left"
            break
        if ctx.cuda and ctx.world > 1 and data["rows"]:
            fit = _fit(data["rows"], "reserved_gib")
            need = 1.1 * (fit[0] + fit[1] * n if fit else 2 * data["rows"][-1]["reserved_gib"])
            if not _fits(ctx, need):
                stop = f"{n} tokens/GPU does not fit: a rank cannot allocate its predicted peak {need:.1f} GiB " \
                       "(not run)"
                data["oom_tokens"] = n
                break
        data["attempting"] = n
        write_partial(data)
        ctx.log(f"memory: {n} tokens/GPU (S = {ctx.world * n})")
        try:
            peak, reserved, last_s = _layer(ctx, n)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if not _is_oom(error):
                raise
            if ctx.world > 1:  # peers wait in the ring for this rank: stop the job; rank 0 wrote the rows so far
                print(f"rank {ctx.rank}: out of memory at {n} tokens/GPU despite the check; exiting", flush=True)
                os._exit(3)
            stop, data["oom_tokens"] = f"{n} tokens/GPU: torch.cuda.OutOfMemoryError (caught)", n
        if stop is not None:
            torch.cuda.empty_cache()  # after the except block, which held the failed call's tensors
            break
        data["rows"].append(dict(tokens=n, seq=ctx.world * n, peak_gib=peak, reserved_gib=reserved, seconds=last_s))
        ctx.log(f"  peak {fmt(peak, '.2f')} GiB, {last_s:.2f} s")
        n *= 2
    data.pop("attempting", None)
    data["stopped_by"] = stop
    fit = _fit(data["rows"], "reserved_gib")
    if fit and capacity and fit[1] > 0:
        data["fit_gib"] = dict(a=fit[0], b_per_token=fit[1])
        data["extrapolated_max_tokens"] = int((capacity - fit[0]) / fit[1])
    measured = [r["tokens"] for r in data["rows"]]
    data["longest_measured_tokens"] = max(measured) if measured else None
    return data, True


def markdown(data: dict) -> str:
    s = data["shapes"]
    cap = f"{data['capacity_gib']:.1f} GiB per GPU" if data.get("capacity_gib") else "n/a on CPU"
    lines = ["## Peak memory per GPU (one attention layer, forward + backward)\n",
             f"Ring {s['layout']}, causal, {s['dtype']}, {s['heads']} query / {s['kv_heads']} KV heads, head_dim "
             f"{s['head_dim']}, W = {data['world']}; memory {cap}"
             f"{' (--mem-fraction ' + str(data['mem_fraction']) + ')' if data['mem_fraction'] < 1 else ''}. "
             "Peak: max allocated (and reserved by the caching allocator), inputs and gradients included, largest "
             "over ranks; the memory PyTorch could use is the cap or what was free at the start, whichever is less."
             "\n",
             *table(["tokens/GPU", "S", "peak GiB", "reserved GiB", "KiB per token", "fwd+bwd s"],
                    [[r["tokens"], r["seq"], fmt(r.get("peak_gib"), ".2f"), fmt(r.get("reserved_gib"), ".2f"),
                      fmt(r["peak_gib"] / r["tokens"] * 2**20 if r.get("peak_gib") else None, ".1f"),
                      f"{r['seconds']:.2f}"] for r in data["rows"]])]
    lines.append("")
    if data.get("attempting"):
        lines.append(f"- **incomplete**: the run ended while trying {data['attempting']} tokens/GPU (out of memory "
                     "on a rank, or killed)")
    lines.append(f"- longest measured: {data.get('longest_measured_tokens')} tokens/GPU "
                 f"(S = {(data.get('longest_measured_tokens') or 0) * data['world']})")
    if data.get("stopped_by"):
        lines.append(f"- stopped by: {data['stopped_by']}")
    if data.get("extrapolated_max_tokens"):
        fit = data["fit_gib"]
        lines.append(f"- extrapolated (not run): reserved ≈ {fit['a']:.2f} GiB + {fit['b_per_token'] * 2**20:.1f} "
                     f"KiB × tokens/GPU reaches {data['capacity_gib']:.1f} GiB at ~{data['extrapolated_max_tokens']} "
                     f"tokens/GPU (S ≈ {data['extrapolated_max_tokens'] * data['world']})")
    return "\n".join(lines) + "\n"
