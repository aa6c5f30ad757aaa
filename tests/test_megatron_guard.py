"""The guard of megatron_patch.apply(): once the model is built and after the first training step, a
--ring-attention run whose model, RoPE or data split is not the ring's, or a ring module without the
flag, stops every rank with one error naming the Megatron version and what to do; the run that did
take effect passes. Also: apply() refuses --ring-attention when a name it must replace is missing,
and mixture-of-experts block specs (local and Transformer Engine, with stand-ins) get ring attention."""

import argparse

import pytest
from megatron.core.models.gpt import gpt_model

from megatron_patch import add_ring_attention_args, guard, megatron_lm
from tests import megatron_guard_jobs


@pytest.mark.parametrize("kind, words", [
    ("built_before_the_flag", ["did not take effect", "decoder.layers.0.self_attention.core_attention is "
                               "DenseCoreAttention, not RingCoreAttention", "after the model was built"]),
    ("one_rank_differs", ["did not take effect"]),
    ("ring_without_flag", ["ring attention is in the model without --ring-attention",
                           "is RingCoreAttention but --ring-attention is not set"]),
    ("split_elsewhere", ["after the first training step", "not split by megatron_patch"]),
    ("rope_elsewhere", ["after the first training step", "without calling LayoutRotaryEmbedding.forward"]),
    ("thd_rope_elsewhere", ["after the first training step", "THD packed sequences were rotated by Megatron's own"]),
    ("thd_split_elsewhere", ["after the first training step", "THD packed batch was not split by megatron_patch"]),
])
def test_guard_stops_every_rank(dist_pool, kind, words):
    errors = dist_pool(2).run(megatron_guard_jobs.guard_verdict, kind, timeout=600)
    for rank, text in enumerate(errors):
        assert text != "no error", f"rank {rank}: {kind} passed the guard"
        for word in ["megatron-core 0.", "python -m megatron_patch check"]:
            assert word in text, f"rank {rank}: {text}"
        if kind != "one_rank_differs":
            for word in words:
                assert word in text, f"rank {rank}: {text}"
    if kind == "one_rank_differs":
        assert "rank(s) 1 found problems" in errors[0], errors[0]
        assert "decoder.layers.1.self_attention.core_attention is DenseCoreAttention" in errors[1], errors[1]


@pytest.mark.parametrize("kind", ["ring", "plain", "thd_ring"])
def test_guard_passes_what_took_effect(dist_pool, kind):
    """--ring-attention through the replaced names (0.19-style spec override included; THD packed batches), and a
    plain run."""
    assert dist_pool(2).run(megatron_guard_jobs.guard_verdict, kind, timeout=600) == ["no error"] * 2


def test_guard_says_how_packed_documents_ran(dist_pool):
    """After the first step of a THD run the guard's line names the ring's document plan (ring_sp.document_plan:
    whole blocks for the CPU kernel here); without documents it says nothing of them."""
    thd, plain = (dist_pool(2).run(megatron_guard_jobs.guard_report, kind, timeout=600)[0] for kind in ("thd_ring",
                                                                                                      "ring"))
    assert thd.startswith("no error") and "guard passed after the first step" in thd, thd
    assert "packed documents: whole (ring_sp.document_plan)" in thd, thd
    assert "attention kernel: sdpa (cpu)" in thd and "attention kernel: sdpa (cpu)" in plain, plain
    assert "guard passed after the first step" in plain and "packed documents" not in plain, plain


@pytest.mark.parametrize("use_te", [False, True])
def test_moe_block_spec_gets_ring_attention(dist_pool, use_te):
    layers = dist_pool(2).run(megatron_guard_jobs.moe_layers_are_ring, use_te, timeout=600)[0]
    assert len(layers) == 2 and {kind for _, kind in layers} == {"RingCoreAttention"}, layers


def test_ring_attention_refused_when_a_name_to_replace_is_missing(monkeypatch):
    """As if a Megatron version had renamed gpt_model.RotaryEmbedding: --ring-attention must refuse."""
    monkeypatch.delattr(gpt_model, "RotaryEmbedding")
    args = add_ring_attention_args(argparse.ArgumentParser()).parse_args(["--ring-attention"])
    try:
        megatron_lm.apply()
        assert "megatron.core.models.gpt.gpt_model.RotaryEmbedding" in megatron_lm.missing()
        with pytest.raises(guard.RingAttentionNotApplied, match="gpt_model.RotaryEmbedding: .* has no RotaryEmbedding"):
            megatron_lm.configure(args)
        megatron_lm.configure(add_ring_attention_args(argparse.ArgumentParser()).parse_args([]))  # no flag: fine
    finally:
        megatron_lm.restore()


def test_apply_without_megatron_lm_replaces_the_core_names():
    """megatron-core alone: the megatron.training names are absent (skipped), nothing is missing."""
    pytest.importorskip("megatron.core")
    try:
        import megatron.training  # noqa: F401
        pytest.skip("Megatron-LM's training package is importable here")
    except ImportError:
        pass
    try:
        assert megatron_lm.apply() == ["megatron.core.transformer.attention.Attention.__init__",
                                       "megatron.core.models.gpt.gpt_model.RotaryEmbedding",
                                       "megatron.core.utils.get_batch_on_this_cp_rank",
                                       "megatron.core.utils.get_thd_batch_on_this_cp_rank",
                                       "megatron.core.transformer.attention.apply_rotary_pos_emb"]
        assert megatron_lm.missing() == {}
    finally:
        megatron_lm.restore()
