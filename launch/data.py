"""Training data: an embedded long-range recall task (default) or Megatron's indexed token dataset.

Both hand out the same thing: ``batch(step, replica, micro_batch, replicas)`` → dict of int64
(micro_batch, seq) tensors ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` for one
data-parallel replica at one step, a pure function of its arguments (so a resumed run sees the
very same samples, and a run with a different data × ring split sees the same global batch), and
``documents``: per sample, the boundaries ``[0, ..., seq]`` of the documents packed in it.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ring_sp import local_positions


class RecallTask:
    """Fact recall across the sequence: solvable only by attending far back.

    A sample of ``seq_length`` tokens. The first half is filler with ``num_keys`` *facts* at
    random places: fact token ``(k, v)`` says key k has value v (one fact per key, values drawn
    afresh for every sample). Every token of the second half is a *question* ``k?``, labelled
    with its answer, the value ``v``. Answers never appear in the input and only they are
    scored (``loss_mask``): the answer to ``k?`` can only be known by finding fact ``(k, ·)``,
    so a model that cannot attend to it is at chance, 1 / ``num_values``.

    With the sequence sharded over a ring, many questions sit on another rank than their fact:
    ``batch(...)["answer_source"]`` holds, per position, the position of the fact its answer
    needs (-1: not a question), and :func:`shard_sources` / :func:`recall_accuracy` score
    same-shard and cross-shard answers separately.

    ``documents`` > 1 packs that many independent episodes (documents) of random lengths into each
    sequence, each with its own facts and questions: a question may only use its own document's
    fact of its key (another document gives the same key another value).
    """

    BOS, FILL = 0, 1

    def __init__(self, seq_length: int, num_keys: int = 8, num_values: int = 8, seed: int = 1234,
                 documents: int = 1):
        if documents < 1 or seq_length < 4 * num_keys * documents:
            raise ValueError(f"--seq-length {seq_length}: the recall task needs at least {4 * num_keys} tokens per "
                             f"document ({num_keys} facts in its first half), so {4 * num_keys * documents} for "
                             f"--recall-documents {documents}")
        self.seq_length, self.num_keys, self.num_values, self.seed = seq_length, num_keys, num_values, seed
        self.documents = documents
        self.fact0 = 2
        self.question0 = self.fact0 + num_keys * num_values
        self.value0 = self.question0 + num_keys
        self.vocab_size = self.value0 + num_values
        self.chance = 1.0 / num_values

    def sample(self, index: int, split: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """Sample ``index`` of ``split`` (0 train, 1 validation): tokens, labels and, per position,
        the position of the fact its answer needs (-1: not a question), each (seq_length,); and the
        document boundaries."""
        rng = np.random.default_rng([self.seed, split, index])
        bounds = self._boundaries(rng)
        parts = [self._episode(rng, start, stop - start) for start, stop in zip(bounds, bounds[1:])]
        return (*(np.concatenate(x) for x in zip(*parts)), bounds)

    def _boundaries(self, rng) -> list[int]:
        """Random document lengths, each at least 4 · keys (a document's first half holds its facts)."""
        least = 4 * self.num_keys
        spare = self.seq_length - least * self.documents
        cuts = np.sort(rng.integers(0, spare + 1, self.documents - 1))
        lengths = least + np.diff(np.concatenate([[0], cuts, [spare]]))
        return [0, *np.cumsum(lengths).tolist()]

    def _episode(self, rng, start: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One document at global position ``start``: facts in its first half, questions in the second."""
        half, keys = length // 2, self.num_keys
        values = rng.integers(0, self.num_values, keys)
        fact_pos = 1 + rng.choice(half - 1, keys, replace=False)
        tokens = np.full(length, self.FILL, dtype=np.int64)
        tokens[0] = self.BOS
        tokens[fact_pos] = self.fact0 + np.arange(keys) * self.num_values + values
        asked = rng.integers(0, keys, length - half)
        tokens[half:] = self.question0 + asked
        labels = np.full(length, self.FILL, dtype=np.int64)
        labels[half:] = self.value0 + values[asked]
        source = np.full(length, -1, dtype=np.int64)
        source[half:] = start + fact_pos[asked]
        return tokens, labels, source

    def batch(self, step: int, replica: int, micro_batch: int, replicas: int,
              split: int = 0) -> dict[str, torch.Tensor]:
        first = (step * replicas + replica) * micro_batch
        samples = [self.sample(first + i, split) for i in range(micro_batch)]
        tokens, labels, source = (torch.from_numpy(np.stack([s[n] for s in samples])) for n in range(3))
        positions = torch.arange(self.seq_length).expand_as(tokens).contiguous()
        return {"tokens": tokens, "labels": labels, "loss_mask": (source >= 0).float(), "position_ids": positions,
                "answer_source": source, "documents": [s[3] for s in samples]}


def _lm_batch(tokens: torch.Tensor, documents: list[list[int]]) -> dict:
    """tokens (b, seq + 1) → next-token inputs and labels (b, seq), every token scored."""
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    positions = torch.arange(inputs.shape[1]).expand_as(inputs).contiguous()
    return {"tokens": inputs, "labels": labels, "loss_mask": torch.ones_like(inputs, dtype=torch.float32),
            "position_ids": positions, "documents": documents}


def not_last_of_documents(documents: list[list[int]], seq: int) -> torch.Tensor:
    """(batch, seq) float: 0 at the last token of every document but the sequence's last (its label is the
    next document's first token: Megatron's --eod-mask-loss), 1 elsewhere."""
    keep = torch.ones(len(documents), seq)
    for row, bounds in enumerate(documents):
        keep[row, [b - 1 for b in bounds[1:-1]]] = 0.0
    return keep


def shard_sources(source: torch.Tensor, layout: str, ring_rank: int, ring_size: int) -> torch.Tensor:
    """For this rank's shard of ``answer_source`` (b, local_seq): 1 if the answer's source is on
    another rank of the ring, 0 if on this one, -1 where there is no answer."""
    seq = source.shape[1] * ring_size
    owner = torch.empty(seq, dtype=torch.int64)
    for r in range(ring_size):
        owner[local_positions(seq, layout, r, ring_size)] = r
    out = torch.full_like(source, -1)
    has = source >= 0
    out[has] = (owner[source[has]] != ring_rank).long()
    return out


def recall_accuracy(logits_argmax: torch.Tensor, labels: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """Counts (4,) float64: [correct same-shard, same-shard answers, correct cross-shard, cross-shard answers].

    logits_argmax, labels, cross: (b, local_seq); ``cross`` from :func:`shard_sources`.
    """
    hit = logits_argmax == labels
    return torch.tensor([(hit & (cross == 0)).sum(), (cross == 0).sum(), (hit & (cross == 1)).sum(),
                         (cross == 1).sum()], dtype=torch.float64)


class IndexedTokens:
    """Megatron's indexed dataset (``PATH.bin`` + ``PATH.idx``) cut into windows of seq_length + 1.

    Documents are concatenated in index order and read as one token stream (no shuffling): window i
    is tokens [i·seq_length, (i+1)·seq_length + 1); its ``documents`` are the boundaries of the
    index's documents inside the window's inputs. The last ``valid_fraction`` of the windows (at
    least one) is held out for validation (split 1).
    """

    def __init__(self, path_prefix: str, seq_length: int, vocab_size: int, valid_fraction: float = 0.05):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        for suffix in (".bin", ".idx"):
            if not os.path.exists(path_prefix + suffix):
                raise ValueError(f"--data-path {path_prefix}: {path_prefix + suffix} does not exist (give the prefix "
                                 "of a Megatron indexed dataset, without .bin / .idx)")
        self.dataset = IndexedDataset(path_prefix, mmap=True)
        self.seq_length, self.vocab_size = seq_length, vocab_size
        self.lengths = np.asarray(self.dataset.sequence_lengths, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])
        windows = int((self.starts[-1] - 1) // seq_length)
        if windows < 2:
            raise ValueError(f"--data-path {path_prefix}: {self.starts[-1]} tokens make fewer than two sequences of "
                             f"--seq-length {seq_length} + 1 (one to train on, one to validate)")
        valid = max(1, int(windows * valid_fraction))
        self.ranges = [(0, windows - valid), (windows - valid, windows)]  # train, validation

    def window(self, i: int) -> np.ndarray:
        """Tokens [i·seq_length, (i+1)·seq_length + 1) of the concatenated documents."""
        start = i * self.seq_length
        end = start + self.seq_length + 1
        doc = int(np.searchsorted(self.starts, start, side="right") - 1)
        parts, have = [], 0
        while have < end - start:
            lo = max(start - self.starts[doc], 0)
            hi = min(end - self.starts[doc], self.lengths[doc])
            parts.append(np.asarray(self.dataset.get(doc, offset=int(lo), length=int(hi - lo)), dtype=np.int64))
            have += int(hi - lo)
            doc += 1
        return np.concatenate(parts)

    def boundaries(self, i: int) -> list[int]:
        """Document boundaries [0, ..., seq_length] of window i's inputs (where the index's documents start)."""
        start = i * self.seq_length
        inside = self.starts[(self.starts > start) & (self.starts < start + self.seq_length)] - start
        return [0, *inside.tolist(), self.seq_length]

    def batch(self, step: int, replica: int, micro_batch: int, replicas: int, split: int = 0) -> dict:
        lo, hi = self.ranges[split]
        first = (step * replicas + replica) * micro_batch
        windows = [lo + (first + i) % (hi - lo) for i in range(micro_batch)]
        tokens = torch.from_numpy(np.stack([self.window(w) for w in windows]))
        return _lm_batch(tokens, [self.boundaries(w) for w in windows])
