"""A job for the gloo pool: which host reads of tensor values (device syncs on a GPU) one training step of a
ring GPT makes, and where."""

from __future__ import annotations

import traceback

import torch
from megatron.core import parallel_state
from torch import Tensor
from torch.overrides import TorchFunctionMode

from megatron_patch import RingOptions, ring_gpt_model, shard_batch
from tests.megatron_jobs import VOCAB, make_config, megatron_parallel

# Tensor methods and functions whose result needs the tensor's values on the host
READS = {Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__int__, Tensor.__float__, Tensor.__index__,
         Tensor.cpu, Tensor.numpy, Tensor.nonzero, torch.nonzero, torch.equal, Tensor.any, Tensor.all}


class HostReads(TorchFunctionMode):
    """Records every call in READS (and ``.to("cpu")``) with the innermost frame of ours that made it."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_cpu = func is Tensor.to and any(str(a) == "cpu" for a in (*args[1:], *kwargs.values()))
        if func in READS or to_cpu:
            ours = [f for f in traceback.extract_stack()[:-1] if not f.name.startswith("<") and (
                "/ring_sp/" in f.filename or "/megatron_patch/" in f.filename or "/launch/" in f.filename)]
            where = f"{ours[-1].filename.split('/')[-2]}/{ours[-1].name}" if ours else "megatron"
            self.calls.append(f"{getattr(func, '__name__', func)} in {where}")
        return func(*args, **kwargs)


def host_reads_per_step(cp: int, layers: int, mask: bool, device: str = "cpu", sync_debug: bool = False) -> list[str]:
    """One forward (loss) and backward of a ``layers``-layer ring GPT over a ring of ``cp``, zigzag, after a
    first such step; ``mask``: with Megatron's causal attention_mask (Megatron-LM's default). Returns the host
    reads of the second step, in order. ``sync_debug`` (CUDA): the second step under
    ``torch.cuda.set_sync_debug_mode("error")``, so that any synchronising CUDA call raises."""
    with megatron_parallel(1, cp):
        group = parallel_state.get_context_parallel_group()
        torch.manual_seed(0)
        model = ring_gpt_model(make_config(1, cp, layers=layers, groups=2), vocab_size=VOCAB,
                               max_sequence_length=32, options=RingOptions(), position_embedding_type="rope")
        tokens = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(1))
        full = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "position_ids": torch.arange(32)[None]}
        if mask:
            full["attention_mask"] = torch.ones(1, 1, 32, 32, dtype=torch.bool).triu(1)
        local = {k: v.to(device) for k, v in shard_batch(full, "zigzag", group).items()}
        model.to(device)
        for step in range(2):  # the first step builds what later steps reuse (RoPE table, schedules)
            debug = sync_debug and step == 1
            if debug:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                with HostReads() as reads:
                    # under sync debug mode, the loss from the logits: Megatron's cross-entropy all-reduces
                    # over the tensor-parallel group, which on this gloo pool waits for CUDA tensors
                    # (NCCL would not); the layer loop is what is checked
                    labels = None if sync_debug else local["labels"]
                    out = model(local["tokens"], local["position_ids"], local.get("attention_mask"), labels=labels)
                    (out.float().square().mean() if sync_debug else out.sum()).backward()
            finally:
                if debug:
                    torch.cuda.set_sync_debug_mode("default")
        return reads.calls
