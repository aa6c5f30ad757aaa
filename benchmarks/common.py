"""The harness the benchmark scripts share: inputs, timing, FLOP counts, the environment record and result files."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

GIB = 2**30


def randn(*shape: int, device: torch.device | str = "cuda", generator: torch.Generator | None = None) -> Tensor:
    """Standard normal bf16 inputs."""
    return torch.randn(*shape, generator=generator, device=device, dtype=torch.bfloat16)


def sdpa_kernel(kernel: str) -> contextlib.AbstractContextManager:
    """PyTorch's SDPA restricted to one kernel: ``cudnn``, ``flash``, ``efficient``; ``default`` lets PyTorch pick."""
    if kernel == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION}[kernel])


def attention_flops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int, causal: bool,
                    backward: bool = False) -> float:
    """4·b·h·sq·sk·d for the forward (half of it when causal), ×3.5 for forward+backward."""
    flops = 4 * batch * heads * seq_q * seq_k * head_dim * (0.5 if causal else 1.0)
    return flops * (3.5 if backward else 1.0)


def bench_ms(fn: Callable[[], object], warmup_ms: float = 100, rep_ms: float = 400) -> float:
    """Median milliseconds of ``fn()`` (CUDA events, triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def throughput_ms(fn: Callable[[], object], iters: int = 4, warmup: int = 2) -> float:
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


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Device, software versions (of the installed packages among torch, triton, deepspeed,
    megatron-core and the optional kernel libraries) and UTC time, for the header of a results file."""
    if torch.cuda.is_available():
        memory = torch.cuda.get_device_properties().total_memory
        env = dict(gpu=torch.cuda.get_device_name(), gpu_memory_gib=round(memory / GIB, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), nccl=".".join(map(str, torch.cuda.nccl.version())))
    else:
        env = dict(gpu="none (CPU)", cpu=platform.processor() or platform.machine())
    packages = ("triton", "deepspeed", "megatron-core", "flash-attn-4", "nvidia-cudnn-frontend", "liger-kernel")
    env.update(torch=torch.__version__, **{p: _version(p) for p in packages},
               python=platform.python_version(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    return env


def env_line(env: dict) -> str:
    """The record in one line: ``gpu NAME; torch 2.x; ...``."""
    return "; ".join(f"{key} {value}" for key, value in env.items() if value is not None)


def command_line() -> str:
    """How this process was started: ``python benchmarks/x.py ...``, or the torchrun command of its job."""
    argv = " ".join(sys.argv)
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return f"python {argv}"
    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    nodes = world // local
    return f"torchrun{f' --nnodes {nodes}' if nodes > 1 else ''} --nproc-per-node {local} {argv}"


def fmt(x: float | None, spec: str, none: str = "-") -> str:
    """``format(x, spec)``, or ``none`` for a missing value."""
    return none if x is None else format(x, spec)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A markdown table, one line per row."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def load_json(path: str) -> dict | None:
    """The JSON object in ``path``, or None if there is none (no file, or not JSON)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_results(folder: str, markdown: str, data: dict, name: str = "results") -> None:
    """``name``.md (the tables) and ``name``.json (every number) in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)
