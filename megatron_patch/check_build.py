"""One build for ``python -m megatron_patch check``: a Megatron-LM checkout's own ``pretrain_gpt.py``,
run after ``megatron_patch.apply()`` up to its call of ``pretrain(...)``, then its model built on CPU.

Run as ``python -m megatron_patch.check_build REPORT.json SCRIPT [MEGATRON ARGS...]`` in a fresh process
whose ``sys.path`` starts with the checkout. Megatron-LM's ``pretrain()`` needs CUDA, so it is
replaced by a stand-in that receives exactly what the script passes and then does, on CPU with
gloo, what ``pretrain`` does up to the model: parse and validate the arguments (before core 0.18
``pretrain`` does this), set Megatron's globals, make the process groups, and build the model the way
``setup_model_and_optimizer`` does: through the script's model provider (``gpt_builder``) or, from
core 0.19, through ``cfg_container.model``'s builder (``GPTModelBuilder.build_model``). The model is
not moved to a GPU, wrapped in DDP or given an optimizer.

The report (JSON) says what was replaced, which core attention each layer got, the RoPE class, whether
the script's ``get_batch_on_this_cp_rank`` is ours, the guard's verdict, and, with ``--ring-attention``,
whether one forward and backward pass ran ring attention in every layer.

Megatron-LM names used: ``megatron.training.pretrain`` / ``megatron.training.training.pretrain``
(replaced by the stand-in, signature read from the original), ``megatron.training.arguments.parse_args`` /
``validate_args``, ``megatron.training.global_vars.set_global_variables`` / ``get_args``,
``megatron.core.parallel_state.initialize_model_parallel``,
``megatron.core.process_groups_config.ProcessGroupCollection.use_mpu_process_groups``,
``PretrainConfigContainer.model.get_builder_cls()`` (0.19+).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import platform
import runpy
import sys
import traceback


class _Stop(Exception):
    """Raised by the ``pretrain`` stand-in once the model is built and checked."""


def _global_args():
    from megatron.training import global_vars

    return getattr(global_vars, "_GLOBAL_ARGS", None)


def _parse_like_pretrain(bound) -> None:
    """Before core 0.18 ``pretrain`` parses the arguments itself (``initialize_megatron``): do that part."""
    from megatron.training import arguments, global_vars

    args = arguments.parse_args(bound.get("extra_args_provider"))
    arguments.validate_args(args, bound.get("args_defaults") or {})
    global_vars.set_global_variables(args)  # also the tokenizer, which sets the padded vocab size


def _process_groups():
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    torch.manual_seed(_global_args().seed)
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


def _build(bound, report: dict):
    """The model as ``setup_model_and_optimizer`` builds it (one pipeline stage, no GPU, no DDP)."""
    pg_collection = _process_groups()
    container = bound.get("cfg_container")
    provider = bound.get("model_provider")
    if provider is None and getattr(container, "model", None) is not None:
        builder = container.model.get_builder_cls()(container.model)
        report["build_path"] = f"{type(builder).__name__}.build_model (config container)"
        return builder.build_model(pg_collection=pg_collection, pre_process=True, post_process=True)
    if isinstance(provider, functools.partial):  # pretrain_gpt.py's partial(model_provider, gpt_builder)
        names = [getattr(f, "__name__", "?") for f in (provider.func, *provider.args)]
        report["build_path"] = f"{names[0]}({', '.join(names[1:])})"
    else:
        report["build_path"] = getattr(provider, "__name__", type(provider).__name__)
    return provider(pre_process=True, post_process=True)


def _whose(function) -> str:
    return "megatron_patch's" if getattr(function, "_megatron_patch", False) else f"Megatron's ({function.__module__})"


def _script_split(script_globals: dict, report: dict):
    split = script_globals.get("get_batch_on_this_cp_rank")
    report["script_split"] = "not imported by the script" if split is None else _whose(split)
    thd = script_globals.get("get_thd_batch_on_this_cp_rank")  # Megatron-LM 0.16-0.17's split of THD batches
    if thd is not None:
        report["script_thd_split"] = _whose(thd)
    return split


def _needs_cuda(error: BaseException) -> bool:
    """Whether ``error`` is a module asking for CUDA (e.g. Megatron's MoE router), not a failure of ours."""
    frames = traceback.extract_tb(error.__traceback__)
    return "CUDA" in str(error) or any(f"torch{os.sep}cuda{os.sep}" in frame.filename for frame in frames)


def _forward_backward(model, split, report: dict) -> None:
    """One step's forward and backward on CPU, the batch split by the script's own split function."""
    import torch
    from megatron.core import parallel_state

    from megatron_patch.core_attention import RingCoreAttention

    args = _global_args()
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules()
             if isinstance(m, RingCoreAttention)]
    g = torch.Generator().manual_seed(0)
    seq = args.seq_length
    tokens, labels = torch.randint(0, 100, (2, 1, seq), generator=g)
    batch = {"tokens": tokens, "labels": labels,
             "loss_mask": torch.ones(1, seq), "position_ids": torch.arange(seq)[None], "attention_mask": None}
    if split is not None:
        params = inspect.signature(split).parameters
        kwargs = {"is_hybrid_cp": False} if "is_hybrid_cp" in params else {}
        if "cp_group" in params:
            kwargs["cp_group"] = parallel_state.get_context_parallel_group()
        batch = split(batch, **kwargs)
    layers = sum(isinstance(m, RingCoreAttention) for m in model.modules())
    try:
        losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        losses.float().mean().backward()
    except (AssertionError, RuntimeError) as error:
        if not _needs_cuda(error):
            raise
        report["forward"] = f"not run: a module of this model needs CUDA ({error})"
        report["forward_ok"] = None
        return
    finally:
        for hook in hooks:
            hook.remove()
    loss = losses.float().mean().item()
    report["forward"] = f"ring attention ran in {len(calls)} of {layers} layers (loss {loss:.4f})"
    report["forward_ok"] = layers > 0 and len(calls) == layers


def _stand_in(original_pretrain, script: str, report: dict):
    signature = inspect.signature(original_pretrain)

    def pretrain(*args, **kwargs):
        from megatron_patch import defaults, guard

        bound = signature.bind(*args, **kwargs).arguments
        if _global_args() is None:
            _parse_like_pretrain(bound)
        ring = defaults.megatron_lm_options() is not None
        model = _build(bound, report)
        report["layers"] = guard.attention_layers(model)
        report["rope"] = [type(m).__name__ for m in model.modules() if "RotaryEmbedding" in type(m).__name__]
        split = _script_split(bound["forward_step_func"].__globals__, report)
        report["problems"] = guard.model_problems(model, ring)
        if ring and not report["problems"]:
            _forward_backward(model, split, report)
            if report["forward_ok"] is not None:
                report["problems"] += guard.step_problems(model, 1)
        raise _Stop

    return pretrain


def run(report_path: str, script: str, argv: list[str]) -> int:
    import torch

    report: dict = {"python": platform.python_version(), "torch": torch.__version__, "argv": argv}
    try:
        from megatron_patch import guard, megatron_lm

        report["replaced"] = megatron_lm.apply()
        report["missing"] = megatron_lm.missing()
        report["megatron"] = guard.megatron_version()
        import megatron.training as training_package
        from megatron.training import training

        stand_in = _stand_in(training.pretrain, script, report)
        training_package.pretrain = training.pretrain = stand_in
        sys.argv = [script, *argv]
        runpy.run_path(script, run_name="__main__")
        report["error"] = "the script returned without calling pretrain()"
    except _Stop:
        report["error"] = None
    except BaseException as error:  # report everything, the parent decides
        report["error"] = f"{type(error).__name__}: {error}"
        report["traceback"] = traceback.format_exc()[-4000:]
    with open(report_path, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2], sys.argv[3:]))
