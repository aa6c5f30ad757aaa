"""Proof that ``--ring-attention`` took effect in a Megatron-LM run, or one loud error on every rank.

``megatron_patch.apply()`` calls these once Megatron-LM has built its model chunks and again after
its first training step. They look at what was built and what ran, not at what was asked for:

- with ``--ring-attention``: every attention layer's core attention is ``RingCoreAttention``; Megatron's
  ``RotaryEmbedding`` was replaced by ``LayoutRotaryEmbedding`` and its forward ran; with
  context parallelism, this process's data split went through ``megatron_patch`` (see ``mark_data_split``);
  when ring attention ran over THD packed sequences with context parallelism, their split was the ring's
  and RoPE rotated them by in-document position (``megatron_patch.packed``), not Megatron's per-document slicing;
- without it: no ``RingCoreAttention`` anywhere (a ring module without the flag is as wrong).

Every rank checks its own chunks, then all ranks agree (one all-reduce over the world) and all
raise ``RingAttentionNotApplied`` together, so no rank hangs in a collective the others skipped.
"""

from __future__ import annotations

import os
import re

import torch
import torch.distributed as dist
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.attention import Attention

from megatron_patch import packed
from megatron_patch.core_attention import RingCoreAttention
from megatron_patch.rope import LayoutRotaryEmbedding

TESTED = "core_v0.16.1, core_v0.17.1, core_v0.18.2, core_v0.19.0 and main of 2026-08-22"
_seen = {"data_split": False, "first_step": False}


class RingAttentionNotApplied(RuntimeError):
    """``--ring-attention`` did not take effect (or ring attention is in a model without the flag)."""


def mark_data_split() -> None:
    """Called by ``megatron_patch``'s ``get_batch_on_this_cp_rank``: the script's data split is ours."""
    _seen["data_split"] = True


def first_step_checked() -> bool:
    return _seen["first_step"]


def reset() -> None:
    _seen.update(data_split=False, first_step=False)
    packed.reset()


def megatron_version() -> str:
    """``megatron-core X.Y.Z at PATH`` of the ``megatron`` package this process imported."""
    import megatron.core

    try:
        from megatron.core.package_info import __version__ as version
    except ImportError:
        version = "unknown version"
    return f"megatron-core {version} at {os.path.dirname(os.path.dirname(os.path.abspath(megatron.core.__file__)))}"


def _chunks(model) -> list[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _named(model):
    for i, chunk in enumerate(_chunks(model)):
        for name, module in chunk.named_modules():
            name = re.sub(r"^(module\.)+", "", name)  # DDP / Float16Module wrappers
            yield (f"chunk {i}: {name}" if len(_chunks(model)) > 1 else name), module


def attention_layers(model) -> list[tuple[str, str]]:
    """(name, class of its core attention) for every Megatron-core attention module in the model chunks."""
    return [(f"{name}.core_attention", type(module.core_attention).__name__)
            for name, module in _named(model) if isinstance(module, Attention)]


def model_problems(model, ring: bool) -> list[str]:
    """What is wrong with the built model chunks of this rank (empty: nothing)."""
    problems = []
    for name, kind in attention_layers(model):
        if ring and kind != RingCoreAttention.__name__:
            problems.append(f"{name} is {kind}, not RingCoreAttention")
        elif not ring and kind == RingCoreAttention.__name__:
            problems.append(f"{name} is RingCoreAttention but --ring-attention is not set")
    if ring:
        problems += [f"{name} is Megatron's RotaryEmbedding, not LayoutRotaryEmbedding (RoPE positions would "
                     "not follow --ring-layout)" for name, module in _named(model) if type(module) is RotaryEmbedding]
    return problems


def step_problems(model, context_parallel_size: int) -> list[str]:
    """What the first training step shows (call after it, with ``--ring-attention``)."""
    problems = [f"{name}: Megatron computed the RoPE table without calling LayoutRotaryEmbedding.forward"
                for name, module in _named(model)
                if isinstance(module, LayoutRotaryEmbedding) and not getattr(module, "ring_forward_ran", False)]
    holds_data = any(getattr(module, "pre_process", False) for _, module in _named(model))
    if context_parallel_size > 1 and holds_data and not _seen["data_split"]:
        problems.append("the batch was not split by megatron_patch's get_batch_on_this_cp_rank (the script took its "
                        "context-parallel split from somewhere else, so the data would not follow --ring-layout)")
    if packed.SEEN["attention"]:  # ring attention over THD packed sequences, context parallelism > 1
        if not packed.SEEN["rope"] and any(isinstance(m, RotaryEmbedding) for _, m in _named(model)):
            problems.append("THD packed sequences were rotated by Megatron's own apply_rotary_pos_emb (per-document "
                            "zigzag slicing), not megatron_patch's: RoPE would not follow the ring's split")
        if holds_data and not packed.SEEN["split"]:
            problems.append("the THD packed batch was not split by megatron_patch (Megatron's own THD split cuts "
                            "every document for Transformer Engine), so the data would not follow --ring-layout")
    return problems


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(problems: list[str], ring_layers: int, ring: bool, when: str) -> None:
    """Raise ``RingAttentionNotApplied`` on every rank if any rank found a problem (or, with the flag,
    no rank holds a ring layer). ``when``: e.g. "after the model was built"."""
    counts = torch.tensor([[len(problems)], [ring_layers]], dtype=torch.long)
    rank, world = 0, 1
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        counts = torch.zeros(2, world, dtype=torch.long, device=_device())
        counts[0, rank], counts[1, rank] = len(problems), ring_layers
        dist.all_reduce(counts)
        counts = counts.cpu()
    bad_ranks = [r for r in range(world) if counts[0, r] > 0]
    if ring and not problems and int(counts[1].sum()) == 0:
        problems = ["no rank holds a Megatron-core attention layer (a legacy or non-GPT model?)"]
        bad_ranks = [rank]
    if not bad_ranks and not problems:
        return
    if not problems:
        problems = [f"rank(s) {', '.join(map(str, bad_ranks))} found problems: see their error"]
    shown = problems[:4] + ([f"... and {len(problems) - 4} more"] if len(problems) > 4 else [])
    flag = "--ring-attention did not take effect" if ring else "ring attention is in the model without --ring-attention"
    raise RingAttentionNotApplied(
        f"megatron_patch: {flag} in this Megatron-LM ({megatron_version()}), {when}, on rank {rank}:\n  - "
        + "\n  - ".join(shown)
        + "\nTraining would silently run a different model, so every rank stops here. Run `python -m megatron_patch "
        "check PATH_TO_MEGATRON_LM` to see which replacements took effect, and use a Megatron-LM version that it "
        f"passes (tested: {TESTED}) or report this one."
    )


def describe(model) -> str:
    """One line: the core attention classes of the model chunks' attention layers, and the RoPE class."""
    kinds: dict[str, int] = {}
    for _, kind in attention_layers(model):
        kinds[kind] = kinds.get(kind, 0) + 1
    ropes = sorted({type(m).__name__ for _, m in _named(model) if isinstance(m, RotaryEmbedding)})
    layers = ", ".join(f"{n} x {kind}" for kind, n in kinds.items()) or "no attention layers"
    return f"core attention: {layers}; RoPE: {', '.join(ropes) or 'none'}"


def check_model(model, ring: bool) -> str:
    """The built model chunks (this rank's) agree with the flag, on every rank; else every rank raises.
    Returns ``describe(model)``."""
    ring_layers = sum(kind == RingCoreAttention.__name__ for _, kind in attention_layers(model))
    agree(model_problems(model, ring), ring_layers, ring, "after the model was built")
    return describe(model)


def check_first_step(model, context_parallel_size: int) -> str:
    """After the first training step of a ``--ring-attention`` run: the model, RoPE and data split are ours
    (else every rank raises). Returns one line saying what ran."""
    _seen["first_step"] = True
    ring_layers = sum(kind == RingCoreAttention.__name__ for _, kind in attention_layers(model))
    problems = model_problems(model, True) + step_problems(model, context_parallel_size)
    agree(problems, ring_layers, True, "after the first training step")
    rope = any(isinstance(m, LayoutRotaryEmbedding) for _, m in _named(model))
    split = "megatron_patch's" if _seen["data_split"] else "not called on this rank"
    plans, kernels = _noted(model, "document_plan"), _noted(model, "kernel")
    documents = f"; packed documents: {plans} (ring_sp.document_plan)" if plans else ""
    kernel = f"; attention kernel: {kernels}" if kernels else ""
    return f"RoPE table: {'from LayoutRotaryEmbedding' if rope else 'none'}; data split: {split}{kernel}{documents}"


def _noted(model, attribute: str) -> str:
    """The distinct values the ring layers noted in ``attribute`` on their first call, sorted, comma-separated."""
    return ", ".join(sorted({getattr(m, attribute) for _, m in _named(model) if getattr(m, attribute, None)}))
