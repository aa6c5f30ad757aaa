"""Jobs for the gloo pool: Megatron-core GPT models with ring attention against the same model
without ring attention, on one rank, over the whole sequence.

Every job initialises megatron's ``parallel_state`` itself and destroys it in a ``finally``.
The reference model is Megatron's GPTModel with the local layer spec and ``DenseCoreAttention``
below (plain softmax attention, GQA by ``repeat_interleave``, Megatron's causal / window rule),
because Megatron's own ``DotProductAttention`` needs CUDA.
"""

from __future__ import annotations

import argparse
import math
from contextlib import contextmanager, nullcontext

import megatron.core.utils as megatron_utils
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel, gpt_layer_specs, gpt_model
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from torch.distributed import distributed_c10d as c10d

from megatron_patch import (
    LayoutRotaryEmbedding,
    RingOptions,
    add_ring_attention_args,
    get_gpt_layer_ring_spec,
    megatron_lm,
    packed_rope,
    reset_position_ids,
    ring_gpt_model,
    shard_batch,
)
from ring_sp.documents import document_ids
from tests import thd_batches
from tests.te_stand_ins import te_stand_ins

VOCAB = 64


class DenseCoreAttention(MegatronModule):
    """The non-ring reference: softmax attention over the whole (unsharded) sequence."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type="self", attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, model_comm_pgs=None):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.scale = softmax_scale
        self.window = (config.window_size if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number) else None)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:  # THD [t, heads, d]: one stream, attention inside its documents
            mask = thd_batches.reference_mask(packed_seq_params, query.shape[0])
            return self.forward(query[:, None], key[:, None], value[:, None], mask)[:, 0]
        sq, b, h, d = query.shape
        group = h // key.shape[2]
        k = key.repeat_interleave(group, dim=2)
        v = value.repeat_interleave(group, dim=2)
        scale = self.scale if self.scale is not None else 1 / math.sqrt(d)
        scores = torch.einsum("ibhd,jbhd->bhij", query, k) * scale
        i = torch.arange(sq)[:, None]
        j = torch.arange(key.shape[0])[None, :]
        masked = j > i  # causal
        if self.window is not None:
            masked |= (j < i - self.window[0]) | (j > i + self.window[1])
        masked = masked[None, None]
        if attention_mask is not None:
            masked = masked | attention_mask
        probs = torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1)
        out = torch.einsum("bhij,jbhd->ibhd", probs, v)
        return out.reshape(sq, b, h * d)


@contextmanager
def megatron_parallel(tp: int, cp: int):
    """Megatron's parallel state for one job; afterwards its process groups are destroyed too
    (``destroy_model_parallel`` only forgets them: each gloo group keeps its threads alive, and
    the pool's workers live for the whole session)."""
    before = set(c10d._world.pg_map)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        for group in [g for g in c10d._world.pg_map if g not in before]:
            dist.destroy_process_group(group)


def make_config(tp: int, cp: int, *, heads: int = 4, groups: int | None = None, window=None,
                hidden: int = 32, layers: int = 2, dropout: float = 0.0, std: float = 0.02,
                skip_freq: int | None = None) -> TransformerConfig:
    return TransformerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
        ffn_hidden_size=2 * hidden, tensor_model_parallel_size=tp, context_parallel_size=cp,
        use_cpu_initialization=True, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, attention_dropout=dropout,
        hidden_dropout=0.0, window_size=window, params_dtype=torch.float32, init_method_std=std,
        window_attn_skip_freq=skip_freq,
    )


def layer_spec(kind: str = "local"):
    """The layer spec a Megatron-LM builder hands GPTModel: ``local``; ``te`` (Transformer Engine's spec,
    with stand-ins); ``override``: local, then the core attention set to Megatron's DotProductAttention,
    as Megatron-LM 0.19's GPTModelBuilder does for ``--attention-backend local``."""
    if kind == "te":
        with te_stand_ins():
            return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    spec = gpt_layer_specs.get_gpt_layer_local_spec()  # looked up on the module, as the scripts do
    if kind == "override":
        spec.submodules.self_attention.submodules.core_attention = DotProductAttention
    return spec


def reference_model(config: TransformerConfig, seq: int, position: str, spec_kind: str = "local") -> GPTModel:
    spec = layer_spec(spec_kind)
    spec.submodules.self_attention.submodules.core_attention = DenseCoreAttention
    model = GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=seq, position_embedding_type=position)
    if position == "rope":  # Megatron's RotaryEmbedding moves its table to CUDA; this one (cp = 1) does not
        LayoutRotaryEmbedding.convert(model.rotary_pos_emb, "zigzag")
    return model


def make_batches(steps: int, replicas: int, micro: int, seq: int, seed: int) -> list[dict]:
    """One batch per step for all data-parallel replicas: [replicas * micro, seq] tensors.

    The same batch every step (a model memorising it has a loss curve that moves)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(1):
        n = replicas * micro
        tokens = torch.randint(0, VOCAB, (n, seq), generator=g)
        batches.append({
            "tokens": tokens,
            "labels": torch.randint(0, VOCAB, (n, seq), generator=g),
            "loss_mask": (torch.rand(n, seq, generator=g) < 0.8).float(),
            "position_ids": torch.arange(seq).expand(n, seq).contiguous(),
        })
    return batches * steps


def _documents(case: dict, rows: slice) -> list[list[int]] | None:
    """Per sample of the batch (rows of it), document boundaries with random lengths 1–11 (case['documents']
    seeds them), or None."""
    if case.get("documents") is None:
        return None
    g = torch.Generator().manual_seed(case["documents"])
    out = []
    for _ in range(64):
        bounds = [0]
        while bounds[-1] < case["seq"]:
            bounds.append(min(case["seq"], bounds[-1] + int(torch.randint(1, 12, (1,), generator=g))))
        out.append(bounds)
    return out[rows]


def _with_documents(case: dict, part: dict, docs) -> dict:
    """Position ids restart in every document (--reset-position-ids), as the data would give them."""
    return part if docs is None else dict(part, position_ids=reset_position_ids(docs, case["seq"]))


def _cross_document_mask(docs: list[list[int]], seq: int) -> torch.Tensor:
    """[n, 1, seq, seq] bool, True where query and key lie in different documents (the reference's mask)."""
    ids = torch.stack([document_ids(b, torch.arange(seq)) for b in docs])
    return (ids[:, :, None] != ids[:, None, :])[:, None]


def _causal_mask(n: int, seq: int) -> torch.Tensor:
    """Megatron's dataloader mask: [n, 1, seq, seq] bool, True = masked out."""
    return torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1).expand(n, 1, seq, seq).contiguous()


def _masked_sum(model, batch):
    """Σ loss · loss_mask over this rank's tokens, and the number of tokens counted."""
    packed = {"packed_seq_params": batch["packed_seq_params"]} if batch.get("packed_seq_params") else {}
    losses = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"],
                   **packed)
    return (losses * batch["loss_mask"]).sum(), batch["loss_mask"].sum()


def run_reference(case: dict, replicas: int) -> dict:
    """Single-rank model over whole sequences: loss per step (mean over replicas of each replica's
    token-mean loss, as Megatron's data-parallel averaging does) and the first step's gradients."""
    torch.manual_seed(case.get("seed", 0))
    window = case.get("window") or ((case["lookback"] - 1, 0) if case.get("lookback") else None)
    config = make_config(1, 1, heads=case["heads"], groups=case.get("groups"), window=window, std=case.get("std", 0.02),
                         skip_freq=case.get("skip_freq"))
    model = reference_model(config, case["seq"], case["position"], case.get("spec", "local"))
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=case.get("lr", 1e-2))
    micro = case["micro"]
    losses, grads = [], None
    for batch in make_batches(case.get("steps", 1), replicas, micro, case["seq"], case.get("data_seed", 1)):
        optimizer.zero_grad()
        total = 0.0
        for d in range(replicas):
            part = {k: v[d * micro:(d + 1) * micro] for k, v in batch.items()}
            if case.get("mask", False):
                part["attention_mask"] = _causal_mask(micro, case["seq"])
            docs = _documents(case, slice(d * micro, (d + 1) * micro))
            if docs is not None:
                part = dict(_with_documents(case, part, docs), attention_mask=_cross_document_mask(docs, case["seq"]))
            if case.get("thd") is not None:  # the same THD stream, whole, Megatron's own RoPE at cp = 1
                part = thd_batches.stream(case, part, slice(d * micro, (d + 1) * micro))
                part["packed_seq_params"] = thd_batches.packed_params(part)
            s, n = _masked_sum(model, part)
            total = total + s / n / replicas
        total.backward()
        losses.append(total.item())
        if grads is None:
            grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        optimizer.step()
    return {"state": state, "losses": losses, "grads": grads}


def _load_sharded(model, state: dict) -> None:
    """Copy full (tensor-parallel 1) weights into a tensor-parallel model: each rank takes its slice."""
    tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = state[name]
            if getattr(p, "tensor_model_parallel", False) and tp > 1:
                full = full.chunk(tp, dim=p.partition_dim)[tp_rank]
            assert full.shape == p.shape, (name, full.shape, p.shape)
            p.copy_(full)


def _reference_slice(p, full):
    tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    if getattr(p, "tensor_model_parallel", False) and tp > 1:
        return full.chunk(tp, dim=p.partition_dim)[tp_rank]
    return full


def _ring_model(case: dict, config: TransformerConfig, options: RingOptions):
    if case.get("build") == "apply":  # as Megatron-LM's pretrain_gpt.py builds it after megatron_patch.apply()
        spec = layer_spec(case.get("spec", "local"))
        return gpt_model.GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=case["seq"],
                                  position_embedding_type=case["position"])
    model = ring_gpt_model(config, vocab_size=VOCAB, max_sequence_length=case["seq"], options=options,
                           position_embedding_type=case["position"])
    if case.get("rope_layout"):  # negative control: RoPE positions of another layout
        model.rotary_pos_emb.layout = case["rope_layout"]
    return model


def _shard(case: dict, part: dict, rows: slice, cp_group) -> dict:
    if case.get("thd") is not None:
        return thd_batches.split(case, thd_batches.stream(case, part, rows), cp_group)
    if case.get("build") == "apply":
        return megatron_utils.get_batch_on_this_cp_rank(dict(part), cp_group=cp_group)
    docs = _documents(case, rows)
    ring_docs = None if case.get("hide_documents") else docs  # negative control: the ring is not told
    return shard_batch(_with_documents(case, part, docs), case.get("data_layout", case["layout"]), cp_group,
                       documents=ring_docs)


def run_ring(case: dict, reference: dict, tp: int, cp: int) -> dict:
    """The ring model on this rank's shard; returns per-step loss errors and the first step's grad errors."""
    options = RingOptions(layout=case["layout"], max_lookback=case.get("lookback"))
    config = make_config(tp, cp, heads=case["heads"], groups=case.get("groups"), window=case.get("window"),
                         std=case.get("std", 0.02), skip_freq=case.get("skip_freq"))
    if case.get("liger_rope"):
        from megatron_patch.liger import rope_calls, use_liger_rope

        use_liger_rope(config)
        calls = rope_calls()
    model = _ring_model(case, config, options)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "RingCoreAttention" in kinds and "DenseCoreAttention" not in kinds, kinds
    if case["position"] == "rope":
        assert type(model.rotary_pos_emb).__name__ == "LayoutRotaryEmbedding"
    _load_sharded(model, reference["state"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=case.get("lr", 1e-2))
    cp_group = parallel_state.get_context_parallel_group()
    dp_group = parallel_state.get_data_parallel_group()
    dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    replicas, dp_rank = dist.get_world_size(dp_group), dist.get_rank(dp_group)
    micro = case["micro"]
    loss_errors, grad_errors = [], {}
    batches = make_batches(case.get("steps", 1), replicas, micro, case["seq"], case.get("data_seed", 1))
    for step, batch in enumerate(batches):
        part = {k: v[dp_rank * micro:(dp_rank + 1) * micro] for k, v in batch.items()}
        if case.get("mask", False):
            part["attention_mask"] = _causal_mask(micro, case["seq"])
        local = _shard(case, part, slice(dp_rank * micro, (dp_rank + 1) * micro), cp_group)
        optimizer.zero_grad()
        with _megatron_thd_rope(config) if case.get("rope_fix") is False else nullcontext():
            s, n = _masked_sum(model, local)
        n_total = n.detach().clone()
        dist.all_reduce(n_total, group=cp_group)
        (s * cp / n_total).backward()  # Megatron's loss scaling: the DP×CP average below undoes the ×cp
        for p in model.parameters():
            dist.all_reduce(p.grad, group=dp_cp_group)
            p.grad /= dist.get_world_size(dp_cp_group)
        loss = s.detach().clone()
        dist.all_reduce(loss, group=cp_group)
        loss = loss / n_total / replicas
        dist.all_reduce(loss, group=dp_group)
        ref = reference["losses"][step]
        loss_errors.append(abs(loss.item() - ref) / abs(ref))
        if step == 0:
            for name, p in model.named_parameters():
                expected = _reference_slice(p, reference["grads"][name])
                grad_errors[name] = ((p.grad - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
        optimizer.step()
    if case.get("liger_rope"):
        assert rope_calls() - calls == 2 * 2 * len(batches), rope_calls() - calls  # q and k, two layers, every step
    return {"loss_errors": loss_errors, "grad_errors": grad_errors, "losses": reference["losses"]}


@contextmanager
def _megatron_thd_rope(config):
    """Negative control: the ring model's THD tokens rotated by Megatron's own apply_rotary_pos_emb (per-document
    zigzag chunks, Transformer Engine's split), as if megatron_patch.packed_rope were off."""
    ring = packed_rope._RINGS.pop(id(config))
    try:
        yield
    finally:
        packed_rope._RINGS[id(config)] = ring


def compare_with_reference(tp: int, cp: int, cases: list[dict]) -> list[dict]:
    """For each case: the reference on every rank (tp = cp = 1), then the ring model with tp × cp."""
    replicas = dist.get_world_size() // (tp * cp)
    out = []
    for case in cases:
        with megatron_parallel(1, 1):
            reference = run_reference(case, replicas)
        with megatron_parallel(tp, cp):
            out.append(run_ring(case, reference, tp, cp))
    return out


def apply_matches_reference(tp: int, cp: int, cases: list[dict], argv: list[str]) -> list[dict]:
    """``compare_with_reference`` for a model and batch split made by Megatron-core's own functions
    (looked up on their modules, as Megatron-LM's script does) after ``megatron_patch.apply()`` and
    the flags ``argv`` parsed and configured."""
    parser = add_ring_attention_args(argparse.ArgumentParser())
    args = parser.parse_args(argv)
    args.context_parallel_size = cp
    try:
        megatron_lm.apply()
        megatron_lm.configure(args)
        return compare_with_reference(tp, cp, [dict(case, build="apply") for case in cases])
    finally:
        megatron_lm.restore()


def _usable(group=None) -> None:
    """The process group still works (every rank made the same collectives)."""
    t = torch.ones(1)
    dist.all_reduce(t, group=group)
    assert t.item() == dist.get_world_size(group)


def error_text(provoke, error: type[BaseException] = ValueError) -> str:
    """Run ``provoke(cp_group)`` on tensor-parallel 1 × ring 2 (× data-parallel replicas): the text of the
    ``error`` it raises, or "no error"; afterwards Megatron-LM's functions are restored and the ring is
    checked to be usable (no rank left waiting in a collective)."""
    try:
        with megatron_parallel(1, 2):
            try:
                provoke(parallel_state.get_context_parallel_group())
            except error as raised:
                _usable()
                return str(raised)
            return "no error"
    finally:
        megatron_lm.restore()
        _usable()


def bad_input(kind: str) -> str:
    """Provoke one kind of bad input on a tensor-parallel 1 × ring 2 model; returns the error text."""
    rank = dist.get_rank()
    return error_text(lambda cp_group: _provoke(kind, rank, cp_group))


def _provoke(kind: str, rank: int, cp_group) -> None:
    options = RingOptions()
    if kind == "shard_batch":
        shard_batch({"tokens": torch.zeros(2, 10, dtype=torch.long)}, "zigzag", cp_group)
    elif kind == "context_parallel_size":  # config says cp = 1, the group has 2 ranks
        ring_gpt_model(make_config(1, 1), vocab_size=VOCAB, max_sequence_length=16, options=options)
    elif kind == "dropout":
        ring_gpt_model(make_config(1, 2, dropout=0.1), vocab_size=VOCAB, max_sequence_length=16, options=options)
    elif kind == "ring_size":
        ring_gpt_model(make_config(1, 2), vocab_size=VOCAB, max_sequence_length=16, options=RingOptions(ring_size=1))
    elif kind == "yarn_striped":
        ring_gpt_model(make_config(1, 2), vocab_size=VOCAB, max_sequence_length=16,
                       options=RingOptions(layout="striped"), position_embedding_type="yarn")
    else:
        _provoke_forward(kind, rank)


def _provoke_forward(kind: str, rank: int) -> None:
    model = ring_gpt_model(make_config(1, 2), vocab_size=VOCAB, max_sequence_length=32, options=RingOptions(),
                           position_embedding_type="learned_absolute")
    local = 8
    tokens = torch.zeros(1, local, dtype=torch.long)
    positions = torch.arange(local)[None]
    mask = None
    if kind == "odd_local_seq":  # zigzag needs an even local length; the model itself is handed 7 tokens
        tokens, positions = tokens[:, :7], positions[:, :7]
    elif kind == "document_mask":  # two documents of 8 tokens: the second may not see the first
        full = torch.triu(torch.ones(16, 16, dtype=torch.bool), 1)
        full[8:, :8] = True
        mask = shard_batch({"attention_mask": full[None, None]}, "zigzag")["attention_mask"]
    elif kind == "bad_mask_one_rank":  # rank 1 alone gets a wrong mask: both ranks must raise
        full = torch.triu(torch.ones(16, 16, dtype=torch.bool), 1)
        if rank == 1:
            full[:, 0] = True
        mask = shard_batch({"attention_mask": full[None, None]}, "zigzag")["attention_mask"]
    elif kind == "local_mask":  # a [local, local] mask is ambiguous
        mask = torch.zeros(1, 1, local, local, dtype=torch.bool)
    elif kind == "packed":
        attention = model.decoder.layers[0].self_attention.core_attention
        q = torch.zeros(local, 1, 4, 8)
        attention(q, q, q, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
        return
    else:
        raise AssertionError(kind)
    model(tokens, positions, mask)


def zigzag_is_megatrons(cp: int) -> list[bool]:
    """shard_batch(..., "zigzag") and the zigzag RoPE table against Megatron's get_batch_on_this_cp_rank."""
    with megatron_parallel(1, cp):
        group = parallel_state.get_context_parallel_group()
        seq = 8 * cp
        g = torch.Generator().manual_seed(0)
        batch = {"tokens": torch.randint(0, VOCAB, (2, seq), generator=g),
                 "loss_mask": torch.rand(2, seq, generator=g),
                 "position_ids": torch.arange(seq).expand(2, seq).contiguous(),
                 "attention_mask": torch.rand(2, 1, seq, seq, generator=g) < 0.5}
        ours = shard_batch(batch, "zigzag", group)
        theirs = megatron_utils.get_batch_on_this_cp_rank(dict(batch), cp_group=group)
        checks = [torch.equal(ours[k], theirs[k]) for k in batch]
        config = make_config(1, cp)
        rope = LayoutRotaryEmbedding.convert(RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0,
                                                             use_cpu_initialization=True, cp_group=group), "zigzag")
        table = rope.get_freqs_non_repeated(seq)  # Megatron's whole table, [seq, dim / 2]
        split = megatron_utils.get_batch_on_this_cp_rank({"t": table[None]}, cp_group=group)["t"][0]
        checks.append(torch.equal(rope(seq)[:, 0, 0, : table.shape[1]], split))
        return checks


def thd_matches_document_mask() -> tuple[float, float]:
    """One rank (tp = cp = 1): the ring GPT fed a THD packed batch (packed_seq_params, Megatron's per-document
    RoPE) gives the logits of the same batch fed with a document mask (RoPE over the whole sequence: inside a
    document the two differ by a constant offset, which RoPE does not see). Returns the max relative difference,
    and that of the batch without documents (the control)."""
    from megatron_patch import document_mask

    with megatron_parallel(1, 1):
        torch.manual_seed(0)
        seq, bounds = 32, [0, 5, 6, 19, 32]
        model = ring_gpt_model(make_config(1, 1, groups=2, std=0.1), vocab_size=VOCAB, max_sequence_length=seq,
                               options=RingOptions(layout="contiguous"), position_embedding_type="rope")
        tokens = torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(1))
        positions = torch.arange(seq)[None]
        masked = model(tokens, positions, document_mask([bounds], 1, seq))
        cu = torch.tensor(bounds, dtype=torch.int32)
        packed = model(tokens, positions, None, packed_seq_params=PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=13, max_seqlen_kv=13))
        plain = model(tokens, positions, None)
        return tuple(((masked - x).abs().max() / masked.abs().max()).item() for x in (packed, plain))


def agreement_exchanges_per_forward() -> int:
    """Ring 2, a 3-layer model: how many agreement all_gathers one forward makes (only the first layer's)."""
    import ring_sp.attention as attention

    calls = []
    original = attention.gather_signatures

    def counting(group, signature):
        calls.append(signature)
        return original(group, signature)

    with megatron_parallel(1, 2):
        model = ring_gpt_model(make_config(1, 2, layers=3), vocab_size=VOCAB, max_sequence_length=16,
                               options=RingOptions(), position_embedding_type="rope")
        tokens = torch.zeros(1, 8, dtype=torch.long)
        attention.gather_signatures = counting
        try:
            model(tokens, torch.arange(8)[None], None)
        finally:
            attention.gather_signatures = original
    return len(calls)


def thd_bad_input(kind: str) -> str:
    """Provoke one kind of bad THD input on tensor-parallel 1 × ring 2 (× data-parallel replicas); the error text."""
    return error_text(lambda cp_group: _provoke_thd(kind, dist.get_rank(cp_group), cp_group))


def _provoke_thd(kind: str, cp_rank: int, cp_group) -> None:
    case = {"layout": "zigzag", "seq": 16, "thd": 3}
    part = make_batches(1, 1, 2, 16, seed=1)[0]
    batch = thd_batches.stream(case, part, slice(0, 2))
    position = "learned_absolute" if kind in ("thd_ranks_disagree_no_rope", "thd_without_options") else "rope"
    if kind == "thd_stream_length":  # T = 18 cannot be cut into 2 × 2 zigzag chunks
        batch = thd_batches.stream(dict(case, seq=9), make_batches(1, 1, 2, 9, seed=1)[0], slice(0, 2))
    elif kind == "thd_not_flat":  # the micro-batch not flattened into one stream
        batch = dict(batch, **{key: part[key] for key in ("tokens", "labels", "loss_mask", "position_ids")})
    elif kind.startswith("thd_ranks_disagree") and cp_rank == 1:  # rank 1 gets other boundaries
        batch["cu_seqlens"] = torch.tensor([0, 3, 32], dtype=torch.int32)
        batch["max_seqlen"] = torch.tensor([29], dtype=torch.int32)
    elif kind == "thd_short_table":  # max_seqlen below the longest document: the rotary table is too short
        batch["max_seqlen"] = batch["max_seqlen"] - 1
    elif kind == "thd_hybrid":  # Megatron-LM main's split asked for hybrid context parallelism
        megatron_lm.apply()
        args = add_ring_attention_args(argparse.ArgumentParser()).parse_args(["--ring-attention"])
        args.context_parallel_size = 2
        megatron_lm.configure(args)
        megatron_lm._wrap_batch_split(thd_batches._main_split)(batch, True, cp_group=cp_group)
    if kind == "thd_without_options":  # the ring spec without RingOptions: accepted only as Megatron's own zigzag
        model = GPTModel(make_config(1, 2), get_gpt_layer_ring_spec(None), vocab_size=VOCAB, max_sequence_length=32,
                         position_embedding_type=position)
    else:
        model = ring_gpt_model(make_config(1, 2), vocab_size=VOCAB, max_sequence_length=32,
                               options=RingOptions(layout=case["layout"]), position_embedding_type=position)
    local = thd_batches.split(case, batch, cp_group)
    _masked_sum(model, local)
