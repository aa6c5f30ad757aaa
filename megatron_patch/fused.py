"""Which fused kernels the GPT layers use: ``--fused-kernels {auto,liger,none}`` (no Megatron import here).

``liger``: liger-kernel's Triton kernels (``megatron_patch.liger``: RMSNorm, SwiGLU, RoPE, fused linear
cross-entropy); they run on CUDA only. ``none``: Megatron-core's own modules. ``auto``: liger when it
is installed and the job runs on GPUs, else none.
"""

from __future__ import annotations

import importlib.util

FUSED_KERNELS = ("auto", "liger", "none")


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_fused_kernels(choice: str, device_type: str) -> str:
    """``liger`` or ``none`` for ``choice`` on ``device_type`` ("cuda" or "cpu"); ValueError naming the fix."""
    if choice not in FUSED_KERNELS:
        raise ValueError(f"--fused-kernels {choice!r}: use one of {', '.join(FUSED_KERNELS)}")
    if choice == "auto":
        return "liger" if liger_installed() and device_type == "cuda" else "none"
    if choice == "liger" and not liger_installed():
        raise ValueError("--fused-kernels liger: liger-kernel is not installed; pip install liger-kernel (or "
                         "ring_sp[liger]), or use --fused-kernels none")
    if choice == "liger" and device_type != "cuda":
        raise ValueError("--fused-kernels liger: liger-kernel's Triton kernels need CUDA and this job runs on the "
                         "CPU; use --fused-kernels none (or auto)")
    return choice
