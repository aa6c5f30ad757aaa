"""Megatron-core's GPT cut into DeepSpeed pipeline layers, one ``TransformerBlock`` per stage.

The layers (``deepspeed.pipe.LayerSpec``; each rank builds only its stage's):

    Embedding | Decoder(stage 0) | Decoder(stage 1) | ... | Decoder(stage P-1) | Head

``Embedding`` (on the first stage) is Megatron's ``LanguageModelEmbedding``; ``Decoder(s)`` is
Megatron's ``TransformerBlock`` with the config's ``pipeline_model_parallel_size`` = P, so it
builds exactly Megatron's layers of stage s (their global layer numbers, activation recompute
within the stage, the final norm on the last stage) and computes RoPE for its layers; ``Head`` is
the output layer, or, with tied embeddings, the first stage's word embedding again
(``TiedLayerSpec``: DeepSpeed copies it from the first stage and sums its gradients over both).
Together they compute what ``GPTModel.forward`` does, so a run at P = 1 (the ``GPTModel`` itself)
and at P > 1 give the same losses.

Between stages travel ``(hidden [s, b, h], document mask)``; the document mask (packed sequences,
``megatron_patch.documents``) is padded to a fixed width ``seq + 1`` because DeepSpeed sends the
shapes of the first micro batch once. The first stage reads ``(tokens, position_ids[, documents])``
and the last stage's loss ``(labels, loss_mask)``, each this rank's ring shard.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from launch.model import layer_spec, rope_layout, transformer_config


def _as_tuple(inputs) -> tuple:
    return inputs if isinstance(inputs, tuple) else (inputs,)


class Embedding(nn.Module):
    """Megatron's ``LanguageModelEmbedding``: (tokens, position_ids, *rest) → (hidden [s, b, h], *rest).

    ``tied``: also the output projection by the word embedding (``logits``), for the last stage."""

    def __init__(self, config, vocab_size: int, max_sequence_length: int, position_embedding_type: str,
                 tied: bool = False):
        from megatron.core import tensor_parallel
        from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding

        super().__init__()
        self.embedding = LanguageModelEmbedding(config=config, vocab_size=vocab_size,
                                                max_sequence_length=max_sequence_length,
                                                position_embedding_type=position_embedding_type)
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, vocab_size, config=config, init_method=config.init_method, bias=False,
            skip_bias_add=False, gather_output=False, skip_weight_param_allocation=True) if tied else None

    def forward(self, inputs) -> tuple:
        tokens, positions, *rest = inputs
        return (self.embedding(input_ids=tokens, position_ids=positions), *rest)

    def logits(self, inputs) -> Tensor:
        """(hidden [s, b, h], ...) → logits [s, b, vocab / tensor] by the word embedding."""
        logits, _ = self.output_layer(_as_tuple(inputs)[0], weight=self.embedding.word_embeddings.weight)
        return logits


class Decoder(nn.Module):
    """Stage ``stage``'s transformer layers (Megatron's ``TransformerBlock``) and their RoPE table."""

    def __init__(self, config, spec, stage: int, stages: int, position_embedding_type: str, layout: str):
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
        from megatron.core.parallel_state import get_pipeline_model_parallel_rank
        from megatron.core.transformer.transformer_block import TransformerBlock

        from megatron_patch import LayoutRotaryEmbedding

        super().__init__()
        if get_pipeline_model_parallel_rank() != stage:
            raise RuntimeError(f"Decoder({stage}) built on pipeline stage {get_pipeline_model_parallel_rank()}")
        self.config = config
        self.decoder = TransformerBlock(config=config, spec=spec, pre_process=True, post_process=stage == stages - 1)
        self.rotary_pos_emb = None
        if position_embedding_type == "rope":  # as GPTModel builds it
            self.rotary_pos_emb = LayoutRotaryEmbedding.convert(
                RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0,
                                rotary_interleaved=config.rotary_interleaved,
                                use_cpu_initialization=config.use_cpu_initialization), layout)

    def forward(self, inputs) -> tuple:
        hidden, *rest = _as_tuple(inputs)
        mask = rest[0].cpu() if rest else None  # a document mask: read on the host by every layer
        rope = None
        if self.rotary_pos_emb is not None:
            rope = self.rotary_pos_emb(self.rotary_pos_emb.get_rotary_seq_len(None, self.decoder, hidden,
                                                                              self.config, None))
        return (self.decoder(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rope), *rest)


class Head(nn.Module):
    """The output layer (untied): (hidden [s, b, h], ...) → logits [s, b, vocab / tensor]."""

    def __init__(self, config, vocab_size: int):
        from megatron.core import tensor_parallel

        super().__init__()
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, vocab_size, config=config, init_method=config.init_method, bias=False,
            skip_bias_add=False, gather_output=False)

    def forward(self, inputs) -> Tensor:
        logits, _ = self.output_layer(_as_tuple(inputs)[0])
        return logits


def token_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross entropy over the tensor-parallel vocabulary, as GPTModel's: logits [s, b, v/tp], labels [b, s] → [b, s]."""
    from megatron.core import tensor_parallel

    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous()).transpose(0, 1)


def layers(args, vocab_size: int) -> list:
    """The pipeline's LayerSpecs for the job's flags (``--pipeline-model-parallel-size`` stages)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    config = transformer_config(args)
    spec = layer_spec(args, config)
    stages = args.pipeline_model_parallel_size
    embedding = (config, vocab_size, args.max_position_embeddings)
    tied = args.tie_embeddings_and_output_weights
    weight = ["embedding.word_embeddings.weight"]
    first = (TiedLayerSpec("embedding", Embedding, *embedding, args.position_embedding_type, tied=True,
                           tied_weight_attr=weight) if tied
             else LayerSpec(Embedding, *embedding, args.position_embedding_type))
    decoders = [LayerSpec(Decoder, config, spec, s, stages, args.position_embedding_type, rope_layout(args))
                for s in range(stages)]
    # the last stage's copy needs only the word embedding: no learned positions to leave untrained there
    head = (TiedLayerSpec("embedding", Embedding, *embedding, "none", tied=True, forward_fn=Embedding.logits,
                          tied_weight_attr=weight) if tied else LayerSpec(Head, config, vocab_size))
    return [first, *decoders, head]


def pad_documents(mask: Tensor, seq_length: int) -> Tensor:
    """A document mask (b, 1, 1, n) padded to the fixed width seq_length + 1 (repeating its end)."""
    return torch.nn.functional.pad(mask, (0, seq_length + 1 - mask.shape[-1]), value=seq_length)
