"""PyTorch's context parallel on the ring's zigzag shards, for the scaling part (a prototype API: whatever
this torch lacks is reported as unavailable)."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable

import torch
from torch import Tensor

from benchmarks.multi_gpu.ranks import Ctx, causal_sdpa, fwd_and_fwd_bwd, measure
from ring_sp.reference import rel_err

_MODULES = ("torch.distributed.tensor.experimental._attention",
            "torch.distributed.tensor.experimental._context_parallel._attention")
_MESH = None  # one device mesh over the world, made on first use


def _api() -> tuple[Callable, Callable, Callable | None]:
    """(init_device_mesh, context_parallel, set_rotate_method or None) of the installed torch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    set_rotate_method = None
    for module in _MODULES:
        with contextlib.suppress(ImportError, AttributeError):
            set_rotate_method = importlib.import_module(module).set_rotate_method
            break
    return init_device_mesh, context_parallel, set_rotate_method


def _load_balance() -> bool | None:
    """Whether PyTorch's context parallel runs its load-balanced (head-tail) schedule, if it says."""
    for module in _MODULES:
        with contextlib.suppress(ImportError, AttributeError):
            return bool(importlib.import_module(module)._cp_options.enable_load_balance)
    return None


def rows(ctx: Ctx, q: Tensor, k: Tensor, v: Tensor, do: Tensor, reference: Tensor | None) -> list[dict]:
    """PyTorch's context_parallel on the same (zigzag = head-tail) shards, per rotate method.

    SDPA kernel: the first of ``--cp-kernels`` that runs (cuDNN first, as our backend auto).
    """
    a = ctx.args
    methods = [m for m in a.cp_rotate.split(",") if m]
    if not methods:
        return []
    try:
        init_device_mesh, context_parallel, set_rotate_method = _api()
    except ImportError as error:
        return [dict(variant=f"torch cp {m}", unavailable=f"cannot import context_parallel: {error}") for m in methods]
    if not ctx.cuda:
        return [dict(variant=f"torch cp {m}", unavailable="needs CUDA (its SDPA handlers cover the CUDA ops only)")
                for m in methods]
    global _MESH
    if _MESH is None:
        _MESH = init_device_mesh("cuda", (ctx.world,))
    qt, kt, vt, dot = (t.transpose(1, 2) for t in (q, k, v, do))  # (batch, heads, seq, head_dim)
    out_rows = []
    for method in methods:
        row, failures = dict(variant=f"torch cp {method}"), []
        if set_rotate_method is None and method != "allgather":
            out_rows.append(dict(row, unavailable="this torch has no set_rotate_method (allgather only)"))
            continue
        for kernel in a.cp_kernels.split(","):
            attn = lambda q_, k_, v_, kernel=kernel: causal_sdpa(ctx, q_, k_, v_, kernel)  # noqa: E731
            # A dummy buffer of 2W tokens makes context_parallel choose its head-tail load balancer; the
            # shards are ours (the zigzag split), and its output is checked against the ring's.
            dummy = torch.zeros(1, 1, 2 * ctx.world, 1, device=ctx.device)
            got: dict = dict(cp_kernel=kernel)
            try:
                if set_rotate_method is not None:
                    set_rotate_method(method)
                with context_parallel(_MESH, buffers=[dummy], buffer_seq_dims=[2], no_restore_buffers={dummy}):
                    got["cp_load_balance"] = _load_balance()
                    if reference is not None:
                        with torch.no_grad():
                            out = attn(qt, kt, vt).transpose(1, 2)
                        got["rel_diff_vs_ring_zigzag"] = ctx.reduce(rel_err(out, reference))
                    fwd, fwd_bwd = fwd_and_fwd_bwd(attn, qt, kt, vt, dot)
                    got["fwd_s"] = measure(ctx, fwd)
                    got["fwd_bwd_s"], got["peak_gib"] = measure(ctx, fwd_bwd, peak=True)
                row.update(got)
                break
            except Exception as error:  # noqa: BLE001 — try the next kernel, then report
                failures.append(f"{kernel}: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}")
        if "fwd_s" not in row:
            row["unavailable"] = "; ".join(failures)
        elif failures:
            row["note"] = "SDPA kernel fallback (" + "; ".join(failures) + ")"
        out_rows.append(row)
    return out_rows
