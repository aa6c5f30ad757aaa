"""One block of attention, no distribution: the backends and the registry that picks one."""

import importlib.util

from ring_sp.band import Band
from ring_sp.kernels.registry import Backend, choose, get, names, register
from ring_sp.kernels.sdpa_backend import SdpaBackend
from ring_sp.kernels.state import State, state_dtype
from ring_sp.kernels.torch_backend import TorchBackend
from ring_sp.kernels.visibility import BlockDocuments, Visibility

register("torch", TorchBackend, priority=0)


def _triton(bucket_size):
    from ring_sp.kernels.triton_backend import TritonBackend

    return TritonBackend(bucket_size)


if importlib.util.find_spec("triton") is not None:
    register("triton", _triton, priority=10)

register("sdpa", lambda bucket_size: SdpaBackend(), priority=20)


def _flash_attn(bucket_size):
    from ring_sp.kernels.flash_attn_backend import FlashAttnBackend

    return FlashAttnBackend(bucket_size)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package that is missing or fails to import
        return False


# flash-attn 2 (flash-attn-4 alone installs the namespace package flash_attn with only flash_attn.cute in it: that
# one is the sdpa backend's "fa4" op)
if _installed("flash_attn.flash_attn_interface"):
    register("flash_attn", _flash_attn, priority=15)

for _op in ("fa4", "cudnn", "cudnn_ragged", "flash", "efficient", "cpu"):
    register(f"sdpa_{_op}", lambda bucket_size, op=_op: SdpaBackend(op), priority=-10)

__all__ = ["Backend", "Band", "BlockDocuments", "SdpaBackend", "State", "TorchBackend", "Visibility", "choose", "get",
           "names", "register", "state_dtype"]
