"""Jobs for the gloo pool: ``megatron_patch``'s guard on tensor-parallel 1 x ring 2 GPT models built from
Megatron-core's own layer specs after ``megatron_lm.apply()``, as Megatron-LM's ``pretrain_gpt.py``
builds them; Megatron-LM's ``setup_model_and_optimizer`` and ``train_step`` (whose wrappers run the
guard) are stand-ins with their signatures, since megatron-core alone has no ``megatron.training``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib

import megatron.core.utils as megatron_utils
import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import gpt_layer_specs, gpt_model

from megatron_patch import RingOptions, add_ring_attention_args, guard, megatron_lm, ring_gpt_model
from ring_sp import local_positions
from tests import thd_batches
from tests.megatron_jobs import (
    VOCAB,
    DenseCoreAttention,
    error_text,
    layer_spec,
    make_batches,
    make_config,
    megatron_parallel,
)
from tests.te_stand_ins import te_stand_ins

SEQ = 16


def _configure(ring: bool) -> None:
    args = add_ring_attention_args(argparse.ArgumentParser()).parse_args(["--ring-attention"] if ring else [])
    args.context_parallel_size = 2
    megatron_lm.configure(args)


def _model(spec=None):
    spec = spec if spec is not None else layer_spec("override")
    return gpt_model.GPTModel(make_config(1, 2), spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                              position_embedding_type="rope")


def _dense_spec():
    """The local spec with a non-ring core attention that runs with context parallelism on CPU
    (Megatron's DotProductAttention refuses context parallelism)."""
    spec = layer_spec("local")
    spec.submodules.self_attention.submodules.core_attention = DenseCoreAttention
    return spec


def _setup_model_and_optimizer(model_type, model_provider_func=None, *args, **kwargs):
    """Stand-in for Megatron-LM's: the model chunks (a list), an optimizer, a scheduler."""
    return [model_provider_func()], None, None


def _train_step(forward_step_func, data_iterator, model, optimizer, opt_param_scheduler, config,
                forward_backward_func, iteration=None):
    """Stand-in for Megatron-LM's: forward and backward of every micro-batch of one step."""
    for chunk in model:
        forward_step_func(data_iterator, chunk).sum().backward()
    return 0.0


def _forward_step(split):
    """pretrain_gpt.py's forward step: the batch split by ``split``, then the model."""
    def forward_step(data_iterator, model):
        batch = split(dict(next(data_iterator)))
        return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    return forward_step


def _thd_forward_step(split):
    """Megatron-LM's forward step for a THD batch: split, then the model with its PackedSeqParams."""
    def forward_step(data_iterator, model):
        batch = split(dict(next(data_iterator)))
        return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                     packed_seq_params=thd_batches.packed_params(batch))

    return forward_step


def _thd_batches():
    """Two THD streams of 2 × 16 tokens whose documents (4, 8, 4 tokens) Megatron's own RoPE slicing accepts."""
    case = {"seq": SEQ, "thd": 0, "lengths": [4, 8, 4]}
    return iter([thd_batches.stream(case, part, slice(0, 2)) for part in make_batches(2, 1, 2, SEQ, seed=3)])


def _hand_split(batch):
    """A THD split outside megatron_patch (the stream cut with zigzag by hand)."""
    group = parallel_state.get_context_parallel_group()
    index = local_positions(batch["tokens"].shape[1], "zigzag", group.rank(), group.size())
    return {key: val.index_select(1, index) if key in ("tokens", "labels", "loss_mask", "position_ids") else val
            for key, val in batch.items()}


def _megatron_split(batch):
    return megatron_utils.get_batch_on_this_cp_rank(batch, cp_group=parallel_state.get_context_parallel_group())


def _provoke(kind: str, rank: int) -> None:
    batches = iter(make_batches(2, 1, 1, SEQ, seed=3))
    if kind == "built_before_the_flag":  # a model that escaped the hook, checked as --ring-attention's
        model = _model(_dense_spec())
        _configure(True)
        guard.check_model([model], ring=True)
    elif kind == "one_rank_differs":  # rank 1's second layer lost its ring attention
        _configure(True)
        model = _model()
        if rank == 1:
            model.decoder.layers[1].self_attention.core_attention = DenseCoreAttention(make_config(1, 2), 2, None)
        guard.check_model([model], ring=True)
    elif kind == "ring_without_flag":
        _configure(False)
        model = ring_gpt_model(make_config(1, 2), vocab_size=VOCAB, max_sequence_length=SEQ, options=RingOptions())
        megatron_lm._wrap_setup_model_and_optimizer(_setup_model_and_optimizer)(None, lambda: model)
    elif kind == "plain":  # no flag, no ring module: nothing to say
        _configure(False)
        megatron_lm._wrap_setup_model_and_optimizer(_setup_model_and_optimizer)(None, lambda: _model(_dense_spec()))
    elif kind in ("ring", "split_elsewhere", "rope_elsewhere"):
        _configure(True)
        model, _, _ = megatron_lm._wrap_setup_model_and_optimizer(_setup_model_and_optimizer)(None, _model)
        split = _megatron_split
        if kind == "split_elsewhere":  # the script calls Megatron's own split, not the replaced name
            original = megatron_lm._ORIGINALS[("megatron.core.utils", "get_batch_on_this_cp_rank")]
            split = lambda b: original(b, cp_group=parallel_state.get_context_parallel_group())  # noqa: E731
        if kind == "rope_elsewhere":  # GPTModel gets the RoPE table without calling the module's forward
            rope = model[0].rotary_pos_emb
            table = type(rope).forward.__wrapped__(rope, SEQ)
            rope.ring_forward_ran = False
            rope.forward = lambda *args, **kwargs: table
        megatron_lm._wrap_train_step(_train_step)(_forward_step(split), batches, model, None, None, None, None)
    elif kind.startswith("thd_"):
        _configure(True)
        model, _, _ = megatron_lm._wrap_setup_model_and_optimizer(_setup_model_and_optimizer)(None, _model)
        split = _hand_split if kind == "thd_split_elsewhere" else _megatron_split
        attention = importlib.import_module("megatron.core.transformer.attention")
        ours = attention.apply_rotary_pos_emb
        if kind == "thd_rope_elsewhere":  # as if Attention called Megatron's function under another name
            megatrons = ours.__wrapped__
            attention.apply_rotary_pos_emb = functools.wraps(megatrons)(lambda *a, **k: megatrons(*a, **k))
            attention.apply_rotary_pos_emb._megatron_patch = True
        try:
            step = _thd_forward_step(split)
            megatron_lm._wrap_train_step(_train_step)(step, _thd_batches(), model, None, None, None, None)
        finally:
            attention.apply_rotary_pos_emb = ours
    else:
        raise AssertionError(kind)


def guard_verdict(kind: str) -> str:
    """Run one guard case on ring 2 after ``apply()``; the error text, or "no error"."""
    rank = torch.distributed.get_rank()

    def provoke(cp_group) -> None:
        megatron_lm.apply()
        _provoke(kind, rank)

    return error_text(provoke, guard.RingAttentionNotApplied)


def guard_report(kind: str) -> str:
    """What the guard prints on this rank for a case that passes (``guard_verdict``'s run, its output kept)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        verdict = guard_verdict(kind)
    return f"{verdict}\n{out.getvalue()}"


def moe_layers_are_ring(use_te: bool) -> list[tuple[str, str]]:
    """A mixture-of-experts GPT block spec (Megatron-core's local or TE-with-stand-ins) under --ring-attention:
    the core attention of every layer; the guard must accept the model (MoE's router needs CUDA to run)."""
    try:
        with megatron_parallel(1, 2):
            megatron_lm.apply()
            _configure(True)
            config = dataclasses.replace(make_config(1, 2), num_moe_experts=2, moe_router_topk=1,
                                         moe_router_pre_softmax=True, moe_token_dispatcher_type="allgather")
            with te_stand_ins():
                spec = gpt_layer_specs.get_gpt_decoder_block_spec(config, use_transformer_engine=use_te)
            model = gpt_model.GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                                       position_embedding_type="rope")
            assert any("MoELayer" == type(m).__name__ for m in model.modules())
            guard.check_model([model], ring=True)
            return guard.attention_layers([model])
    finally:
        megatron_lm.restore()
