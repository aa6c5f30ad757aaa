"""--fused-kernels: which kernels a run gets, the errors, and liger-kernel's modules against Megatron's own
(numerically on CPU where Triton's interpreter runs them: SwiGLU and the fused linear cross-entropy; liger's
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

    from megatron_patch.liger import LigerSwiGLUMLP, with_liger_kernels

    config = fused_jobs._config("RMSNorm")
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    liger, swapped = with_liger_kernels(spec, config)
    assert swapped == ["rms_norm", "swiglu"]
    assert liger.submodules.input_layernorm is LigerMegatronRMSNorm is liger.submodules.pre_mlp_layernorm
    assert liger.submodules.mlp.module is LigerSwiGLUMLP and spec.submodules.mlp.module is MLP  # a copy
    config.add_bias_linear = True  # liger's SwiGLU adds no bias; LayerNorm is not liger's RMSNorm
    config.normalization = "LayerNorm"
    assert with_liger_kernels(get_gpt_layer_local_spec(), config)[1] == []


def test_liger_swiglu_and_fused_cross_entropy_match_megatrons_modules(dist_pool):
    pytest.importorskip("liger_kernel")
    if torch.cuda.is_available():
        pytest.skip("tests/test_gpu.py compares them on the GPU")
    (result,) = dist_pool(1).run(fused_jobs.liger_matches_plain, timeout=600)
    assert result["modules"] == ["LigerLossGPTModel", "LigerSwiGLUMLP"]  # what ran is liger's
    assert result["loss_shape"] == (2, fused_jobs.SEQ) and result["loss_dtype"] == "torch.float32"
    assert result["loss"] < 1e-5  # float32 (seen: 1e-6)
    assert max(result["grads"].values()) < 1e-5, result["grads"]  # seen: 7e-7
    assert len(result["grads"]) == 20  # every parameter, the output layer's through the fused loss
