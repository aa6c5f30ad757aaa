"""Shared helpers for the GPU benchmarks: timing, FLOP counts, environment line."""

from __future__ import annotations

import datetime
import platform

import torch


def environment() -> str:
    """GPU, software versions and date, for the header of a results file."""
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    cudnn = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    return (f"{gpu}; torch {torch.__version__}; CUDA {torch.version.cuda}; cuDNN {cudnn}; triton {triton.__version__}; "
            f"python {platform.python_version()}; {datetime.date.today().isoformat()}")


def attention_flops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int, causal: bool,
                    backward: bool = False) -> float:
    """4·b·h·sq·sk·d for the forward (half of it when causal), ×3.5 for forward+backward."""
    flops = 4 * batch * heads * seq_q * seq_k * head_dim * (0.5 if causal else 1.0)
    return flops * (3.5 if backward else 1.0)


def bench_ms(fn, warmup_ms: float = 100, rep_ms: float = 400) -> float:
    """Median milliseconds of ``fn()`` (CUDA events, triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def throughput_ms(fn, iters: int = 4, warmup: int = 2) -> float:
    """Milliseconds per call of ``fn()`` run back to back (CUDA events around ``iters`` calls).

    Unlike ``bench_ms`` (one call at a time, cache flushed before each), the host may run ahead
    of the GPU as it does in training, so per-call Python set-up is hidden behind GPU work.
    """
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
