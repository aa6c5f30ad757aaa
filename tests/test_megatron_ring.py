"""A Megatron-core GPTModel with the ring spec (tensor-parallel 1 and 2 × ring 2 and 4, gloo, fp32)
against the same model without ring attention on one rank over the whole sequence: same loss, same
parameter gradients after the data×context reduction, same loss curve under AdamW.

Tolerances (fp32; measured errors are ~1e-7 for the loss and ~1e-6 for gradients):
- loss: relative error ≤ 1e-5 at every step;
- gradients: for every parameter, max |ring − reference| ≤ 2e-5 · max |reference|.
The negative controls (RoPE or data sharded with another layout) miss these bounds by > 30×, so
the comparison can fail.
"""

import pytest

from tests import megatron_jobs, thd_batches

LOSS_TOL = 1e-5
GRAD_TOL = 2e-5
STD = 0.1  # init std large enough that attention is far from uniform, so positions matter


def _case(layout, position="rope", **kw):
    return {"layout": layout, "position": position, "heads": 4, "seq": 16, "micro": 2, "std": STD, **kw}


def _check(results, cases, min_params=20):
    failures = []
    for rank, per_case in enumerate(results):
        for case, r in zip(cases, per_case):
            name = {k: v for k, v in case.items() if k not in ("std", "heads")}
            for step, err in enumerate(r["loss_errors"]):
                if not err <= LOSS_TOL:
                    failures.append(f"rank {rank} {name} step {step}: loss rel err {err:.2e}")
            if len(r["grad_errors"]) < min_params:
                failures.append(f"rank {rank} {name}: only {len(r['grad_errors'])} gradients compared")
            for param, err in r["grad_errors"].items():
                if not err <= GRAD_TOL:
                    failures.append(f"rank {rank} {name} {param}: grad rel err {err:.2e}")
    assert not failures, "\n".join(failures[:20])


LAYOUTS = ("zigzag", "striped", "contiguous")


def test_ring_2_every_layout(dist_pool):
    """tp 1 × ring 2: RoPE + GQA + Megatron's sliding window; learned positions + ring lookback; a mask."""
    cases = [_case(layout, groups=2, window=(4, 0)) for layout in LAYOUTS]
    cases += [_case(layout, "learned_absolute", lookback=5) for layout in LAYOUTS]
    cases += [_case("zigzag", mask=True), _case("contiguous", "learned_absolute", groups=1, mask=True)]
    cases += [_case("striped", groups=2, liger_rope=True)]  # liger's RoPE kernel (Triton's interpreter on CPU)
    _check(dist_pool(2).run(megatron_jobs.compare_with_reference, 1, 2, cases, timeout=600), cases)


def test_ring_4_every_layout(dist_pool):
    """tp 1 × ring 4, seq 32: RoPE with multi-query attention and a window that spans ranks (every
    second layer full attention, Megatron's window_attn_skip_freq)."""
    cases = [_case(layout, groups=1, window=(6, 0), skip_freq=2, seq=32, micro=1) for layout in LAYOUTS]
    cases += [_case("striped", "learned_absolute", seq=32, micro=1, mask=True)]
    cases += [_case("zigzag", groups=1, seq=32, micro=1, liger_rope=True)]  # MQA: q is a view, rotated in a copy
    _check(dist_pool(4).run(megatron_jobs.compare_with_reference, 1, 4, cases, timeout=600), cases)


def test_tensor_parallel_2_ring_2(dist_pool):
    """tp 2 × ring 2: each tensor-parallel rank holds 2 query heads and 1 K/V group."""
    cases = [_case(layout, groups=2, window=(4, 0)) for layout in LAYOUTS]
    cases += [_case("striped", "learned_absolute", mask=True)]
    _check(dist_pool(4).run(megatron_jobs.compare_with_reference, 2, 2, cases, timeout=600), cases)


def test_data_parallel_2_ring_2(dist_pool):
    """dp 2 × ring 2: gradients reduced over data × context, as Megatron's DDP does."""
    cases = [_case("zigzag", groups=2), _case("contiguous", "learned_absolute", window=(3, 0))]
    _check(dist_pool(4).run(megatron_jobs.compare_with_reference, 1, 2, cases, timeout=600), cases)


def test_training_tracks_reference_loss_curve(dist_pool):
    """Five AdamW steps, tp 2 × ring 2 and tp 1 × ring 4: the loss follows the reference step for step."""
    pool = dist_pool(4)
    for tp, cp, case in ((2, 2, _case("contiguous", groups=2, steps=5)),
                         (1, 4, _case("striped", window=(5, 0), seq=32, micro=1, steps=5))):
        results = pool.run(megatron_jobs.compare_with_reference, tp, cp, [case], timeout=600)
        _check(results, [case])
        losses = results[0][0]["losses"]
        assert len(results[0][0]["loss_errors"]) == 5
        assert losses[0] - losses[-1] > 0.05, f"the loss barely moved ({losses}): the curve comparison is vacuous"


@pytest.mark.parametrize("tp,cp", [(1, 2), (1, 4), (2, 2)])
def test_packed_documents(dist_pool, tp, cp):
    """Packed documents (random lengths 1–11, different per sample, position ids reset per document):
    the ring model given their boundaries (shard_batch(..., documents=...)) equals the model on one rank
    with block-diagonal causal attention, every layout, RoPE and learned positions, GQA."""
    seq = 8 * cp
    layouts = LAYOUTS if (tp, cp) == (1, 2) else [{4: "zigzag", 2: "contiguous"}[cp]]
    cases = [_case(layout, groups=2, documents=1, seq=seq, micro=2 if cp == 2 else 1) for layout in layouts]
    if (tp, cp) == (1, 2):
        cases += [_case("striped", "learned_absolute", documents=2, seq=seq, micro=1, window=(4, 0))]
    _check(dist_pool(4).run(megatron_jobs.compare_with_reference, tp, cp, cases, timeout=600), cases)


def test_one_agreement_check_per_forward(dist_pool):
    """The ranks' agreement on shapes and options is checked at the first ring layer only (one host sync per
    forward on GPUs, not one per layer)."""
    assert dist_pool(2).run(megatron_jobs.agreement_exchanges_per_forward, timeout=600) == [1, 1]


def test_thd_packed_sequences_on_one_rank(dist_pool):
    """Megatron's THD packed_seq_params (context-parallel 1): the same logits as the document mask path."""
    ((packed, plain),) = dist_pool(1).run(megatron_jobs.thd_matches_document_mask, timeout=600)
    assert packed < 1e-5 and plain > 1e-2, (packed, plain)


@pytest.mark.parametrize("control", [{"rope_layout": "zigzag"}, {"data_layout": "zigzag"},
                                     {"documents": 1, "hide_documents": True}])
def test_negative_controls_fail_the_bounds(dist_pool, control):
    """Striped ring attention fed zigzag RoPE positions or zigzag-sharded data, or not told the documents
    the reference masks, must miss the bounds."""
    position = "rope" if "rope_layout" in control else "learned_absolute"
    case = _case("striped", position, **control)
    (r,), *_ = dist_pool(2).run(megatron_jobs.compare_with_reference, 1, 2, [case], timeout=600)
    assert max(r["grad_errors"].values()) > 30 * GRAD_TOL
    assert r["loss_errors"][0] > 30 * LOSS_TOL


@pytest.mark.parametrize("layout, spec", [("zigzag", "local"), ("striped", "override"), ("contiguous", "te")])
def test_apply_makes_megatron_functions_ring_aware(dist_pool, layout, spec):
    """After apply() and --ring-attention --ring-layout L: GPTModel built from Megatron's own layer spec
    (local; local with the core attention set back to DotProductAttention, as Megatron-LM 0.19's
    GPTModelBuilder does; Transformer Engine's spec with stand-ins for its modules), Megatron's RoPE and
    get_batch_on_this_cp_rank give the ring model, matching the reference built from the same spec."""
    cases = [_case(layout, groups=2, window=(4, 0), spec=spec)]
    argv = ["--ring-attention", "--ring-layout", layout]
    _check(dist_pool(2).run(megatron_jobs.apply_matches_reference, 1, 2, cases, argv, timeout=600), cases)


@pytest.mark.parametrize("world", [2, 4])
def test_zigzag_is_megatrons_batch_split_and_rope_sharding(dist_pool, world):
    """shard_batch(layout='zigzag') and the zigzag RoPE rows equal Megatron's own get_batch_on_this_cp_rank
    split (tokens, loss mask, positions, the attention mask's query rows, the rotary table)."""
    results = dist_pool(world).run(megatron_jobs.zigzag_is_megatrons, world, timeout=300)
    assert all(all(r) and len(r) == 5 for r in results), results


# THD packed sequences (Megatron's packed_seq_params) at context parallelism > 1: one stream [1, T] of two
# samples (micro-batch 2 flattened as Megatron-LM does) with documents of random lengths 1–13 (the first of
# length 1; most not multiples of 2 × CP), split with the ring's layout, RoPE by in-document position, against
# the same model on one rank fed the same THD batch (Megatron's own per-document RoPE at cp = 1).
def _thd(layout, position="rope", **kw):
    return _case(layout, position, **{"groups": 2, "thd": 3, "seq": 16, "micro": 2, **kw})


def _ragged(cases, cp):
    """Each case's documents include one of length 1 and lengths that are not multiples of 2 × CP."""
    for case in cases:
        lengths = [size for sample in thd_batches.documents(case, slice(0, 4)) for _, size in sample]
        assert 1 in lengths and any(n % (2 * cp) for n in lengths) and len(lengths) > 4, (case, lengths)


def test_thd_ring_2_every_layout(dist_pool):
    """dp 2 × ring 2, every layout; padded documents (cu_seqlens_padded, padding with loss_mask 0); learned
    positions (position ids restart per document)."""
    cases = [_thd(layout) for layout in LAYOUTS]
    cases += [_thd("striped", padded=True), _thd("zigzag", "learned_absolute", thd=4)]
    cases += [_thd("contiguous", liger_rope=True)]  # packed_rope's table through liger's RoPE kernel
    _ragged(cases, 2)
    _check(dist_pool(4).run(megatron_jobs.compare_with_reference, 1, 2, cases, timeout=600), cases)


def test_thd_ring_4_and_tensor_parallel_2_ring_2(dist_pool):
    """tp 1 × ring 4 (8 tokens a rank, documents spanning ranks or inside one), and tp 2 × ring 2."""
    pool = dist_pool(4)
    cases = [_thd("zigzag", thd=5), _thd("contiguous", padded=True, thd=6)]
    _ragged(cases, 4)
    _check(pool.run(megatron_jobs.compare_with_reference, 1, 4, cases, timeout=600), cases)
    cases = [_thd("striped", padded=True, thd=7)]
    _check(pool.run(megatron_jobs.compare_with_reference, 2, 2, cases, timeout=600), cases)


@pytest.mark.parametrize("layout, split", [("zigzag", "main"), ("striped", "thd_016"), ("contiguous", "core_013"),
                                           ("zigzag", "core")])
def test_thd_through_megatron_lm_batch_split(dist_pool, layout, split):
    """After apply() and --ring-attention --ring-layout L, Megatron-LM's THD batch split of each signature
    (main's get_batch_on_this_cp_rank(batch, is_hybrid_cp, cp_group, ..., use_per_sequence_balancing), 0.16's
    get_thd_batch_on_this_cp_rank, core 0.13's get_batch_on_this_cp_rank(batch), the installed one) gives the ring
    model of the reference; zigzag too (Megatron's own THD split would cut every document)."""
    cases = [_thd(layout, split=split, padded=split == "thd_016")]
    argv = ["--ring-attention", "--ring-layout", layout]
    _check(dist_pool(4).run(megatron_jobs.apply_matches_reference, 1, 2, cases, argv, timeout=600), cases)


def test_thd_negative_control_megatron_rope(dist_pool):
    """Documents of lengths 4, 8, 4 (multiples of 2 × CP, so Megatron's per-document RoPE slicing runs): with
    megatron_patch's THD RoPE off the ring model misses the bounds, with it on it meets them."""
    cases = [_thd("striped", lengths=[4, 8, 4], rope_fix=False), _thd("striped", lengths=[4, 8, 4])]
    (off, on), *_ = dist_pool(4).run(megatron_jobs.compare_with_reference, 1, 2, cases, timeout=600)
    assert max(off["grad_errors"].values()) > 30 * GRAD_TOL and off["loss_errors"][0] > 10 * LOSS_TOL, off
    _check([[on]], cases[1:])


@pytest.mark.parametrize("kind, words", [
    ("thd_stream_length", ["T = 18", "multiple of 4", "Pad the stream"]),
    ("thd_ranks_disagree", ["disagree", "cu_seqlens"]),
    ("thd_ranks_disagree_no_rope", ["disagree on cu_seqlens"]),
    ("thd_not_flat", ["[1, T]", "flatten"]),
    ("thd_short_table", ["max_seqlen_q"]),
    ("thd_hybrid", ["hybrid"]),
    ("thd_without_options", ["RingOptions", "shard_batch"]),
])
def test_thd_bad_input_raises_on_every_rank(dist_pool, kind, words):
    """Ring 2 (× dp 2): bad THD input raises ValueError on every rank (no rank left waiting in a collective)."""
    errors = dist_pool(4).run(megatron_jobs.thd_bad_input, kind, timeout=300)
    for rank, text in enumerate(errors):
        assert text != "no error", f"rank {rank}: {kind} was accepted"
        for word in words:
            assert word in text, f"rank {rank}: {text}"
