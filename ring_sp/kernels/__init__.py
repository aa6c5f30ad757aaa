"""One block of attention, no distribution: the backends and the registry that picks one."""

from ring_sp.kernels.registry import Backend, choose, get, names, register
from ring_sp.kernels.state import State, state_dtype
from ring_sp.kernels.torch_backend import TorchBackend

register("torch", TorchBackend, priority=0)

__all__ = ["Backend", "State", "TorchBackend", "choose", "get", "names", "register", "state_dtype"]
