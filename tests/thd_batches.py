"""THD packed batches for the Megatron jobs, as Megatron-LM's ``get_batch`` builds them, and their splits.

A case with ``thd`` packs each replica's micro-batch ([micro, seq] samples, ``megatron_jobs.make_batches``)
into one stream [1, micro * seq] (Megatron-LM's ``flatten_batch_for_packed_sequences``: samples end to
end, their boundaries merged). Each sample holds documents of random lengths 1–13, the first of length 1
(``case['thd']`` seeds them; ``case['lengths']`` gives them instead); with ``case['padded']`` each document
is followed by 0–2 padding tokens (loss_mask 0) and the batch carries ``cu_seqlens`` (real lengths,
Transformer Engine's convention) and ``cu_seqlens_padded`` (stream positions).
"""

from __future__ import annotations

import megatron.core.utils as megatron_utils
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_patch import megatron_lm, shard_batch
from megatron_patch.documents import boundaries


def documents(case: dict, rows: slice) -> list[list[tuple[int, int]]]:
    """Per sample (rows of the whole batch), its documents as (real length, padded length), filling case['seq']."""
    g = torch.Generator().manual_seed(case["thd"])
    fixed = case.get("lengths")
    out = []
    for _ in range(64):
        docs, used = [], 0
        while used < case["seq"]:
            n = len(docs)
            length = fixed[n % len(fixed)] if fixed else 1 if n == 0 else int(torch.randint(1, 14, (1,), generator=g))
            pad = int(torch.randint(0, 3, (1,), generator=g)) if case.get("padded") else 0
            length = min(length, case["seq"] - used)
            pad = min(pad, case["seq"] - used - length)
            docs.append((length, length + pad))
            used += length + pad
        out.append(docs)
    return out[rows]


def stream(case: dict, part: dict, rows: slice) -> dict:
    """``part`` packed as one THD stream: [1, T] tensors, cu_seqlens (, cu_seqlens_padded), max_seqlen."""
    docs = [d for sample in documents(case, rows) for d in sample]
    real, padded = [0], [0]
    for length, size in docs:
        real.append(real[-1] + length)
        padded.append(padded[-1] + size)
    batch = {key: part[key].reshape(1, -1) for key in ("tokens", "labels", "loss_mask")}
    batch["loss_mask"] = batch["loss_mask"].clone()
    for (length, size), start in zip(docs, padded):
        batch["loss_mask"][0, start + length:start + size] = 0  # padding is not trained on
    batch["position_ids"] = torch.cat([torch.arange(size) for _, size in docs])[None]  # reset per document
    batch["cu_seqlens"] = torch.tensor(real, dtype=torch.int32)
    batch["cu_seqlens_padded"] = torch.tensor(padded, dtype=torch.int32) if case.get("padded") else None
    batch["max_seqlen"] = torch.tensor([max(size for _, size in docs)], dtype=torch.int32)
    return batch


def packed_params(batch: dict) -> PackedSeqParams:
    """PackedSeqParams of a THD batch, as Megatron-LM's forward_step builds it (the boundaries whole)."""
    cu, padded = batch["cu_seqlens"], batch.get("cu_seqlens_padded")
    longest = int(batch["max_seqlen"].max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=padded,
                           cu_seqlens_kv_padded=padded, max_seqlen_q=longest, max_seqlen_kv=longest)


def reference_mask(params: PackedSeqParams, tokens: int) -> torch.Tensor:
    """[1, 1, t, t] bool, True where query and key are not in one document; a document's padding is a document
    of its own (so the reference's real tokens provably never see it)."""
    real = boundaries(params.cu_seqlens_q)
    padded = boundaries(params.cu_seqlens_q_padded) if params.cu_seqlens_q_padded is not None else real
    ids = torch.empty(tokens, dtype=torch.long)
    for i, (start, stop) in enumerate(zip(padded, padded[1:])):
        length = real[i + 1] - real[i]
        ids[start:start + length] = 2 * i
        ids[start + length:stop] = 2 * i + 1
    return (ids[:, None] != ids[None, :])[None, None]


def _main_split(batch, is_hybrid_cp, cp_group=None, hybrid_cp_group_func=None, use_per_sequence_balancing=False):
    """Megatron-LM main's get_batch_on_this_cp_rank signature; its body must not run under --ring-attention."""
    raise AssertionError("Megatron's own split ran on a THD batch under --ring-attention")


def _core_013_split(batch):
    """Megatron-core 0.13–0.15's get_batch_on_this_cp_rank signature (no group: parallel_state's)."""
    raise AssertionError("Megatron's own split ran on a THD batch under --ring-attention")


def split(case: dict, batch: dict, cp_group) -> dict:
    """This rank's share of THD ``batch`` with its PackedSeqParams, by the split ``case['split']`` names:
    None: ``shard_batch`` (Megatron-core users); after ``apply()``: ``core`` (megatron.core.utils'
    get_batch_on_this_cp_rank, installed 0.16.1 signature), ``thd_016`` (its get_thd_batch_on_this_cp_rank,
    cu_seqlens as Megatron-LM 0.16 passes them, [1, n]), ``main`` / ``core_013`` (those signatures' stand-ins,
    wrapped as apply() wraps them)."""
    how = case.get("split")
    if how is None:
        local = shard_batch(batch, case.get("data_layout", case["layout"]), cp_group)
    elif how == "core":
        local = megatron_utils.get_batch_on_this_cp_rank(dict(batch), cp_group=cp_group)
    elif how == "thd_016":
        body = {key: batch[key] for key in ("tokens", "labels", "loss_mask", "position_ids")}
        body["attention_mask"] = None
        local, params = megatron_utils.get_thd_batch_on_this_cp_rank(
            body, batch["cu_seqlens"][None], batch["cu_seqlens_padded"], batch["max_seqlen"])
        return dict(local, packed_seq_params=params)
    elif how == "main":
        local = megatron_lm._wrap_batch_split(_main_split)(dict(batch), is_hybrid_cp=False, cp_group=cp_group,
                                                           use_per_sequence_balancing=True)
    elif how == "core_013":
        local = megatron_lm._wrap_batch_split(_core_013_split)(dict(batch))
    else:
        raise AssertionError(how)
    return dict(local, packed_seq_params=packed_params(local))
