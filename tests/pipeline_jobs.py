"""The pretraining job at any pipeline size on the gloo worker pool, and its weights by model-wide names."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from tests.deepspeed_jobs import megatron_groups


def model_weights(module: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """This rank's parameters under GPTModel's names (``decoder.layers.{global index}...``), whether
    ``module`` is the GPTModel or a pipeline stage; a name held twice (a tied copy) lists both."""
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
    from megatron.core.transformer.transformer_block import TransformerBlock
    from megatron.core.transformer.transformer_layer import TransformerLayer

    out: dict[str, list[torch.Tensor]] = {}
    for mod in module.modules():
        if isinstance(mod, TransformerLayer):
            prefix, params = f"decoder.layers.{mod.layer_number - 1}.", mod.named_parameters()
        elif isinstance(mod, LanguageModelEmbedding):
            prefix, params = "embedding.", mod.named_parameters()
        elif isinstance(mod, TransformerBlock) and mod.final_layernorm is not None:
            prefix, params = "decoder.final_layernorm.", mod.final_layernorm.named_parameters()
        else:
            continue
        for name, p in params:
            out.setdefault(prefix + name, []).append(p.detach().clone())
    for name, mod in module.named_modules():  # the untied output layer (GPTModel's and the pipeline's Head)
        if name.endswith("output_layer") and getattr(mod, "weight", None) is not None:
            out.setdefault("output_layer.weight", []).append(mod.weight.detach().clone())
    return out


def train(argv: list[str]) -> dict:
    """Check ``argv`` as the job does, build its job (any pipeline size), load ``--load``, train; return
    this rank's coordinates and weights (``model_weights``) after the last iteration."""
    from launch import checkpoint, train
    from launch.args import parse_and_check
    from launch.job import make_job
    from ring_sp import topology

    rank = str(dist.get_rank())  # what a launcher would have set
    os.environ.update(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=str(dist.get_world_size()))
    topology.init_distributed("gloo")
    args, config = parse_and_check(argv)
    sizes = dict(tensor=args.tensor_model_parallel_size, pipeline=args.pipeline_model_parallel_size,
                 ring=args.context_parallel_size)
    with megatron_groups(**sizes) as mpu:
        job = make_job(args, config, torch.device("cpu"), mpu)
        start = checkpoint.load(job.engine, args.load, args.load_tag) if args.load else 0
        train.run(job, start)
        coord = mpu.topology.get_coord(dist.get_rank())
        recomputed = sum(bool(getattr(type(m), "recomputed", False)) for m in job.engine.module.modules())
        return {"coord": tuple(coord), "weights": model_weights(job.engine.module), "recomputed_mlps": recomputed}
