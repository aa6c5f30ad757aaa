"""--fused-kernels: which kernels a run gets, the errors, and liger-kernel's modules against Megatron's own
(numerically on CPU where Triton's interpreter runs them: SwiGLU, RoPE and the fused linear cross-entropy; liger's
RMSNorm kernel does not run in the interpreter, so it is compared in tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from launch.args import parse_and_check
from megatron_patch import fused
from megatron_patch.fused import resolve_fused_kernels
from tests import fused_jobs


def test_auto_means_liger_only_where_it_runs(monkeypatch):
    monkeypatch.setattr(fused, "liger_installed", lambda: True)
    assert resolve_fused_kernels("auto", "cuda") == "liger"
    assert resolve_fused_kernels("auto", "cpu") == "none"
    assert resolve_fused_kernels("none", "cuda") == "none"
    assert resolve_fused_kernels("liger", "cuda") == "liger"
    with pytest.raises(ValueError, match="--fused-kernels liger: liger-kernel's Triton kernels need CUDA"):
        resolve_fused_kernels("liger", "cpu")
    monkeypatch.setattr(fused, "liger_installed", lambda: False)
    assert resolve_fused_kernels("auto", "cuda") == "none"
    with pytest.raises(ValueError, match="--fused-kernels liger: liger-kernel is not installed; pip install"):
        resolve_fused_kernels("liger", "cuda")


def test_the_job_refuses_liger_on_cpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(fused, "liger_installed", lambda: True)
    args, _ = parse_and_check(["--distributed-backend", "gloo"])
    assert args.fused_kernels == "none"  # auto on the CPU
    with pytest.raises(ValueError, match="need CUDA and this job runs on the CPU"):
        parse_and_check(["--fused-kernels", "liger", "--distributed-backend", "gloo"])
    with pytest.raises(ValueError, match="invalid choice: 'triton'"):
        parse_and_check(["--fused-kernels", "triton"])


def test_the_spec_takes_liger_modules_where_the_config_allows():
    pytest.importorskip("liger_kernel")
    from liger_kernel.megatron import LigerMegatronRMSNorm
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.mlp import MLP

    from megatron_patch.liger import LigerSwiGLUMLP, rope_marked, with_liger_kernels

    config = fused_jobs._config("RMSNorm")
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    liger, swapped = with_liger_kernels(spec, config)
    assert swapped == ["rms_norm", "swiglu", "rope"] and rope_marked(config)
    assert liger.submodules.input_layernorm is LigerMegatronRMSNorm is liger.submodules.pre_mlp_layernorm
    assert liger.submodules.mlp.module is LigerSwiGLUMLP and spec.submodules.mlp.module is MLP  # a copy
    config = fused_jobs._config("LayerNorm")  # LayerNorm is not liger's RMSNorm
    config.add_bias_linear = True  # liger's SwiGLU adds no bias
    config.rotary_interleaved = True  # liger's RoPE rotates halves, not interleaved pairs
    assert with_liger_kernels(get_gpt_layer_local_spec(), config)[1] == [] and not rope_marked(config)


def test_liger_swiglu_rope_and_fused_cross_entropy_match_megatrons_modules(dist_pool):
    pytest.importorskip("liger_kernel")
    if torch.cuda.is_available():
        pytest.skip("tests/test_gpu.py compares them on the GPU")
    (result,) = dist_pool(1).run(fused_jobs.liger_matches_plain, timeout=600)
    assert result["modules"] == ["LigerLossGPTModel", "LigerSwiGLUMLP"]  # what ran is liger's
    assert result["rope_calls"] == 2 * 2  # q and k of both layers, forward only (the plain model's: Megatron's)
    assert result["loss_shape"] == (2, fused_jobs.SEQ) and result["loss_dtype"] == "torch.float32"
    assert result["loss"] < 1e-5  # float32 (seen: 1e-6)
    assert max(result["grads"].values()) < 1e-5, result["grads"]  # seen: 7e-7
    assert len(result["grads"]) == 20  # every parameter, the output layer's through the fused loss


def _rotate64(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE in float64 by its definition: each half-pair (x1, x2) turned by the angle of its position."""
    t, angle = t.double(), freqs.double()
    x1, x2 = t.chunk(2, dim=-1)
    a = angle[..., : t.shape[-1] // 2]
    return torch.cat((x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin()), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("own", [True, False], ids=["own-tensor", "strided-view"])
def test_liger_rope_matches_float64_forward_and_backward(dtype, own):
    """liger's kernel through LigerRoPE, on a tensor of its own (rotated in place) and on a strided view of a
    fused qkv (rotated in a copy, the fused tensor untouched): output and input gradient against float64."""
    pytest.importorskip("liger_kernel")
    from megatron_patch.liger import LigerRoPE, cos_sin

    device = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU the kernel runs in Triton's interpreter
    s, b, h, d = 12, 2, 3, 16
    g = torch.Generator().manual_seed(0)
    freqs = (torch.randn(s, 1, 1, d // 2, generator=g).repeat(1, 1, 1, 2) * 3).to(device)  # Megatron's cat((f, f))
    qkv = torch.randn(s, b, h, 3 * d, generator=g).to(device, dtype).requires_grad_(True)
    before = qkv.detach().clone()
    t = qkv[..., d: 2 * d] * 1 if own else qkv[..., d: 2 * d]  # a tensor of its own, or a view of qkv
    assert (t._base is None) == own
    out = LigerRoPE.apply(t, *cos_sin(freqs, 1.0))
    assert (out.data_ptr() == t.data_ptr()) == own
    weight = torch.randn(s, b, h, d, generator=g).to(device)
    (out.float() * weight).sum().backward()
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # bf16: one rounding (Megatron's own path rounds four times)
    want = _rotate64(before[..., d: 2 * d], freqs)
    assert (out.double() - want).abs().max() / want.abs().max() < tol
    grad_want = _rotate64(weight, -freqs)  # d/dx sum(w · R x) = Rᵀ w: w turned back by each angle
    assert (qkv.grad[..., d: 2 * d].double() - grad_want).abs().max() / grad_want.abs().max() < tol
    assert not qkv.grad[..., :d].any() and not qkv.grad[..., 2 * d:].any()
    assert torch.equal(qkv.detach(), before)  # qkv itself never rotated
    leaf = before[..., d: 2 * d].contiguous().requires_grad_(True)  # a caller's own tensor: left as it was
    kept = leaf.detach().clone()
    LigerRoPE.apply(leaf, *cos_sin(freqs, 1.0)).sum().backward()
    assert torch.equal(leaf.detach(), kept) and leaf.grad is not None
