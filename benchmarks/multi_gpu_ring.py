"""Ring attention over a real process group: correctness, scaling beside PyTorch's context parallel,
and peak memory per GPU. One process per GPU (NCCL), or per CPU rank (gloo, tiny sizes):

    torchrun --nproc-per-node 8 benchmarks/multi_gpu_ring.py --out benchmarks/results/h200x8
    torchrun --nproc-per-node 8 benchmarks/multi_gpu_ring.py --parts scaling --tokens 131072 --out ...
    torchrun --nproc-per-node 2 benchmarks/multi_gpu_ring.py --out /tmp/mg      # CPU: gloo, tiny sizes

Each part (``--parts``, default all) writes ``<part>.json`` and ``<part>.md`` under ``--out``;
``results.md`` (and ``results.png`` if matplotlib is there) collect the parts found there, so the
parts can run as separate commands into one folder. Scaling rows of a later run replace those of
the same world size, tokens and variant and keep the others. Exit status: 0 all good, 1 a wrong
result (correctness failure, or PyTorch's context parallel disagreeing with the ring).

correctness
    Every layout (contiguous, striped, zigzag) × causal / full × GQA / MHA × key mask × sliding
    window × sub-rings (every ``ring_size`` dividing W) × ``ring_reduce_col=False``, for each
    ``--dtypes`` and ``--backends``. Each rank builds the same full random inputs from a seed (one
    sequence per sub-ring), keeps its shard (``ring_sp.split``), runs ``ring_sp.ring_attention``
    forward and backward over the group and compares its shard of out, dq, dk, dv with a float64
    dense attention over its ring's full sequence (relative Frobenius error). Bound, per tensor and
    rank: max(F, 2 × the error of PyTorch's ``F.scaled_dot_product_attention`` computed in the same
    dtype on the same device over the full sequence, on the same shard), F = 1e-10 (float64),
    1e-5 (float32), 0 (bf16, fp16).

scaling
    bf16, causal, batch 1, 32 query / 8 KV heads, head_dim 128 (``--heads/--kv-heads/--head-dim``),
    n = 8k, 32k, 128k tokens per GPU (``--tokens``), W = world size, S = W·n tokens in all.
    Variants: our ring (``--layouts`` zigzag, striped; backend auto) and PyTorch's
    ``context_parallel`` (head-tail load balance, which is the zigzag split; ``--cp-rotate``
    allgather, alltoall; cuDNN SDPA, else the next of ``--cp-kernels`` that runs) on the same
    shards, its output checked against the ring's. Forward and forward+backward; the time of a
    variant is the slowest rank's mean over calls run back to back after warm-up (``measure``).

    - per-GPU work: causal attention over S tokens is 4·h·d·S²/2 FLOPs forward (×3.5 with the
      backward); each GPU does 1/W of it, which equals W × the work of causal attention over its own
      n tokens. TFLOP/s per GPU = that work ÷ time.
    - ``÷1 GPU`` = t1 / t with t1 = W × (time of cuDNN causal SDPA over n tokens, same heads, on one
      GPU alone, no communication; all GPUs measure it at once, slowest taken): the fraction of the
      single-GPU throughput each GPU keeps (1.00 = perfect scaling; this is ring-flash-attn's
      "theoretic flash_attn" baseline). The ring computes mostly full blocks, which run a little
      faster than a causal n × n block, so values slightly above 1 are possible at small n.
    - ``÷mono`` (only when S ≤ ``--mono-max``) = (time of one GPU running cuDNN causal SDPA over the
      whole S tokens) / W / t: strict strong scaling.
    - communication hidden (ring only): t_on is the ring as users call it; t_off is the same call
      with every ring transfer replaced by a local copy of the block (``NoCommRing`` below,
      swapped in for ``ring_sp.attention.DistributedRing``; the per-call agreement all_gather
      stays); t_comm is the same sequence of transfers with no compute (recorded from a real
      call, replayed through ``DistributedRing``). hidden = 1 − clamp((t_on − t_off) / t_comm, 0, 1).
    - peak GiB: ``torch.cuda.max_memory_allocated`` during one forward+backward, inputs included,
      largest over ranks.

memory
    One attention layer forward+backward (ring zigzag, the scaling shapes): n = ``--mem-start``
    tokens per GPU, doubled until it does not fit, the time budget (``--mem-budget-s``, the next
    step predicted at 4× the last) or ``--mem-max`` stops it; peak GiB per GPU for each n. W = 1:
    the failing size is tried and its ``torch.cuda.OutOfMemoryError`` caught. W > 1: a rank that
    runs out of memory mid-ring would leave its peers waiting, so a size is tried only if every rank
    can first allocate its predicted peak (a linear fit of the measured peak reserved memory, +10%);
    a size that fails this check is reported as not fitting, not tried. The same fit extrapolates
    the longest n that fits in the memory PyTorch can use (marked as extrapolated).
    ``--mem-fraction`` caps the memory per GPU, to reach the limit quickly in a test.

Sizes: on CPU, or with ``--dry-run``, every default is tiny. NVLink multicast stays off
(NCCL_NVLS_ENABLE=0).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import itertools
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ring_sp.attention as ring_attention_module  # noqa: E402
from ring_sp import local_positions, ring_attention, split  # noqa: E402
from ring_sp.comm import DistributedRing, Pending  # noqa: E402
from tests.reference import reference_grads, rel_err  # noqa: E402

PARTS = ("correctness", "scaling", "memory")
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLOOR = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 0.0, "float16": 0.0}
GIB = 2**30


# ----------------------------------------------------------------------------------------------
# Process group, timing, environment


@dataclass
class Ctx:
    rank: int
    world: int
    device: torch.device
    args: argparse.Namespace

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def barrier(self) -> None:
        """All ranks here, and this rank's device idle."""
        self.sync()
        flag = torch.zeros(1, device=self.device)
        dist.all_reduce(flag)
        self.sync()

    def reduce(self, value: float, op=dist.ReduceOp.MAX) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return float(t.item())

    def gather(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def log(self, *msg) -> None:
        if self.rank == 0:
            print(*msg, flush=True)


def init(args: argparse.Namespace) -> Ctx:
    """Join the process group (torchrun's env, or a group of one when run with plain python)."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    timeout = timedelta(seconds=args.timeout)
    if use_cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, args.cpu_threads))
        dist.init_process_group("gloo", timeout=timeout)
    return Ctx(dist.get_rank(), dist.get_world_size(), device, args)


def environment(ctx: Ctx) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               world=ctx.world, backend=dist.get_backend(), torch=torch.__version__, triton=triton_version,
               python=platform.python_version(), nvls="NCCL_NVLS_ENABLE=0")
    if ctx.cuda:
        env.update(gpu=torch.cuda.get_device_name(), gpu_memory_gib=round(torch.cuda.mem_get_info()[1] / GIB, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   nccl=".".join(map(str, torch.cuda.nccl.version())))
    else:
        env.update(gpu="none (CPU)", cpu=platform.processor() or platform.machine())
    return env


def env_line(env: dict) -> str:
    keys = ("gpu", "world", "backend", "torch", "cuda", "cudnn", "nccl", "triton", "python", "nvls", "date")
    return "; ".join(f"{k} {env[k]}" for k in keys if env.get(k) is not None)


def command_line(ctx: Ctx) -> str:
    argv = " ".join(sys.argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        nodes = ctx.world // int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world))
        return f"torchrun{f' --nnodes {nodes}' if nodes > 1 else ''} --nproc-per-node " \
               f"{os.environ.get('LOCAL_WORLD_SIZE', ctx.world)} {argv}"
    return f"python {argv}"


def measure(ctx: Ctx, fn: Callable[[], object], *, peak: bool = False) -> float | tuple[float, float | None]:
    """Seconds per call of ``fn`` (run on every rank at once), the slowest rank's.

    Warm-up first (cuDNN plans, Triton compilation): ``--warmup`` calls, fewer if they take more
    than ``--min-time``. Then, from a barrier, calls back to back (as in training, the host may run
    ahead of the GPU): at least two, enough for about ``--min-time`` seconds, at most
    ``--max-reps``; their mean. ``peak``: also return the peak GiB allocated during those calls
    (largest over ranks; None on CPU).
    """
    args = ctx.args
    started, last = time.perf_counter(), 0.0
    for i in range(max(1, args.warmup)):
        if i and ctx.reduce(time.perf_counter() - started) > args.min_time:
            break
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        last = time.perf_counter() - t0
    reps = max(2, min(args.max_reps, math.ceil(args.min_time / max(ctx.reduce(last), 1e-6))))
    if peak and ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    ctx.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    ctx.sync()
    seconds = ctx.reduce((time.perf_counter() - t0) / reps)
    if not peak:
        return seconds
    return seconds, ctx.reduce(torch.cuda.max_memory_allocated() / GIB) if ctx.cuda else None


def attention_flops(heads: int, seq: int, head_dim: int, backward: bool) -> float:
    """Causal attention over ``seq`` tokens: 4·h·seq²·d/2 forward, ×3.5 with the backward."""
    return 4 * heads * seq * seq * head_dim * 0.5 * (3.5 if backward else 1.0)


def sdpa_context(ctx: Ctx, kernel: str = "cudnn"):
    """SDPA restricted to ``kernel`` (cudnn, flash, efficient) on GPUs; PyTorch's pick on CPU or for 'default'.

    cuDNN is what backend auto uses for plain blocks on GPUs, and the fastest on H100 (see
    benchmarks/results/h100-2026-11-24).
    """
    if not ctx.cuda or kernel == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION}[kernel])


# ----------------------------------------------------------------------------------------------
# Correctness


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


def correctness_cases(ctx: Ctx) -> list[Case]:
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


def _visible(case: Case, ring: int, local: int, device: torch.device) -> Tensor:
    seq = ring * local
    pos = torch.arange(seq, device=device)
    vis = torch.ones(seq, seq, dtype=torch.bool, device=device)
    if case.causal:
        vis &= pos[:, None] >= pos[None, :]
    if case.window is not None:
        vis &= pos[:, None] - pos[None, :] < case.window
    if not case.reduce_col:
        owner = torch.empty(seq, dtype=torch.long, device=device)
        for r in range(ring):
            owner[local_positions(seq, case.layout, r, ring).to(device)] = r
        vis &= owner[:, None] == owner[None, :]
    return vis


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
    vis = _visible(case, ring, local, dev)
    ref = reference_grads(q, k, v, do, mask=mask, visible_pairs=vis)
    own = _sdpa_grads(q, k, v, do, mask, vis)
    mine = [split(t, case.layout, ring)[position].detach().clone() for t in (q, k, v, do)]
    ql, kl, vl = (t.requires_grad_() for t in mine[:3])
    try:
        out = ring_attention(ql, kl, vl, causal=case.causal, layout=case.layout,
                             mask=None if mask is None else split(mask, case.layout, ring)[position],
                             max_lookback_seq_len=case.window, ring_reduce_col=case.reduce_col,
                             ring_size=case.ring_size, backend=case.backend,
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


def run_correctness(ctx: Ctx) -> tuple[dict, bool]:
    cases = correctness_cases(ctx)
    ctx.log(f"correctness: {len(cases)} cases on W={ctx.world} ({ctx.device.type})")
    mine = []
    for i, case in enumerate(cases):
        try:
            mine.append(check_case(ctx, case, i))
        except Exception:  # report it; the other ranks fail the same case the same way or time out
            mine.append(dict(error=traceback.format_exc(limit=4)))
    per_rank = ctx.gather(mine)
    rows, ok = [], True
    for i, case in enumerate(cases):
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
    return dict(rows=rows, passed=ok, n_failed=sum(r["status"] in ("FAIL", "ERROR") for r in rows)), ok


def correctness_markdown(data: dict) -> str:
    a = data["sizes"]
    lines = ["## Correctness\n",
             f"W = {data['world']}; each rank: batch {a['batch']}, {a['local']} tokens, {a['heads']} query heads, "
             f"head_dim {a['head_dim']}; window {a['window']} tokens. Columns out, dq, dk, dv: the worst ratio, "
             "over ranks, of the error against float64 to its bound (max(F, 2 × PyTorch SDPA's error in the same "
             "dtype on the same shard); F = 1e-10 fp64, 1e-5 fp32, 0 bf16/fp16); ≤ 1 passes. "
             f"**{'all passed' if data['passed'] else str(data['n_failed']) + ' FAILED'}** "
             f"({sum(r['status'] == 'ok' for r in data['rows'])} ok, "
             f"{sum(r['status'] == 'skipped' for r in data['rows'])} skipped).\n",
             "| layout | causal | mask | kv heads | window | reduce_col | ring_size | dtype | backend | out | dq | dk "
             "| dv | worst err | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        head = (f"| {r['layout']} | {r['causal']} | {r['masked']} | {r['kv_heads']} | {r['window'] or '-'} | "
                f"{r['reduce_col']} | {r['ring_size'] or r['world']} | {r['dtype']} | {r['backend']} |")
        if "ratios" in r:
            ratios = "".join(f" {x:.2f} |" if x < 100 else f" {x:.1e} |" for x in r["ratios"])
            lines.append(f"{head}{ratios} {max(r['errors']):.1e} | {r['status']} |")
        else:
            lines.append(head + " | | | | | " + r["status"] + " |")
    details = [f"- {r['layout']} {r['status']}: {r['detail'].strip().splitlines()[-1]}" for r in data["rows"]
               if r["status"] != "ok" and r.get("detail")]
    return "\n".join(lines + ([""] + sorted(set(details)) if details else [])) + "\n"


# ----------------------------------------------------------------------------------------------
# Scaling


def _specs(item) -> list:
    return [] if item is None else [(tuple(t.shape), t.dtype) for t in item if t is not None]


class NoCommRing(DistributedRing):
    """DistributedRing whose transfers are local fills of the receive buffers: same schedule, same
    compute and allocations, no communication. Records the transfers it stands in for (send and
    receive shapes and dtypes, hops) in ``NoCommRing.log``."""

    log: list = []

    def exchange(self, sends, hops, buffers):
        if hops % self.size == 0:
            return Pending(list(sends))
        received = buffers(0)
        NoCommRing.log.append((_specs(sends[0]), _specs(received), hops))
        for t in [] if received is None else [t for t in received if t is not None]:
            t.fill_(True) if t.dtype == torch.bool else t.normal_()  # never compute on zeros
        return Pending([received])


@contextlib.contextmanager
def transport(cls: type) -> Iterator[None]:
    """Run ring_sp.ring_attention over ``cls`` instead of DistributedRing."""
    original = ring_attention_module.DistributedRing
    ring_attention_module.DistributedRing = cls
    try:
        yield
    finally:
        ring_attention_module.DistributedRing = original


def _inputs(ctx: Ctx, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    a = ctx.args
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    shape_q, shape_kv = (1, n, a.heads, a.head_dim), (1, n, a.kv_heads, a.head_dim)
    return tuple(torch.randn(s, generator=g, device=ctx.device, dtype=torch.bfloat16)
                 for s in (shape_q, shape_kv, shape_kv, shape_q))


def _fwd_bwd(attn: Callable, q: Tensor, k: Tensor, v: Tensor, do: Tensor) -> Callable[[], None]:
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def step():
        for t in leaves:
            t.grad = None
        attn(*leaves).backward(do)

    return step


def _comm_only(ctx: Ctx, log: list) -> Callable[[], None]:
    """Replays the recorded transfers through DistributedRing, with no compute between them."""
    ring = DistributedRing(dist.group.WORLD, ctx.world)
    buffers: dict = {}  # one send buffer per distinct (shape, dtype); receive buffers are new, as in the ring
    items = [(tuple(buffers.setdefault(spec, torch.empty(spec[0], dtype=spec[1], device=ctx.device))
                    for spec in sends) or None, receives, hops) for sends, receives, hops in log]

    def replay():
        for item, receives, hops in items:
            new = tuple(torch.empty(shape, dtype=dtype, device=ctx.device) for shape, dtype in receives) or None
            ring.exchange([item], hops, lambda _, new=new: new).wait()

    return replay


def ring_row(ctx: Ctx, n: int, layout: str, q, k, v, do) -> dict:
    def attn(q_, k_, v_):
        return ring_attention(q_, k_, v_, causal=True, layout=layout, backend="auto")

    def fwd():
        with torch.no_grad():
            attn(q, k, v)

    fwd_bwd = _fwd_bwd(attn, q, k, v, do)
    row = dict(variant=f"ring {layout}", fwd_s=measure(ctx, fwd))
    row["fwd_bwd_s"], row["peak_gib"] = measure(ctx, fwd_bwd, peak=True)
    if ctx.world == 1:
        return row
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):

        def logged(fn=fn):  # keeps the transfers of the last call only
            NoCommRing.log = []
            fn()

        with transport(NoCommRing):
            row[f"{name}_off_s"] = measure(ctx, logged)
        row[f"{name}_transfers"] = len(NoCommRing.log)
        row[f"{name}_comm_s"] = comm = measure(ctx, _comm_only(ctx, NoCommRing.log))
        exposed = row[f"{name}_s"] - row[f"{name}_off_s"]
        row[f"{name}_hidden"] = 1 - min(max(exposed / comm, 0.0), 1.0) if comm > 0 else None
    return row


_MESH = None  # one device mesh over the world for PyTorch's context parallel, made on first use


def _cp_api() -> tuple[Callable, Callable, Callable | None]:
    """(init_device_mesh, context_parallel, set_rotate_method or None) of the installed torch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    set_rotate_method = None
    for module in ("torch.distributed.tensor.experimental._attention",
                   "torch.distributed.tensor.experimental._context_parallel._attention"):
        with contextlib.suppress(ImportError, AttributeError):
            set_rotate_method = importlib.import_module(module).set_rotate_method
            break
    return init_device_mesh, context_parallel, set_rotate_method


def _cp_load_balance() -> bool | None:
    """Whether PyTorch's context parallel runs its load-balanced (head-tail) schedule, if it says."""
    for module in ("torch.distributed.tensor.experimental._attention",
                   "torch.distributed.tensor.experimental._context_parallel._attention"):
        with contextlib.suppress(ImportError, AttributeError):
            return bool(importlib.import_module(module)._cp_options.enable_load_balance)
    return None


def cp_rows(ctx: Ctx, q, k, v, do, reference: Tensor | None) -> list[dict]:
    """PyTorch's context_parallel on the same (zigzag = head-tail) shards, per rotate method.

    SDPA kernel: the first of ``--cp-kernels`` that runs (cuDNN first, as our backend auto).
    """
    a = ctx.args
    methods = [m for m in a.cp_rotate.split(",") if m]
    if not methods:
        return []
    try:
        init_device_mesh, context_parallel, set_rotate_method = _cp_api()
    except ImportError as error:
        return [dict(variant=f"torch cp {m}", unavailable=f"cannot import context_parallel: {error}") for m in methods]
    if not ctx.cuda:
        return [dict(variant=f"torch cp {m}", unavailable="needs CUDA (its SDPA handlers cover the CUDA ops only)")
                for m in methods]
    global _MESH
    if _MESH is None:
        _MESH = init_device_mesh("cuda", (ctx.world,))
    qt, kt, vt, dot = (t.transpose(1, 2) for t in (q, k, v, do))  # (batch, heads, seq, head_dim)
    rows = []
    for method in methods:
        row, failures = dict(variant=f"torch cp {method}"), []
        if set_rotate_method is None and method != "allgather":
            rows.append(dict(row, unavailable="this torch has no set_rotate_method (allgather only)"))
            continue
        for kernel in a.cp_kernels.split(","):
            attn = lambda q_, k_, v_, kernel=kernel: _single(ctx, q_, k_, v_, kernel)  # noqa: E731

            def fwd():
                with torch.no_grad():
                    attn(qt, kt, vt)

            # A dummy buffer of 2W tokens makes context_parallel choose its head-tail load balancer; the
            # shards are ours (the zigzag split), and its output is checked against the ring's.
            dummy = torch.zeros(1, 1, 2 * ctx.world, 1, device=ctx.device)
            got: dict = dict(cp_kernel=kernel)
            try:
                if set_rotate_method is not None:
                    set_rotate_method(method)
                with context_parallel(_MESH, buffers=[dummy], buffer_seq_dims=[2], no_restore_buffers={dummy}):
                    got["cp_load_balance"] = _cp_load_balance()
                    if reference is not None:
                        with torch.no_grad():
                            out = attn(qt, kt, vt).transpose(1, 2)
                        got["rel_diff_vs_ring_zigzag"] = ctx.reduce(rel_err(out, reference))
                    got["fwd_s"] = measure(ctx, fwd)
                    got["fwd_bwd_s"], got["peak_gib"] = measure(ctx, _fwd_bwd(attn, qt, kt, vt, dot), peak=True)
                row.update(got)
                break
            except Exception as error:  # noqa: BLE001 — try the next kernel, then report
                failures.append(f"{kernel}: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}")
        if "fwd_s" not in row:
            row["unavailable"] = "; ".join(failures)
        elif failures:
            row["note"] = "SDPA kernel fallback (" + "; ".join(failures) + ")"
        rows.append(row)
    return rows


def _single(ctx: Ctx, q: Tensor, k: Tensor, v: Tensor, kernel: str = "cudnn") -> Tensor:
    """One GPU, no communication: causal SDPA on (batch, heads, seq, head_dim) tensors."""
    with sdpa_context(ctx, kernel):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _single_times(ctx: Ctx, n: int, seed: int) -> tuple[float, float]:
    """Seconds of forward and of forward+backward of causal SDPA over n tokens on each GPU alone."""
    qt, kt, vt, dot = (t.transpose(1, 2) for t in _inputs(ctx, n, seed))
    attn = lambda q_, k_, v_: _single(ctx, q_, k_, v_)  # noqa: E731

    def fwd():
        with torch.no_grad():
            attn(qt, kt, vt)

    return measure(ctx, fwd), measure(ctx, _fwd_bwd(attn, qt, kt, vt, dot))


def scaling_rows(ctx: Ctx, n: int) -> tuple[list[dict], bool]:
    """Every variant at n tokens per GPU."""
    a = ctx.args
    seq = ctx.world * n
    t1_f, t1_fb = _single_times(ctx, n, a.seed + ctx.rank)
    base = dict(tokens=n, world=ctx.world, seq=seq, t1_fwd_s=ctx.world * t1_f, t1_fwd_bwd_s=ctx.world * t1_fb)
    if seq <= a.mono_max and ctx.world > 1:  # at W = 1 it is the single-GPU time itself
        mono_f, mono_fb = _single_times(ctx, seq, a.seed)
        base.update(mono_fwd_s=mono_f / ctx.world, mono_fwd_bwd_s=mono_fb / ctx.world)
    kernel = "cuDNN" if ctx.cuda else "PyTorch's pick"
    rows = [dict(variant=f"1 GPU alone: causal SDPA ({kernel}) over n tokens, × W", fwd_s=base["t1_fwd_s"],
                 fwd_bwd_s=base["t1_fwd_bwd_s"])]
    q, k, v, do = _inputs(ctx, n, a.seed + ctx.rank)
    reference, ok = None, True
    for layout in a.layouts.split(","):
        rows.append(ring_row(ctx, n, layout, q, k, v, do))
        if layout == "zigzag":
            with torch.no_grad():
                reference = ring_attention(q, k, v, causal=True, layout="zigzag", backend="auto")
    for row in cp_rows(ctx, q, k, v, do, reference):
        diff = row.get("rel_diff_vs_ring_zigzag")
        if diff is not None and not diff <= a.cp_tolerance:
            row["note"] = f"DISAGREES with the ring (rel diff {diff:.2e} > {a.cp_tolerance})"
            ok = False
        rows.append(row)
    for row in rows:
        row.update(base)
        for p in ("fwd", "fwd_bwd"):
            if row.get(f"{p}_s"):
                flops = attention_flops(a.heads, seq, a.head_dim, p == "fwd_bwd") / ctx.world
                row[f"{p}_tflops_per_gpu"] = flops / row[f"{p}_s"] / 1e12
                row[f"{p}_vs_1gpu"] = base[f"t1_{p}_s"] / row[f"{p}_s"]
                if f"mono_{p}_s" in base:
                    row[f"{p}_vs_mono"] = base[f"mono_{p}_s"] / row[f"{p}_s"]
        ctx.log("  " + _row_text(row))
    return rows, ok


def run_scaling(ctx: Ctx) -> tuple[dict, bool]:
    a = ctx.args
    rows, ok = [], True
    for n in map(int, a.tokens.split(",")):
        ctx.log(f"scaling: {n} tokens/GPU, W={ctx.world}, S={ctx.world * n}")
        more, good = scaling_rows(ctx, n)
        rows, ok = rows + more, ok and good
        if ctx.cuda:
            torch.cuda.empty_cache()
    return dict(rows=rows, shapes=dict(heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim, dtype="bfloat16",
                                       batch=1, causal=True)), ok


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _row_text(r: dict) -> str:
    if "unavailable" in r:
        return f"{r['variant']:48s} unavailable: {r['unavailable']}"
    return (f"{r['variant']:48s} fwd {r['fwd_s'] * 1e3:9.2f} ms ({_fmt(r.get('fwd_vs_1gpu'), '.2f')} of 1 GPU)  "
            f"fwd+bwd {r['fwd_bwd_s'] * 1e3:9.2f} ms ({_fmt(r.get('fwd_bwd_vs_1gpu'), '.2f')})  "
            f"hidden {_fmt(r.get('fwd_hidden'), '.0%')} / {_fmt(r.get('fwd_bwd_hidden'), '.0%')}  "
            f"peak {_fmt(r.get('peak_gib'), '.1f')} GiB {r.get('note', '')}")


def scaling_targets(rows: list[dict]) -> list[str]:
    """The issue's targets, checked on the rows at hand."""
    out = []
    for r in rows:
        if r["world"] == 8 and r["tokens"] == 32768 and r["variant"].startswith("ring") and "fwd_bwd_vs_1gpu" in r:
            met = r["fwd_bwd_vs_1gpu"] >= 0.95
            out.append(f"- ≥ 95% of single-GPU throughput per GPU, W = 8, 32k tokens/GPU, fwd+bwd, {r['variant']}: "
                       f"{r['fwd_bwd_vs_1gpu']:.1%} → {'met' if met else 'NOT met'}")
    if not out:
        out.append("- ≥ 95% at W = 8, 32k tokens/GPU, fwd+bwd: not measured in this run (needs W = 8 and 32768 "
                   "tokens/GPU)")
    keys = sorted({(r["world"], r["tokens"]) for r in rows})
    for world, tokens in keys:
        group = [r for r in rows if (r["world"], r["tokens"]) == (world, tokens) and "unavailable" not in r]
        ours = [r for r in group if r["variant"].startswith("ring")]
        theirs = [r for r in group if r["variant"].startswith("torch cp") and "DISAGREES" not in r.get("note", "")]
        if not ours or not theirs:
            continue
        for p, name in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd")):
            best_ours = min(ours, key=lambda r: r[f"{p}_s"])
            best_cp = min(theirs, key=lambda r: r[f"{p}_s"])
            ahead = best_ours[f"{p}_s"] < best_cp[f"{p}_s"]
            out.append(f"- ahead of PyTorch's context parallel, W = {world}, {tokens} tokens/GPU, {name}: "
                       f"{best_ours['variant']} {best_ours[f'{p}_s'] * 1e3:.1f} ms vs {best_cp['variant']} "
                       f"{best_cp[f'{p}_s'] * 1e3:.1f} ms ({best_cp[f'{p}_s'] / best_ours[f'{p}_s']:.2f}×) → "
                       f"{'yes' if ahead else 'NO'}")
    return out


def scaling_markdown(data: dict) -> str:
    s = data["shapes"]
    lines = ["## Scaling\n",
             f"Causal, {s['dtype']}, batch {s['batch']}, {s['heads']} query / {s['kv_heads']} KV heads, head_dim "
             f"{s['head_dim']}; n tokens per GPU, S = W·n. Time: the slowest rank's mean over calls run back to back. "
             "**÷1 GPU** = W × (cuDNN causal SDPA over n tokens on one GPU alone) ÷ time: the fraction of single-GPU "
             "throughput each GPU keeps for the same per-GPU work (1/W of the causal FLOPs over S). **÷mono** = "
             "(one GPU running cuDNN causal SDPA over all S tokens) ÷ W ÷ time, where measured. **hidden** = "
             "1 − (t_on − t_off) / t_comm, t_off = the same ring with every transfer replaced by a local copy, "
             "t_comm = the same transfers alone. TFLOP/s per GPU = 4·h·d·S²/2 (×3.5 fwd+bwd) ÷ W ÷ time. Peak: "
             "max allocated during one fwd+bwd, inputs included, largest over ranks.\n",
             "| W | tokens/GPU | variant | fwd ms | fwd ÷1 GPU | fwd+bwd ms | fwd+bwd ÷1 GPU | fwd+bwd ÷mono "
             "| TFLOP/s/GPU fwd+bwd | hidden fwd | hidden fwd+bwd | no-comm fwd+bwd ms | comm-only fwd+bwd ms "
             "| peak GiB | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(data["rows"], key=lambda r: (r["world"], r["tokens"])):
        if "unavailable" in r:
            lines.append(f"| {r['world']} | {r['tokens']} | {r['variant']} | | | | | | | | | | | | unavailable: "
                         f"{r['unavailable']} |")
            continue
        ms = lambda key: _fmt(r.get(key) and r[key] * 1e3, ".2f")  # noqa: E731
        note = r.get("note", "")
        if "rel_diff_vs_ring_zigzag" in r and not note:
            note = f"rel diff vs ring zigzag {r['rel_diff_vs_ring_zigzag']:.1e}"
        lines.append(f"| {r['world']} | {r['tokens']} | {r['variant']} | {ms('fwd_s')} | "
                     f"{_fmt(r.get('fwd_vs_1gpu'), '.2f')} | {ms('fwd_bwd_s')} | "
                     f"{_fmt(r.get('fwd_bwd_vs_1gpu'), '.2f')} | {_fmt(r.get('fwd_bwd_vs_mono'), '.2f')} | "
                     f"{_fmt(r.get('fwd_bwd_tflops_per_gpu'), '.3g')} | "
                     f"{_fmt(r.get('fwd_hidden'), '.0%')} | {_fmt(r.get('fwd_bwd_hidden'), '.0%')} | "
                     f"{ms('fwd_bwd_off_s')} | {ms('fwd_bwd_comm_s')} | {_fmt(r.get('peak_gib'), '.2f')} | {note} |")
    lines += ["", "Targets (issue 6):", *scaling_targets(data["rows"])]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Memory


def _layer(ctx: Ctx, n: int) -> tuple[float | None, float | None, float]:
    """Peak allocated and peak reserved GiB (largest over ranks) and seconds of one ring
    forward+backward with n tokens per GPU."""
    q, k, v, do = _inputs(ctx, n, ctx.args.seed + ctx.rank)
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


def run_memory(ctx: Ctx, write_partial: Callable[[dict], None]) -> tuple[dict, bool]:
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
        ctx.log(f"  peak {_fmt(peak, '.2f')} GiB, {last_s:.2f} s")
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


def memory_markdown(data: dict) -> str:
    s = data["shapes"]
    cap = f"{data['capacity_gib']:.1f} GiB per GPU" if data.get("capacity_gib") else "n/a on CPU"
    lines = ["## Peak memory per GPU (one attention layer, forward + backward)\n",
             f"Ring {s['layout']}, causal, {s['dtype']}, {s['heads']} query / {s['kv_heads']} KV heads, head_dim "
             f"{s['head_dim']}, W = {data['world']}; memory {cap}"
             f"{' (--mem-fraction ' + str(data['mem_fraction']) + ')' if data['mem_fraction'] < 1 else ''}. "
             "Peak: max allocated (and reserved by the caching allocator), inputs and gradients included, largest "
             "over ranks; the memory PyTorch could use is the cap or what was free at the start, whichever is less."
             "\n",
             "| tokens/GPU | S | peak GiB | reserved GiB | KiB per token | fwd+bwd s |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        per_token = r["peak_gib"] / r["tokens"] * 2**20 if r.get("peak_gib") else None
        lines.append(f"| {r['tokens']} | {r['seq']} | {_fmt(r.get('peak_gib'), '.2f')} | "
                     f"{_fmt(r.get('reserved_gib'), '.2f')} | {_fmt(per_token, '.1f')} | {r['seconds']:.2f} |")
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


# ----------------------------------------------------------------------------------------------
# Output


def _load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_part(out: str, part: str, data: dict, run: dict) -> None:
    path = os.path.join(out, f"{part}.json")
    if part == "scaling":  # keep rows of earlier runs (same world size and GPU) that this run did not redo
        old = _load(path)
        if old and old.get("shapes") == data["shapes"] and old["runs"][-1]["environment"].get("gpu") == \
                run["environment"].get("gpu"):
            done = {(r["world"], r["tokens"], r["variant"]) for r in data["rows"]}
            kept = [r for r in old["rows"] if (r["world"], r["tokens"], r["variant"]) not in done]
            data["rows"] = kept + data["rows"]
            data["runs"] = old["runs"] + [run]
    data.setdefault("runs", [run])
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)
    body = {"correctness": correctness_markdown, "scaling": scaling_markdown, "memory": memory_markdown}[part](data)
    with open(os.path.join(out, f"{part}.md"), "w") as f:
        f.write(body + "\nRuns:\n" + "\n".join(
            f"- `{r['command']}` — {env_line(r['environment'])}"
            + (" — **tiny sizes (dry run or CPU): the timings say nothing about performance**" if r.get("tiny") else "")
            for r in data["runs"]) + "\n")


def write_summary(out: str, with_plot: bool = True) -> None:
    parts = [p for p in PARTS if os.path.exists(os.path.join(out, f"{p}.md"))]
    text = "# Ring attention over several GPUs (issue 6)\n\nWritten by `benchmarks/multi_gpu_ring.py`; see its " \
           "docstring for every definition.\n\n"
    for p in parts:
        with open(os.path.join(out, f"{p}.md")) as f:
            text += f.read() + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    if with_plot:
        with contextlib.suppress(ImportError):  # no matplotlib: no plot
            plot(out)


def _tokens(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.3g}M"
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def plot(out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scaling, memory = _load(os.path.join(out, "scaling.json")), _load(os.path.join(out, "memory.json"))
    has_peaks = bool(memory and any(r.get("peak_gib") is not None for r in memory["rows"]))
    panels = [p for p in (scaling and "fwd", scaling and "fwd_bwd", has_peaks and "memory") if p]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "memory":
            rows = [r for r in memory["rows"] if r.get("peak_gib") is not None]
            ax.plot([r["tokens"] for r in rows], [r["peak_gib"] for r in rows], "o-", label="peak allocated")
            ax.plot([r["tokens"] for r in rows], [r["reserved_gib"] for r in rows], "s-", label="peak reserved")
            if memory.get("capacity_gib"):
                ax.axhline(memory["capacity_gib"], color="k", ls=":", lw=0.8, label="GPU memory")
            if memory.get("fit_gib"):
                fit, top = memory["fit_gib"], memory["extrapolated_max_tokens"]
                lo, hi = rows[-1]["tokens"], max(top, rows[-1]["tokens"])
                xs = [lo * (hi / lo) ** (i / 32) for i in range(33)]
                ax.plot(xs, [fit["a"] + fit["b_per_token"] * x for x in xs], "--", color="gray",
                        label=f"linear extrapolation (limit ~{_tokens(top)})")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens per GPU")
            ax.set_ylabel("peak GiB per GPU")
            ax.set_title(f"ring zigzag, one layer fwd+bwd, W = {memory['world']}")
            ax.legend(fontsize=7)
            continue
        rows = [r for r in scaling["rows"] if f"{panel}_vs_1gpu" in r and not r["variant"].startswith("1 GPU")]
        keys = sorted({(r["world"], r["tokens"]) for r in rows})
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        width = 0.8 / max(1, len(variants))
        for i, var in enumerate(variants):
            ys = [next((r[f"{panel}_vs_1gpu"] for r in rows if (r["world"], r["tokens"]) == key
                        and r["variant"] == var), 0) for key in keys]
            ax.bar([x + i * width for x in range(len(keys))], ys, width, label=var)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(0.95, color="k", lw=0.8, ls=":")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))], [f"W={w}\n{_tokens(t)}/GPU" for w, t in keys])
        ax.set_ylabel("throughput per GPU ÷ one GPU alone")
        ax.set_title(f"causal {'forward' if panel == 'fwd' else 'forward+backward'}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "results.png"), dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of: " + ", ".join(PARTS))
    p.add_argument("--out", default="benchmarks/results/multi_gpu_latest")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes everywhere (always so on CPU)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="process-group timeout, seconds")
    p.add_argument("--cpu-threads", type=int, default=1)
    g = p.add_argument_group("correctness (defaults: GPU | tiny)")
    g.add_argument("--dtypes", help="bfloat16 | float64,float32,bfloat16 on CPU")
    g.add_argument("--backends", default="auto", help="ring backends to check, e.g. auto,triton,sdpa")
    g.add_argument("--check-local", type=int, help="tokens per rank: 256 | 8")
    g.add_argument("--check-batch", type=int, help="1 | 2")
    g.add_argument("--check-heads", type=int, help="8 | 4")
    g.add_argument("--check-kv-heads", type=int, help="GQA variant's KV heads: 2")
    g.add_argument("--check-head-dim", type=int, help="128 | 8")
    g.add_argument("--check-window", type=int, help="sliding window in tokens: 1.5 × check-local + 1")
    g.add_argument("--check-bucket", type=int, default=4, help="torch backend tile (CPU)")
    g.add_argument("--perturb", type=float, default=0.0, help="negative control: scale the last rank's dq by "
                   "1 + PERTURB before comparing; the check must then fail")
    g = p.add_argument_group("scaling and memory (defaults: GPU | tiny)")
    g.add_argument("--tokens", help="tokens per GPU: 8192,32768,131072 | 64,128")
    g.add_argument("--heads", type=int, help="32 | 4")
    g.add_argument("--kv-heads", type=int, help="8 | 2")
    g.add_argument("--head-dim", type=int, help="128 | 16")
    g.add_argument("--layouts", default="zigzag,striped")
    g.add_argument("--cp-rotate", default="allgather,alltoall", help="PyTorch context_parallel rotate methods ('' "
                   "to skip)")
    g.add_argument("--cp-kernels", default="cudnn,flash,default", help="SDPA kernels for context_parallel, "
                   "first that runs")
    g.add_argument("--cp-tolerance", type=float, default=0.02, help="largest rel diff of CP's output vs the ring's")
    g.add_argument("--mono-max", type=int, help="largest S for the monolithic one-GPU column: 65536 | 512")
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--min-time", type=float, help="seconds of timed calls per measurement: 1.0 | 0.05")
    g.add_argument("--max-reps", type=int, default=20)
    g.add_argument("--mem-start", type=int, help="first tokens/GPU: 8192 | 64")
    g.add_argument("--mem-max", type=int, help="largest tokens/GPU tried: 2**24 | 256")
    g.add_argument("--mem-budget-s", type=float, default=240, help="seconds for the memory part")
    g.add_argument("--mem-fraction", type=float, default=1.0, help="cap on the memory per GPU (tests)")
    args = p.parse_args(argv)
    bad = set(args.parts.split(",")) - set(PARTS)
    if bad:
        p.error(f"--parts: unknown {', '.join(sorted(bad))}; use {', '.join(PARTS)}")
    return args


def resolve_defaults(args: argparse.Namespace, cuda: bool) -> None:
    """Fill the size defaults: full sizes on GPUs, tiny ones on CPU or with --dry-run."""
    tiny = args.dry_run or not cuda
    defaults = dict(
        dtypes="bfloat16" if cuda else "float64,float32,bfloat16",
        check_local=64 if (tiny and cuda) else 256 if cuda else 8, check_batch=1 if cuda else 2,
        check_heads=8 if cuda else 4, check_kv_heads=2, check_head_dim=64 if (tiny and cuda) else 128 if cuda else 8,
        tokens="64,128" if not cuda else "1024,2048" if tiny else "8192,32768,131072",
        heads=4 if not cuda else 32, kv_heads=2 if not cuda else 8, head_dim=16 if not cuda else 128,
        mono_max=512 if not cuda else 65536, min_time=0.05 if tiny else 1.0,
        mem_start=64 if not cuda else 1024 if tiny else 8192, mem_max=256 if not cuda else 8192 if tiny else 2**24,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.check_window is None:
        args.check_window = args.check_local * 3 // 2 + 1
    if tiny:
        args.max_reps = min(args.max_reps, 3)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = init(args)
    resolve_defaults(args, ctx.cuda)
    env = environment(ctx)
    run = dict(command=command_line(ctx), environment=env, tiny=args.dry_run or not ctx.cuda)
    ctx.log(env_line(env))
    if ctx.rank == 0:
        os.makedirs(args.out, exist_ok=True)
    ok = True
    parts = args.parts.split(",")
    try:
        if "correctness" in parts:
            started = time.perf_counter()
            data, good = run_correctness(ctx)
            ctx.log(f"correctness: {time.perf_counter() - started:.1f} s")
            data.update(world=ctx.world, sizes=dict(batch=args.check_batch, local=args.check_local,
                                                    heads=args.check_heads, head_dim=args.check_head_dim,
                                                    window=args.check_window))
            ok &= good
            if ctx.rank == 0:
                text = correctness_markdown(data)
                print(text, flush=True)
                write_part(args.out, "correctness", data, run)
        if "scaling" in parts:
            started = time.perf_counter()
            data, good = run_scaling(ctx)
            ctx.log(f"scaling: {time.perf_counter() - started:.1f} s")
            ok &= good
            if ctx.rank == 0:
                write_part(args.out, "scaling", data, run)
                print("\n".join(scaling_targets(data["rows"])), flush=True)

        def partial(data: dict) -> None:
            if ctx.rank == 0:
                write_part(args.out, "memory", dict(data), run)
                write_summary(args.out, with_plot=False)

        if "memory" in parts:
            data, good = run_memory(ctx, partial)
            ok &= good
            partial(data)
            if ctx.rank == 0:
                print(memory_markdown(data), flush=True)
        if ctx.rank == 0:
            write_summary(args.out)
            print(f"results: {os.path.join(args.out, 'results.md')}", flush=True)
        ok = ctx.reduce(1.0 if ok else 0.0, dist.ReduceOp.MIN) > 0
    finally:
        dist.destroy_process_group()
    if ctx.rank > 0:  # rank 0 carries the verdict; the others exiting early would make torchrun kill it
        return 0
    if not ok:
        print("WRONG RESULTS (see the tables above)", file=sys.stderr, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
