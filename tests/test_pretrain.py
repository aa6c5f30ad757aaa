"""launch/pretrain_gpt.py on CPU with gloo, under torchrun and the real DeepSpeed launcher (the README's).

A tiny GPT on the recall task, 6 iterations. Ring attention must reproduce a run without it (dense
attention, whole sequence per rank) on the same global batches; a stopped and resumed run, and runs
with activation recompute (full, selective), must reproduce an uninterrupted plain one exactly.
Bad configs and dead ranks: tests/test_pretrain_exits.py.
"""

from __future__ import annotations

import os

import pytest

from tests.pretrain_runs import deepspeed_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """The runs the loss comparisons share (each 5-30 s on 2 CPU cores), under torchrun except ring2."""
    tmp = tmp_path_factory.mktemp("pretrain")
    out = {"tmp": tmp}
    out["dense"] = deepspeed_run(tmp, "dense", 2, None, 1, ["--exit-interval", "4"])
    out["ring2"] = deepspeed_run(tmp, "ring2", 2, 2, 1, [], launcher="deepspeed")  # the README's launcher
    out["ring2_data2"] = deepspeed_run(tmp, "ring2_data2", 4, 2, 2, ["--exit-interval", "4"])
    out["ring2_zero3"] = deepspeed_run(tmp, "ring2_zero3", 2, 2, 3, ["--exit-interval", "4"])
    # One replica, as the ring of 2: with documents the scored tokens differ between samples, and the job
    # averages each replica's token mean (as Megatron does), so the data-parallel split must match.
    out["dense_docs"] = deepspeed_run(tmp, "dense_docs", 1, None, 1, ["--exit-interval", "4", *DOCUMENTS])
    out["ring2_docs_output"] = []
    out["ring2_docs"] = deepspeed_run(tmp, "ring2_docs", 2, 2, 1, ["--exit-interval", "4", *DOCUMENTS],
                                      output=out["ring2_docs_output"])
    return out


# Three recall episodes per sequence, learned positions restarting in every document, no loss at document ends.
DOCUMENTS = ["--recall-keys", "4", "--recall-documents", "3", "--position-embedding-type", "learned_absolute",
             "--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"]


def _close(a: dict, b: dict, iterations, rtol: float) -> None:
    for i in iterations:
        for key in ("loss", "grad_norm"):
            assert abs(a[i][key] - b[i][key]) <= rtol * abs(b[i][key]), (i, key, a[i][key], b[i][key])


@pytest.mark.parametrize("name", ["ring2", "ring2_data2", "ring2_zero3"])
def test_ring_attention_losses_match_dense_attention(runs, name):
    # dense: 2 ranks of data parallelism, whole sequences, ZeRO-1. ring2: one ring of 2, ZeRO-1.
    # ring2_data2: 4 ranks = ring 2 × data 2, ZeRO-2. ring2_zero3: one ring of 2, ZeRO-3.
    # Same global batches, same initial weights.
    dense, ring = runs["dense"], runs[name]
    assert sorted(dense) == [1, 2, 3, 4]
    _close(ring, dense, [1, 2, 3, 4], rtol=1e-5)  # seen: 1e-7
    assert dense[4]["loss"] < dense[1]["loss"] - 0.05  # it learns: the comparison is not of constants


def test_packed_documents_ring_matches_dense_attention(runs):
    """--reset-attention-mask --reset-position-ids --eod-mask-loss: ring 2 equals dense attention with the same
    document masks; the same data without the document mask gives another run (the flag takes effect)."""
    _close(runs["ring2_docs"], runs["dense_docs"], [1, 2, 3, 4], rtol=1e-5)
    # the ring's torch backend masks by document ids: the job says it plans the document grid
    assert "packed documents: document grid 4096: " in runs["ring2_docs_output"][0]
    assert "\nattention kernel: torch\n" in runs["ring2_docs_output"][0]  # the config's backend, said at start
    unmasked = [f for f in DOCUMENTS if f != "--reset-attention-mask"]
    ring = deepspeed_run(runs["tmp"], "ring2_docs_unmasked", 2, 2, 1, ["--exit-interval", "2", *unmasked])
    dense = runs["dense_docs"]
    misses = max(abs(ring[i][k] - dense[i][k]) / abs(dense[i][k]) for i in (1, 2) for k in ("loss", "grad_norm"))
    assert misses > 10 * 1e-5, misses  # seen: the loss alone 3.6e-5 off at iteration 1 (near-uniform attention)


def test_tensor_parallel_ring_matches_dense_attention(runs):
    # 4 ranks = tensor 2 × ring 2, ZeRO-2: one set of groups serves Megatron's tensor parallelism,
    # the ring and ZeRO. Megatron initialises the full weights on CPU, then splits them, so the
    # reference is still the dense data-parallel run.
    ring = deepspeed_run(runs["tmp"], "tp2_ring2", 4, 2, 2, ["--exit-interval", "4"], tensor=2)
    _close(ring, runs["dense"], [1, 2, 3, 4], rtol=1e-5)


@pytest.mark.big
def test_pipeline_tensor_ring_matches_dense_attention(runs):
    # 8 ranks = pipeline 2 × ring 2 × tensor 2 (1 layer per stage), ZeRO-1: the
    # pipeline engine's stages, their rings and tensor-parallel pairs reproduce the dense data-parallel run.
    # GLOBAL_BATCH in 2 micro batches of 2 (data 1), as the pipeline of 2 stages needs at least 2.
    ring = deepspeed_run(runs["tmp"], "p2_ring2_tp2", 8, 2, 1, ["--exit-interval", "4"], tensor=2, pipeline=2,
                         timeout=600)
    _close(ring, runs["dense"], [1, 2, 3, 4], rtol=1e-5)


def test_stopped_and_resumed_run_equals_uninterrupted_run(runs):
    tmp = runs["tmp"]
    save = str(tmp / "ckpt")
    # stopped under torchrun, resumed under the DeepSpeed launcher: the job runs under both
    quiet, verbose = [], []
    first = deepspeed_run(tmp, "stopped", 2, 2, 1, ["--exit-interval", "3", "--save", save], output=quiet)
    assert open(os.path.join(save, "latest")).read() == "iter_0000003"
    resumed = deepspeed_run(tmp, "resumed", 2, 2, 1, ["--load", save, "--verbose"], launcher="deepspeed",
                            output=verbose)
    assert sorted(first) == [1, 2, 3] and sorted(resumed) == [4, 5, 6]
    # Megatron-core's and DeepSpeed's warnings are hidden, and shown with --verbose (torchrun adds nothing
    # of its own: what the first run printed is the job's; the DeepSpeed launcher logs its own lines)
    assert "Setting accelerator to CPU" not in quiet[0]
    for hidden in ("Transformer Engine and Apex are not installed", "UserWarning", "FutureWarning"):
        assert hidden not in quiet[0] and hidden in verbose[0], hidden
    uninterrupted = runs["ring2"]
    for i in range(1, 7):
        got = (first if i <= 3 else resumed)[i]
        assert (got["loss"], got["grad_norm"]) == (uninterrupted[i]["loss"], uninterrupted[i]["grad_norm"]), i


@pytest.mark.parametrize("name,flags,says", [
    ("auto", ["--recompute-memory-budget", "1e-6"],
     ["recompute full (block: the first 2 of 2 layers)", "recompute: full (estimated activations"]),
    ("selective", ["--recompute-activations"], ["recompute selective (mlp)", "recompute: selective (as the command"]),
], ids=["auto_full", "selective"])
def test_activation_recompute_gives_the_same_run(runs, name, flags, says):
    # Megatron-core's recompute on CPU (gloo), ring of 2, ZeRO-1. auto with a budget nothing fits in: full
    # recompute of every layer (the least memory), whose forward runs again in backward; selective: every MLP
    # runs again in backward. The recomputed forward is the same arithmetic on the same inputs, so loss and
    # gradient norm are those of the ring2 run without recompute; seen: bitwise equal, every iteration.
    out = []
    got = deepspeed_run(runs["tmp"], f"recompute_{name}", 2, 2, 1, ["--exit-interval", "4", *flags], output=out)
    for line in says:  # the built model's TransformerConfig has it, and the plan was printed
        assert line in out[0], line
    assert sorted(got) == [1, 2, 3, 4]
    plain = runs["ring2"]
    for i in got:
        assert (got[i]["loss"], got[i]["grad_norm"]) == (plain[i]["loss"], plain[i]["grad_norm"]), i
