"""DeepSpeed's pipeline engine on the ring topology: pipeline stages whose ranks also form rings.

DeepSpeed's ``PipelineModule`` and ``PipelineEngine`` know the axes pipe, data and model (tensor);
a ``ring`` axis between data and model (``ring_sp.topology``) needs four changes, made here:

- **mpu**: the engine asks the module for its mpu; :class:`RingPipelineModule` answers with the
  :class:`~ring_sp.topology.RingMPU` (Megatron-core's groups), so ZeRO-1 partitions and reduces
  over data × ring and the gradient norm is summed over tensor × pipeline, not over ring copies.
- **tied weights** (``TiedLayerSpec``, e.g. the word embedding on the first and the last stage):
  DeepSpeed builds one group per (data, model) coordinate and would mix the ranks of different
  rings; here there is one per (data, ring, model) coordinate.
- **checkpoints**: the ranks of a ring hold the same layers, so ring position 0 writes each layer
  file (named without the ring) and every ring rank reads it; DeepSpeed would write one file per
  ring rank and then, finding several, try to merge them as tensor-parallel shards.
- **ZeRO-0 reduction and clipping** (:class:`RingPipelineEngine`): without ZeRO the pipeline
  engine all-reduces gradients over data only and clips with a norm summed over one model-parallel
  rank's non-tensor-parallel parameters; here gradients are summed over the ring and averaged over
  data (as ZeRO does), and the norm counts every stage's parameters once (tied copies once).
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.module import PipelineModule, TiedLayerSpec
from deepspeed.runtime.utils import is_model_parallel_parameter

from ring_sp.topology import AXES, RingMPU, RingTopology


class RingPipelineModule(PipelineModule):
    """A ``PipelineModule`` over a :class:`RingTopology`; ``deepspeed.initialize(model=this)`` (no mpu).

    ``layers``: LayerSpec / TiedLayerSpec list as for ``PipelineModule``; the other keywords go to it.
    """

    def __init__(self, layers, *, topology: RingTopology, mpu: RingMPU, **kwargs):
        self.ring_topology, self.ring_mpu = topology, mpu  # plain attributes, read by the overrides below
        super().__init__(layers, topology=topology.process_topology(), **kwargs)
        # The engine asks the grid for some groups and the mpu for others (e.g. one side of a broadcast of the
        # loss on each): the same ranks must mean the same group object, or the collectives never meet.
        self._grid.pp_proc_group = mpu.get_pipeline_model_parallel_group()
        self._grid.dp_proc_group = mpu.get_data_parallel_group()
        if topology.tensor > 1:
            self._grid.slice_proc_group = mpu.get_tensor_model_parallel_group()

    def mpu(self) -> RingMPU:
        return self.ring_mpu

    def _index_tied_modules(self) -> dict:
        """One group per tied key and per coordinate outside the pipe axis, made on every rank alike."""
        tied = {}
        if self.ring_topology.pipeline == 1:
            return tied
        me = self.ring_topology.get_coord(self.global_rank)
        keys = sorted({s.key for s in self._layer_specs if isinstance(s, TiedLayerSpec)})
        for key in keys:
            stages = sorted({self.stage_owner(i) for i, s in enumerate(self._layer_specs)
                             if isinstance(s, TiedLayerSpec) and s.key == key})
            for ranks in self.ring_topology.groups("pipe"):
                ranks = [ranks[s] for s in stages]
                group = dist.new_group(ranks=ranks)
                if self.global_rank in ranks:
                    tied[key] = {"ranks": ranks, "group": group, "weight_attr": self.tied_weight_attrs[key],
                                 "module": self.tied_modules[key]}
                    if me.pipe != stages[0]:  # counted once by the optimizer's norm
                        for p in self.tied_modules[key].parameters():
                            p.ds_pipe_replicated = True
        return tied

    def _synchronize_tied_weights(self):
        with torch.no_grad():  # an in-place copy, not a step of the graph the tied weight's gradient flows through
            super()._synchronize_tied_weights()

    def ckpt_layer_path(self, ckpt_dir: str, local_layer_idx: int) -> str:
        """``layer_NN-model_TT-model_states.pt``: one file per layer and tensor rank, shared by the ring."""
        repr_ = self._topo.get_rank_repr(rank=self.global_rank, omit_axes=["data", "pipe", "ring"])
        return os.path.join(ckpt_dir, f"layer_{local_layer_idx + self._local_start:02d}-{repr_}-model_states.pt")

    def save_state_dict(self, save_dir, checkpoint_engine, exclude_frozen_params=False):
        if self.ring_topology.get_coord(self.global_rank).ring == 0:  # the other ring ranks hold the same layers
            super().save_state_dict(save_dir, checkpoint_engine, exclude_frozen_params)

    def load_state_dir(self, load_dir, checkpoint_engine, strict=True):
        for idx, layer in enumerate(self.forward_funcs):
            if hasattr(layer, "load_state_dict"):  # tied heads (functions) get their weights from the first stage
                layer.load_state_dict(checkpoint_engine.load(self.ckpt_layer_path(load_dir, idx),
                                                             map_location="cpu"), strict=strict)
        self._synchronize_tied_weights()


class RingPipelineEngine(PipelineEngine):
    """``PipelineEngine`` with ZeRO-0 gradients reduced over data × ring and clipped by the whole model's norm.

    ``deepspeed.initialize`` builds a ``PipelineEngine``; :func:`adopt` turns it into this class.
    ``grads_finite``: whether this rank's gradients of the last step were finite (checked only where
    no DeepSpeed optimizer wrapper checks them: ZeRO-0 in fp32).
    """

    grads_finite = True

    def _reduce_non_expert_gradients(self, grads, elements_per_buffer):
        group = self.mpu.get_sequence_data_parallel_group()
        ring = self.mpu.get_sequence_parallel_world_size()
        dense = [g for g in grads if not g.is_sparse]
        if len(dense) != len(grads):
            raise ValueError("sparse gradients are not supported with a ring and pipeline parallelism")
        for dtype in sorted({g.dtype for g in dense}, key=str):  # sum over the ring, mean over data
            self.allreduce_no_retain([g for g in dense if g.dtype == dtype], dp_group=group,
                                     numel_per_bucket=elements_per_buffer,
                                     dp_world_size=dist.get_world_size(group) / ring)

    def _take_model_step(self, lr_kwargs):
        if self.optimizer is self.client_optimizer:  # no wrapper checks the gradients
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            self.grads_finite = all(bool(torch.isfinite(g).all()) for g in grads)  # this stage's
        super()._take_model_step(lr_kwargs)

    def clip_fp32_gradients(self):
        """Clip to ``gradient_clipping`` by the norm over every stage and tensor rank, ring copies once."""
        tensor_rank = self.mpu.get_tensor_model_parallel_rank()
        params = [p for p in self.module.parameters() if p.grad is not None]
        counted = [p.grad.detach().float() for p in params if not getattr(p, "ds_pipe_replicated", False)
                   and (tensor_rank == 0 or is_model_parallel_parameter(p))]
        square = torch.stack([g.pow(2).sum() for g in counted]).sum() if counted else torch.zeros(())
        square = square.to(self.device)
        dist.all_reduce(square, group=self.mpu.get_model_parallel_group())  # tensor × pipeline
        norm = math.sqrt(square.item())
        self._global_grad_norm = norm  # reported by get_global_grad_norm(), as ZeRO's optimizers do
        coef = min(1.0, self.gradient_clipping() / (norm + 1e-6))
        for p in params:
            p.grad.mul_(coef)


def adopt(engine: PipelineEngine) -> RingPipelineEngine:
    """Turn the engine ``deepspeed.initialize`` built for a :class:`RingPipelineModule` into a RingPipelineEngine."""
    if not isinstance(engine.module, RingPipelineModule) or type(engine) is not PipelineEngine:
        raise ValueError(f"adopt() takes the PipelineEngine of a RingPipelineModule, got {type(engine).__name__}")
    engine.__class__ = RingPipelineEngine
    return engine


__all__ = ["AXES", "RingPipelineEngine", "RingPipelineModule", "adopt"]
