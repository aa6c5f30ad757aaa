"""The pretraining data: the recall task's answers need their fact, shard bookkeeping, indexed datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from launch import checkpoint
from launch.data import IndexedTokens, RecallTask, recall_accuracy, shard_sources
from ring_sp import local_positions, split


def test_recall_answers_are_the_fact_values_and_only_they_are_scored():
    task = RecallTask(64, num_keys=4, num_values=5)
    b = task.batch(3, 1, 2, 4)
    b2 = task.batch(3, 1, 2, 4)
    assert all(torch.equal(b[k], b2[k]) if k != "documents" else b[k] == b2[k] for k in b)  # pure in (step, replica)
    assert b["documents"] == [[0, 64], [0, 64]]  # one document a sequence by default
    assert not torch.equal(b["tokens"], task.batch(3, 0, 2, 4)["tokens"])
    assert not torch.equal(b["tokens"], task.batch(3, 1, 2, 4, split=1)["tokens"])
    for tokens, labels, source, mask in zip(b["tokens"], b["labels"], b["answer_source"], b["loss_mask"]):
        assert torch.equal(mask.bool(), source >= 0) and int(mask.sum()) == 32
        facts = {}
        for t in tokens[: 32].tolist():
            if task.fact0 <= t < task.question0:
                key, value = divmod(t - task.fact0, task.num_values)
                facts[key] = value
        assert sorted(facts) == list(range(4))
        assert not ((tokens >= task.value0).any())  # answers are never in the input
        for p in torch.nonzero(mask).flatten().tolist():
            key = tokens[p].item() - task.question0
            assert 0 <= key < 4 and labels[p].item() == task.value0 + facts[key]  # the answer is the fact's value
            assert tokens[source[p]].item() == task.fact0 + key * task.num_values + facts[key]
            assert source[p] < 32 <= p  # facts in the first half, questions in the second
    assert task.chance == 1 / 5


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_cross_shard_answers_are_those_whose_fact_is_elsewhere(layout):
    task = RecallTask(32, num_keys=4, num_values=4)
    source = task.batch(0, 0, 3, 1)["answer_source"]
    owner = torch.empty(32, dtype=torch.long)
    for r in range(2):
        owner[local_positions(32, layout, r, 2)] = r
    for r, local in enumerate(split(source, layout, 2)):
        got = shard_sources(local, layout, r, 2)
        positions = local_positions(32, layout, r, 2)
        for b in range(3):
            for i, p in enumerate(positions.tolist()):
                s = source[b, p].item()
                assert got[b, i].item() == (-1 if s < 0 else int(owner[s].item() != r))
    if layout == "contiguous":  # rank 1 holds every question, rank 0 every fact
        assert (shard_sources(split(source, layout, 2)[1], layout, 1, 2) != 0).all()
    counts = recall_accuracy(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 0, 3]]), torch.tensor([[0, 1, 1]]))
    assert counts.tolist() == [1, 1, 1, 2]


def test_indexed_dataset_windows(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "tokens")
    docs = [np.arange(0, 23), np.arange(100, 107), np.arange(200, 250)]
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in docs:
        builder.add_item(torch.from_numpy(d))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    stream = np.concatenate(docs)
    data = IndexedTokens(prefix, seq_length=8, vocab_size=256, valid_fraction=0.2)
    windows = (len(stream) - 1) // 8
    assert data.ranges == [(0, windows - 1), (windows - 1, windows)]
    for i in range(windows):
        assert np.array_equal(data.window(i), stream[8 * i: 8 * i + 9])
    b = data.batch(1, 0, 2, 1)
    assert torch.equal(b["tokens"][0], torch.from_numpy(stream[16:24])) and b["loss_mask"].all()
    assert torch.equal(b["labels"][0], torch.from_numpy(stream[17:25]))
    valid = data.batch(0, 0, 1, 1, split=1)
    assert torch.equal(valid["tokens"][0], torch.from_numpy(stream[8 * (windows - 1): 8 * windows]))
    # Document boundaries inside each window's inputs: documents start at 23 and 30 in the stream.
    assert data.boundaries(2) == [0, 7, 8] and data.boundaries(3) == [0, 6, 8] and data.boundaries(0) == [0, 8]
    assert b["documents"] == [[0, 7, 8], [0, 6, 8]]
    with pytest.raises(ValueError, match="does not exist"):
        IndexedTokens(str(tmp_path / "nothing"), 8, 256)


def test_recall_documents_are_independent_episodes():
    """Packed episodes: each answer's fact lies in its own document, and the documents cover the sequence."""
    from launch.data import RecallTask, not_last_of_documents

    task = RecallTask(96, num_keys=4, num_values=8, seed=1, documents=3)
    for i in range(20):
        tokens, labels, source, bounds = task.sample(i)
        assert bounds[0] == 0 and bounds[-1] == 96 and len(bounds) == 4
        assert all(b - a >= 16 for a, b in zip(bounds, bounds[1:]))
        doc_of = np.searchsorted(bounds, np.arange(96), side="right") - 1
        asked = source >= 0
        assert (doc_of[source[asked]] == doc_of[asked]).all(), "a question's fact must be in its own document"
        assert (tokens[bounds[:-1]] == task.BOS).all()
    keep = not_last_of_documents([[0, 3, 8]], 8)
    assert keep.tolist() == [[1, 1, 0, 1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="--recall-documents 4"):
        RecallTask(96, num_keys=8, documents=4)


def test_latest_is_replaced_atomically(tmp_path):
    path = str(tmp_path / "latest")
    checkpoint.write_atomically(path, "iter_0000001")
    checkpoint.write_atomically(path, "iter_0000002")
    assert open(path).read() == "iter_0000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # no temporary file left behind


def test_warnings_go_above_the_progress_bar(monkeypatch):
    import io
    import warnings

    from tqdm import tqdm

    from launch import quiet

    out = io.StringIO()
    bar = tqdm(total=3, desc="train", file=out)
    bar.update(1)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored afterwards
    quiet.warnings_above(bar)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("something odd", UserWarning, stacklevel=1)
    bar.close()
    lines = [line.split("\r")[-1] for line in out.getvalue().split("\n")]  # what a terminal shows
    (said,) = [line for line in lines if "UserWarning: something odd" in line]
    assert "train:" not in said and "it/s" not in said  # a line of its own, not the bar's


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_learning_rate_schedule_is_megatrons(style, warmup):
    """--lr, --min-lr, --lr-warmup-iters, --lr-decay-style mean what they mean in Megatron-LM: the lr of every
    iteration equals megatron-core's OptimizerParamScheduler's (stepped once per iteration, warmup from 0)."""
    from argparse import Namespace

    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from launch.job import build_optimizer

    args = Namespace(lr=3e-4, min_lr=3e-5, lr_warmup_iters=warmup, lr_decay_style=style, train_iters=12,
                     weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95)
    ours, scheduler = build_optimizer(args, torch.nn.Linear(2, 2))
    theirs = OptimizerParamScheduler(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0), init_lr=0.0,
                                     max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=warmup,
                                     lr_decay_steps=args.train_iters, lr_decay_style=style, start_wd=0.01,
                                     end_wd=0.01, wd_incr_steps=args.train_iters, wd_incr_style="constant")
    for iteration in range(args.train_iters + 2):
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.get_lr(theirs.optimizer.param_groups[0]),
                                                            rel=1e-12, abs=1e-15), iteration
        ours.step()
        scheduler.step()
        theirs.step(1)
