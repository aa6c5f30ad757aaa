"""Block backend on the flash-attn package (optional: registered only when it imports).

Forward through the public ``flash_attn_func(..., return_attn_probs=True)`` (which returns the
log-sum-exp), merged into the float32 state; backward through flash-attn's
``_flash_attn_backward`` given the final output and lse, its arguments bound by name because
they moved between releases. Tensors are (batch, seq, heads, head_dim) as ours; GQA is native.

flash-attn aligns its causal mask and window to the bottom-right corner, ours to the top-left:
they agree on square blocks, so causal blocks are computed on the square left after the one-row
shift (band lo = c ≥ 0: rows c: against keys :sq − c) and the window hi − lo is passed as the
left window. Other shapes are left to other backends.

flash-attn cannot be installed on the machines this project is developed on, so on first use
the backend checks itself on a small block against the torch backend and turns itself off with
a warning if they disagree.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import Tensor

from ring_sp.band import Band
from ring_sp.kernels.sdpa_backend import accumulate, fold
from ring_sp.kernels.state import State
from ring_sp.kernels.visibility import Visibility

log = logging.getLogger("ring_sp")


class FlashAttnBackend:
    name = "flash_attn"
    auto_devices = ("cuda",)
    uses_delta = False  # flash-attention's backward computes rowsum(do · out) itself
    adds_once = True  # one call, one accumulate per gradient

    def __init__(self, bucket_size: int | None = None):
        from flash_attn import flash_attn_func
        from flash_attn.flash_attn_interface import _flash_attn_backward

        self._fwd, self._bwd = flash_attn_func, _flash_attn_backward
        self._bwd_params = set(inspect.signature(_flash_attn_backward).parameters)
        self._verified: dict[tuple, bool] = {}

    @staticmethod
    def _call_shape(band: Band, sq: int, sk: int) -> tuple[int, int, bool, int] | None:
        """(first row, number of keys, causal, left window) of the call computing ``band``, or None."""
        if band.lo is None:
            return (0, sk, False, -1) if band.hi is None else None
        if band.lo < 0 or sq - band.lo != min(sk, sq - band.lo) or sq - band.lo <= 0:
            return None  # only square causal calls keep flash-attn's alignment equal to ours
        window = -1 if band.hi is None else band.hi - band.lo
        return band.lo, sq - band.lo, True, window

    def unsupported(self, q: Tensor, k: Tensor, visibility: Visibility) -> str | None:
        if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
            return "needs fp16/bf16 CUDA tensors"
        if visibility.key_mask is not None or visibility.documents is not None:
            return "takes no key mask and no document mask"
        if self._call_shape(visibility.band, q.shape[1], k.shape[1]) is None:
            return "computes full blocks and square causal/window blocks only"
        if not self._works(q):
            return "failed its self-check against the torch backend on this GPU"
        return None

    def _attend(self, q, k, v, causal, window, scale):
        out, lse, _ = self._fwd(q, k, v, softmax_scale=scale, causal=causal, window_size=(window, 0 if causal else -1),
                                return_attn_probs=True)
        return out, lse

    def forward(self, q: Tensor, k: Tensor, v: Tensor, state: State, visibility: Visibility, scale: float, *,
                fresh: bool = False, out: Tensor | None = None) -> None:
        row0, n_keys, causal, window = self._call_shape(visibility.band, q.shape[1], k.shape[1])
        o, lse = self._attend(q[:, row0:], k[:, :n_keys], v[:, :n_keys], causal, window, scale)
        fold(state, row0, o, lse.float(), fresh=fresh, out=out)

    def backward(self, do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, delta: Tensor | None,
                 dq: Tensor, dk: Tensor, dv: Tensor, visibility: Visibility, scale: float) -> None:
        row0, n_keys, causal, window = self._call_shape(visibility.band, q.shape[1], k.shape[1])
        q_, k_, v_ = q[:, row0:].contiguous(), k[:, :n_keys].contiguous(), v[:, :n_keys].contiguous()
        gq, gk, gv = torch.empty_like(q_), torch.empty_like(k_), torch.empty_like(v_)
        args = dict(dout=do[:, row0:].contiguous(), q=q_, k=k_, v=v_, out=out[:, row0:].contiguous(),
                    softmax_lse=lse[:, :, row0:].contiguous(), dq=gq, dk=gk, dv=gv, dropout_p=0.0,
                    softmax_scale=scale, causal=causal, window_size_left=window,
                    window_size_right=0 if causal else -1, window_size=(window, 0 if causal else -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, rng_state=None)
        self._bwd(**{name: value for name, value in args.items() if name in self._bwd_params})
        accumulate(dq[:, row0:], gq)
        accumulate(dk[:, :n_keys], gk)
        accumulate(dv[:, :n_keys], gv)

    def _works(self, q: Tensor) -> bool:
        key = (q.device, q.dtype)
        if key not in self._verified:
            self._verified[key] = True  # let the check itself call forward/backward
            try:
                self._verified[key] = self._self_check(q.device, q.dtype)
            except Exception as e:  # noqa: BLE001 - any failure of an optional package disables it
                log.warning("flash_attn backend disabled: its self-check raised %s", e)
                self._verified[key] = False
        return self._verified[key]

    def _self_check(self, device, dtype) -> bool:
        from ring_sp.kernels.torch_backend import TorchBackend

        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v, do = (torch.randn(1, 96, 4, 64, generator=g).to(device, dtype) for _ in range(4))
        k, v = k[:, :, :2], v[:, :, :2]
        results = []
        for backend in (self, TorchBackend()):
            state = State.empty(q)
            backend.forward(q, k, v, state, Visibility(Band(lo=1, hi=40)), 0.125)
            out = state.output().to(dtype)
            delta = (do.float() * out.float()).sum(-1).transpose(1, 2)
            grads = [torch.zeros(t.shape, device=device) for t in (q, k, v)]
            backend.backward(do, q, k, v, out, state.lse, delta, *grads, Visibility(Band(lo=1, hi=40)), 0.125)
            results.append([out.float(), *grads])
        worst = max(((a - b).norm() / b.norm()).item() for a, b in zip(*results))
        if not worst < 2e-2:
            log.warning("flash_attn backend disabled: it differs from the torch backend by %.1e", worst)
        return worst < 2e-2
