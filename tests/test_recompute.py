"""Activation recompute as a policy (launch/recompute.py) and selective recompute that leaves the ring alone."""

from __future__ import annotations

import pytest
import torch

from launch import recompute
from launch.args import build_parser, check_recompute
from tests import recompute_jobs

LLAMA_1B = ("--num-layers 22 --hidden-size 2048 --ffn-hidden-size 5632 --num-attention-heads 32 --num-query-groups 4 "
            "--swiglu --normalization RMSNorm --disable-bias-linear --bf16").split()


def _args(*flags: str, seq: int = 16384):
    args = build_parser().parse_args([*LLAMA_1B, "--seq-length", str(seq), *flags])
    args.max_position_embeddings = args.seq_length
    check_recompute(args)
    return args


def _shape(args, fused=()) -> recompute.Shape:
    return recompute.Shape.from_args(args, vocab=32000, zero_stage=2, zero_shards=1, fused=fused)


def test_activation_bytes_per_token_of_the_1b_model():
    s = _shape(_args())
    h, gd, f = 2048, 4 * 64, 5632
    lse = 4 * 32  # float32, one per head
    # none: norm inputs and outputs 4h, q and out 2h, k and v 2gd, SwiGLU's fc1 output 2f, silu f, fc2 input f
    assert recompute.layer_bytes(s, "none") == 2 * (4 * h + 2 * h + 2 * gd + 4 * f) + lse + 8
    assert recompute.layer_bytes(s, "selective") == 2 * (4 * h + 2 * h + 2 * gd) + lse + 8  # the MLP keeps its input
    assert recompute.layer_bytes(s, "full") == 2 * h
    fused = _shape(_args(), fused=("swiglu",))
    assert recompute.layer_bytes(fused, "none") == recompute.layer_bytes(s, "none") - 2 * f  # liger keeps no silu
    # parameters: 22 layers (QKV, output, SwiGLU, two norms) + embedding and output layer of 32000 × 2048
    assert s.parameters == 22 * (2048 * 2560 + 2048 * 2048 + 3 * 2048 * 5632 + 2 * 2048) + 2 * 32000 * 2048
    assert s.tokens == 16384 and recompute.Shape.from_args(_args("--context-parallel-size", "4"), 32000, 2, 1).tokens \
        == 4096


def test_the_plan_with_least_recomputation_that_fits():
    s = _shape(_args())
    none, selective, *rest = recompute.plans(s)
    partial = [p for p in rest if p.granularity == "selective"]
    blocks = [p for p in rest if p.granularity == "full" and not p.mlp_layers]
    assert none.flops == 0 and none.activations > selective.activations > blocks[-1].activations
    assert selective.mlp_layers == 22 and [p.mlp_layers for p in partial] == list(range(21, 0, -1))
    assert [b.num_layers for b in blocks] == list(range(1, 23))
    assert [(p.num_layers, p.mlp_layers) for p in rest if p.granularity == "full" and p.mlp_layers] == [
        (k, 22 - k) for k in range(1, 22)]
    rest = [p for p in rest if p.granularity == "full"]
    assert recompute.choose(s, 1e15)[0] == none
    # just below what none needs: the first layer's MLP (backward recomputes it after freeing the other layers'
    # activations), cheaper than recomputing the first layer whole, which is cheaper than every layer's MLP
    plan, without = recompute.choose(s, none.activations - 1)
    assert (plan.granularity, plan.mlp_layers, without) == ("selective", 1, none)
    assert partial[-1].flops < blocks[0].flops < selective.flops
    # room for selective but for no block as cheap: selective, but not in the last layer, whose MLP backward would
    # recompute right away with every other layer's activations still held (the same peak, one MLP more)
    cheap = [b for b in blocks if b.flops < selective.flops]
    assert cheap and min(b.activations for b in cheap) > selective.activations
    assert partial[0].activations == selective.activations
    assert recompute.choose(s, selective.activations)[0] == partial[0]
    assert recompute.choose(s, partial[1].activations)[0] == partial[1]
    # below selective: the cheapest of the fitting plans, whole layers alone or with selective in the others
    plan = recompute.choose(s, selective.activations - 1)[0]
    assert plan == min((p for p in rest if p.activations < selective.activations), key=lambda p: p.flops)
    assert plan.granularity == "full"
    # nothing fits: every layer, the least memory there is
    assert recompute.choose(s, 0)[0] == blocks[-1]


def test_whole_layers_with_selective_in_the_others_at_128k_on_80_gb():
    """The 1B model at 128k with liger's SwiGLU and loss, 53.5 GB left for activations (an H100, seen
    2026-12-07): full recompute alone needs the first 17 layers (40.0% MFU measured); with the MLPs of the
    others recomputing themselves 10 layers whole fit, re-running 3.5 GFLOP less per token."""
    s = _shape(_args(seq=131072), fused=("swiglu", "cross_entropy"))
    h, gd = 2048, 4 * 64
    full, sel, none = 2 * h, 2 * (4 * h + 2 * h + 2 * gd) + 4 * 32 + 8, recompute.layer_bytes(s, "none")
    work = 4 * (2 * h + 2 * gd)
    combined = recompute.activations(s, "full", "block", 10, mlp_layers=12)
    assert combined == 131072 * (10 * full + 11 * sel + none + work)
    # without mlp_rest the formula is the block one it always was: n whole, the others keep everything
    assert recompute.activations(s, "full", "block", 17) == 131072 * (17 * full + 5 * none + work)
    assert recompute.activations(s, "full", "block", 22) == 131072 * (22 * full + none + work)
    plan = recompute.choose(s, 53.5e9)[0]
    assert (plan.granularity, plan.num_layers, plan.mlp_layers) == ("full", 10, 12)
    alone = min((p for p in recompute.plans(s) if p.granularity == "full" and not p.mlp_layers
                 and p.activations <= 53.5e9), key=lambda p: p.flops)
    assert alone.num_layers == 17
    assert (alone.flops - plan.flops) / 131072 > 3.4e9
    assert plan.name(22) == "full (the first 10 of 22 layers), selective (MLP) in the others"
    # 64k, 53.7 GB (the same H100 run chose selective in every layer): 16 MLPs recompute, the last 6 keep theirs
    s64 = _shape(_args(seq=65536), fused=("swiglu", "cross_entropy"))
    plan = recompute.choose(s64, 53.7e9)[0]
    assert (plan.granularity, plan.mlp_layers, plan.name(22)) == (
        "selective", 16, "selective (MLP) in the first 16 of 22 layers")
    none, sel = recompute.layer_bytes(s64, "none"), recompute.layer_bytes(s64, "selective")
    assert recompute.activations(s64, "selective", mlp_layers=16) == 65536 * (16 * sel + 6 * none + work)
    assert recompute.activations(s64, "selective") == 65536 * (22 * sel + none - sel + work)


def test_auto_sets_whole_layers_and_selective_in_the_others():
    """resolve() sets Megatron's block recompute and the job's self-recomputing MLPs in the other layers."""
    args = _args("--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
                 "--num-query-groups", "2", seq=4096)
    args.bf16 = False
    s = _shape(args)
    plan = next(p for p in recompute.plans(s) if p.granularity == "full" and p.mlp_layers and p.num_layers == 1)
    cheaper = [p for p in recompute.plans(s) if p.flops < plan.flops]
    budget = plan.activations + 1
    assert all(p.activations > budget for p in cheaper), "the test's shape must make this plan the cheapest fit"
    args.recompute_memory_budget = (budget + recompute.fixed_bytes(s)) / recompute.MARGIN / recompute.GB
    line = recompute.resolve(args, s, torch.device("cpu"))
    assert line.startswith("recompute: full (the first 1 of 4 layers), selective (MLP) in the others")
    assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers, args.recompute_mlp_layers) \
        == ("full", "block", 1, 3)



def test_auto_sets_megatrons_fields_and_says_why():
    args = _args("--recompute-memory-budget", "40", seq=65536)
    line = recompute.resolve(args, _shape(args), torch.device("cpu"))
    assert (args.recompute_granularity, args.recompute_method) == ("full", "block") or \
        args.recompute_granularity == "selective"
    assert line.startswith(f"recompute: {args.recompute_granularity}") and "(--recompute-memory-budget)" in line
    assert "without recompute" in line and "of model states and logits" in line
    roomy = _args("--recompute-memory-budget", "1000")
    assert recompute.resolve(roomy, _shape(roomy), torch.device("cpu")).startswith("recompute: none (")
    assert roomy.recompute_granularity is None
    cpu = _args()  # auto on CPU without a budget: nothing to plan for
    assert "no memory limit" in recompute.resolve(cpu, _shape(cpu), torch.device("cpu"))
    assert cpu.recompute_granularity is None
    tight = _args("--recompute-memory-budget", "1")
    assert recompute.resolve(tight, _shape(tight), torch.device("cpu")).endswith("it may not fit)")
    assert (tight.recompute_granularity, tight.recompute_num_layers) == ("full", 22)
    forced = _args("--recompute-granularity", "full")
    assert recompute.resolve(forced, _shape(forced), torch.device("cpu")).startswith(
        "recompute: full (uniform, 1 layer) (as the command line says; estimated activations")


@pytest.mark.parametrize("flags,message", [
    (["--recompute-granularity", "selective", "--recompute-memory-budget", "80"],
     "--recompute-memory-budget plans --recompute-granularity auto"),
    (["--recompute-memory-budget", "0"], "--recompute-memory-budget 0.0: use a positive number of GB"),
    (["--recompute-num-layers", "2"], "--recompute-num-layers applies to --recompute-granularity full only"),
])
def test_bad_recompute_flags(flags, message):
    with pytest.raises(ValueError, match=message):
        _args(*flags)


def test_forced_modes_reach_megatron_as_before():
    assert _args("--recompute-granularity", "none").recompute_granularity is None
    assert _args("--recompute-activations").recompute_granularity == "selective"
    assert _args().recompute_granularity == "auto"


def test_selective_recompute_runs_the_ring_once_per_layer(dist_pool):
    """A ring of 2, 3 layers, one forward and backward per setting: the ring's forward runs once per layer under
    selective recompute, whether of core attention (Megatron-LM's --recompute-activations) or of the MLP (the
    job's), and the loss and every gradient equal the run without recompute. Full recompute, and Megatron's own
    SelfAttention around the ring core attention under core_attn recompute, run it twice: the count counts."""
    for rank in dist_pool(2).run(recompute_jobs.ring_forwards_per_step, 2, timeout=600):
        layers = recompute_jobs.LAYERS
        assert {name: r["forwards"] for name, r in rank.items()} == {
            "none": layers, "selective_core_attn": layers, "selective_mlp": layers, "full": 2 * layers,
            "selective_core_attn_stock": 2 * layers}
        plain = rank["none"]
        for name, r in rank.items():
            # the same arithmetic on the same inputs (seen: bitwise equal)
            assert r["loss"] == plain["loss"], name
            for key, grad in plain["grads"].items():
                assert torch.equal(r["grads"][key], grad), (name, key)


def test_whole_layers_and_selective_in_the_others_give_the_same_step(dist_pool):
    """A ring of 2, the job's model of 3 layers: with the first layer recomputed whole and the others' MLPs
    recomputing themselves, the first layer runs the ring twice and its MLP twice (not three times: it does not
    also recompute itself inside the layer's recompute), the others run the ring once and the MLP twice; the loss
    and every gradient equal the step without recompute, and the start line says how many MLPs recompute."""
    for rank in dist_pool(2).run(recompute_jobs.whole_layers_and_selective, 2, timeout=600):
        plain, mixed = rank["none"], rank["whole_1_mlp_rest"]
        assert (plain["forwards"], plain["mlp_forwards"], plain["says"]) == (3, [1, 1, 1], "")
        assert (mixed["forwards"], mixed["mlp_forwards"]) == (4, [2, 2, 2])
        assert mixed["says"] == " | recompute selective (mlp) in 2 of 3 layers"
        partial = rank["selective_first_2"]  # the third layer keeps its MLP's activations
        assert (partial["forwards"], partial["mlp_forwards"]) == (3, [2, 2, 1])
        assert partial["says"] == " | recompute selective (mlp) in 2 of 3 layers"
        for run in (mixed, partial):
            assert run["loss"] == plain["loss"]
            for key, grad in plain["grads"].items():
                assert torch.equal(run["grads"][key], grad), key


@pytest.mark.parametrize("settings,last", [
    (dict(recompute_granularity="selective"), None),  # --recompute-activations: every layer's MLP
    (dict(recompute_granularity="full", recompute_num_layers=3), 0),  # forced full: no MLP of its own
    (dict(recompute_granularity=None, recompute_mlp_layers=0), 0),  # auto: none
    (dict(recompute_granularity="full", recompute_num_layers=3, recompute_mlp_layers=0), 0),  # auto: whole only
    (dict(recompute_granularity="full", recompute_num_layers=3, recompute_mlp_layers=19), 22),  # whole + the others
    (dict(recompute_granularity="selective", recompute_mlp_layers=16), 16),  # auto: the first 16 MLPs
])
def test_the_last_layer_whose_mlp_recomputes(settings, last):
    import argparse

    assert recompute.last_mlp_layer(argparse.Namespace(**settings)) == last
