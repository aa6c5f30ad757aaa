"""The core attention that Megatron-core's ``SelfAttention`` builds from a layer spec: ring attention
over the context-parallel group.

Megatron hands it q ``[sq, b, heads_per_tp, d]`` and k/v ``[sk, b, groups_per_tp, d]`` (RoPE already
applied, GQA not expanded) for this rank's share of the sequence, and expects
``[sq, b, heads_per_tp * d]`` back. K/V travel the ring with their own head count.
"""

from __future__ import annotations

import weakref
from dataclasses import replace

import torch
import torch.distributed as dist
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from megatron_patch import defaults, packed, packed_rope
from megatron_patch.documents import boundaries, documents_of, is_document_mask, read_once
from megatron_patch.groups import context_parallel_group
from megatron_patch.options import RingOptions, check_ring_size, lookback_from_window
from ring_sp import attention_kernel, document_plan, local_positions, ring_attention
from ring_sp.options import FLAGS

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)
_FULL = (AttnMaskType.no_mask, AttnMaskType.padding)


def _window_applies(config, layer_number: int) -> bool:
    try:
        from megatron.core.transformer.utils import is_layer_window_attention
    except ImportError:  # older megatron-core: every layer is a window layer
        return bool(config.window_size)
    return is_layer_window_attention(config.window_size, getattr(config, "window_attn_skip_freq", None),
                                     layer_number)


# (id(mask), version, ...) -> (weakref to the attention_mask, causal): the check of a batch's mask, made once by
# the first ring layer (with a collective and a host read of the comparison) and reused by the later layers
_MASKS: dict[tuple, tuple] = {}
# id(config) -> (weakref to the TransformerConfig, the smallest layer_number built with it)
_FIRST_LAYER: dict[int, tuple] = {}


def _note_layer(config, layer_number: int) -> None:
    """Remember the first ring layer of the model that ``config`` builds (its layers share one config)."""
    seen = _FIRST_LAYER.get(id(config))
    if seen is not None and seen[0]() is config:
        layer_number = min(layer_number, seen[1])
    _FIRST_LAYER[id(config)] = (weakref.ref(config), layer_number)


def _is_first_layer(config, layer_number: int) -> bool:
    seen = _FIRST_LAYER.get(id(config))
    return seen is None or seen[0]() is not config or seen[1] == layer_number


def keep_out_of_recompute(attention) -> None:
    """Never checkpoint ``attention``'s core attention when it is the ring's.

    Megatron's selective recompute of core attention (recompute_modules "core_attn", Megatron-LM's
    --recompute-activations) keeps q, k, v and runs core attention again in backward. Ring attention
    keeps only q, k, v, its output and lse anyway, so that frees nothing and would pass K/V around the
    ring a second time."""
    if isinstance(getattr(attention, "core_attention", None), RingCoreAttention):
        attention.checkpoint_core_attention = False


class RingCoreAttention(MegatronModule):
    """Exact attention of this rank's queries over its context-parallel ring's whole sequence.

    Built by ``SelfAttention`` with the keywords each megatron-core version passes (0.13–0.16);
    ``options`` comes from the layer spec (``get_gpt_layer_ring_spec``) or, when None, from
    ``megatron_patch.apply()``'s parsed ``--ring-*`` flags or the defaults.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, model_comm_pgs=None,
                 options: RingOptions | None = None):
        super().__init__(config=config)
        self.options = options if options is not None else defaults.current_options()
        self.options.check(FLAGS)
        if options is None and not self.options.megatron_native and not defaults.applied():
            raise ValueError(f"--ring-layout {self.options.layout} needs megatron_patch.apply() before the model and "
                             "data are set up, so that the data split and RoPE follow the layout (run "
                             "`python -m megatron_patch pretrain_gpt.py ...`), or use --ring-layout zigzag")
        self.layer_number = layer_number
        _note_layer(config, layer_number)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.cp_comm_type = cp_comm_type  # Transformer Engine's context-parallel transport; unused here
        self.document_plan: str | None = None  # "whole" / "grid" once it met packed documents (the guard says it)
        self.kernel: str | None = None  # ring_sp.attention_kernel on its first call (the guard says it)
        if attention_type != "self":
            raise ValueError(f"attention_type={attention_type!r}: ring attention is self-attention only")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention dropout {dropout}: ring attention has none; set "
                             "TransformerConfig(attention_dropout=0.0) (Megatron-LM: --attention-dropout 0)")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"softmax_type={config.softmax_type!r}: ring attention computes the vanilla softmax only")
        if getattr(config, "qk_clip", False) or getattr(config, "log_max_attention_logit", False):
            raise ValueError("qk_clip / log_max_attention_logit need per-head max logits, which ring attention "
                             "does not report: turn them off")
        self.group = context_parallel_group(pg_collection, model_comm_pgs)
        self.ring_size = 1 if self.group is None else dist.get_world_size(self.group)
        configured = getattr(config, "context_parallel_size", 1)
        if configured != self.ring_size:
            raise ValueError(f"config.context_parallel_size={configured} but the context-parallel group has "
                             f"{self.ring_size} ranks: with ring attention they must match (the ring is that group)")
        check_ring_size(self.options, self.ring_size)
        self.ring_rank = 0 if self.group is None else dist.get_rank(self.group)
        # accepted without RingOptions or apply() only because the layout is Megatron's own split (zigzag)
        self.relies_on_megatron = options is None and not defaults.applied()
        if self.ring_size > 1:  # THD batches: RoPE by in-document position under the ring's layout
            packed_rope.register(config, self.group, self.options.layout)
            packed_rope.install()
        self.lookback = self._lookback(config, layer_number)
        if self.lookback is not None and attn_mask_type not in _CAUSAL + (AttnMaskType.arbitrary,):
            raise ValueError(f"a sliding window needs causal attention, got attn_mask_type={attn_mask_type}")

    def _lookback(self, config, layer_number: int) -> int | None:
        """Megatron's window (per layer, as its window_attn_skip_freq says) or the ring's (every layer)."""
        window = lookback_from_window(config.window_size)
        wanted = self.options.max_lookback
        if window is not None and wanted is not None and window != wanted:
            raise ValueError(f"config.window_size={tuple(config.window_size)} (a lookback of {window}) and "
                             f"RingOptions.max_lookback={wanted} disagree: set one of them")
        if config.window_size:
            return window if _window_applies(config, layer_number) else None
        return wanted

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias: Tensor | None = None,
                packed_seq_params=None) -> Tensor:
        """query [sq, b, heads, d], key/value [sq, b, groups, d] → [sq, b, heads * d].

        ``attention_mask``: None (the mask type says causal or not), Megatron's bool mask when it is
        the plain causal or full one, or a document mask (``megatron_patch.documents``): then a query
        attends only inside its document."""
        if packed_seq_params is not None:
            return self._packed(query, key, value, attn_mask_type, packed_seq_params)
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by ring attention")
        if query.dim() != 4 or key.dim() != 4 or key.shape[0] != query.shape[0]:
            raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must be [seq, batch, heads, "
                             "head_dim] of one length (a KV cache for inference is not supported)")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        documents = None
        if is_document_mask(attention_mask):
            documents, attention_mask = read_once(attention_mask, documents_of), None
        elif self.options.documents:
            raise ValueError("--reset-attention-mask: this batch carries no document boundaries, so ring attention "
                             "would attend across documents. Megatron-LM: run through `python -m megatron_patch` "
                             "(its batch split adds them); Megatron-core: shard_batch(..., documents=cu_seqlens)")
        causal = self._causal(mask_type, attention_mask, query.shape[0], query.device)
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))
        self._note_kernels(documents, causal, q, k)
        out = ring_attention(q, k, v, **self._options(causal), group=self.group, cu_seqlens=documents,
                             agree=self._agrees())
        sq, b, h, d = query.shape
        return out.transpose(0, 1).reshape(sq, b, h * d)

    def _note_kernels(self, documents, causal: bool, q: Tensor, k: Tensor) -> None:
        """Remember the kernel (ring_sp.attention_kernel) and how the ring computes packed documents here
        (ring_sp.document_plan), the first time."""
        if self.kernel is None or (documents is not None and self.document_plan is None):
            options = RingOptions.from_kwargs(self._options(causal))
            self.kernel = attention_kernel(options, q, k)
            if documents is not None:
                self.document_plan = document_plan(options, q, k)

    def _options(self, causal: bool) -> dict:
        """``ring_attention``'s option arguments for this layer: the ring is the whole group (``ring_size``
        was checked against it), the window and the softmax scale are this layer's."""
        options = replace(self.options, causal=causal, max_lookback=self.lookback, softmax_scale=self.softmax_scale,
                          ring_size=None)
        return options.kwargs()

    def _agrees(self) -> bool:
        """Only the model's first ring layer checks that the ranks agree (one host sync per forward, not per
        layer): the later layers see the same batch through the same shapes."""
        return _is_first_layer(self.config, self.layer_number)

    def _packed(self, query: Tensor, key: Tensor, value: Tensor, attn_mask_type, params) -> Tensor:
        """THD packed sequences (Megatron's packed_seq_params): query [t, heads, d] (or [t, 1, heads, d]), this
        rank's share of the stream, documents from ``cu_seqlens_q_padded`` (else ``cu_seqlens_q``), the whole
        stream's → [t, heads * d].

        With context parallelism > 1 the stream must be split with the ring's layout (``shard_batch``, or
        Megatron-LM's batch split after ``apply()``; ``megatron_patch.packed``), and RoPE follows it
        (``megatron_patch.packed_rope``); Megatron's own split cuts every document for Transformer Engine."""
        fmt = getattr(params, "qkv_format", None)
        bounds = packed.ring_boundaries(getattr(params, "cu_seqlens_q", None),
                                        getattr(params, "cu_seqlens_q_padded", None))
        why = None
        if fmt != "thd":
            why = f"packed_seq_params with qkv_format={fmt!r}: only 'thd' is packed"
        elif bounds is None:
            why = ("THD packed sequences without cu_seqlens_q: pass the documents' boundaries in the whole stream "
                   "(PackedSeqParams(cu_seqlens_q=..., cu_seqlens_kv=...))")
        elif self.ring_size > 1 and self.relies_on_megatron:
            why = ("THD packed sequences with context parallelism > 1 need the ring's split of the stream and its "
                   "RoPE, not Megatron's (which cuts every document for Transformer Engine): build the model with "
                   "RingOptions (get_gpt_layer_ring_spec(options) / ring_gpt_model) and split with "
                   "megatron_patch.shard_batch, or run Megatron-LM through `python -m megatron_patch`")
        elif self.ring_size > 1 and not packed_rope.installed():
            why = ("THD packed sequences with context parallelism > 1: this megatron-core has no "
                   f"{packed_rope.ATTENTION}.apply_rotary_pos_emb to make RoPE follow the ring's split")
        if self._agrees():
            self._agree(why is None, query.device, "packed_seq_params that ring attention refuses", fix="")
        if why is not None:
            raise ValueError(why)
        if self.ring_size > 1:
            packed.SEEN["attention"] = True
        q, k, v = (t.reshape(t.shape[0], *t.shape[-2:])[None] for t in (query, key, value))  # (1, t, heads, d)
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        documents = read_once(bounds, boundaries)
        self._note_kernels(documents, mask_type not in _FULL, q, k)
        out = ring_attention(q, k, v, **self._options(mask_type not in _FULL), group=self.group,
                             cu_seqlens=documents, agree=self._agrees())
        return out[0].reshape(q.shape[1], -1)

    def _causal(self, mask_type: AttnMaskType, mask: Tensor | None, local_seq: int, device) -> bool:
        """Whether to attend causally; a given ``mask`` must say exactly what the ring will do."""
        if mask_type in _CAUSAL:
            candidates = (True,)
        elif mask_type in _FULL:
            candidates = (False,)
        else:  # arbitrary: the mask decides, if it is one of the two patterns the ring computes
            candidates = (True, False)
        if mask is None:
            if len(candidates) > 1:
                raise ValueError("attn_mask_type=arbitrary needs an attention_mask")
            return candidates[0]
        key = (id(mask), getattr(mask, "_version", None), candidates, local_seq, self.options.layout, self.lookback)
        first = _is_first_layer(self.config, self.layer_number)
        seen = None if first else _MASKS.get(key)
        if seen is not None and seen[0]() is mask:  # the mask the first layer checked: no check, no sync
            return seen[1]
        why = self._mask_problem(mask, local_seq)
        matching = []
        if why is None:
            matching = [c for c in candidates if self._pattern_matches(mask, local_seq, c, device)]
            if not matching:
                why = ("it is not the plain causal mask (a dense document mask, padding, ...)"
                       if candidates == (True,) else f"it matches no mask the ring computes for {mask_type}")
        self._agree(why is None, device)  # every rank raises together, or none does
        if why is not None:
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"attention_mask {shape} cannot be honoured by ring attention: {why}. "
                             "Ring attention applies causal (and sliding-window) masking itself: pass "
                             "attention_mask=None (Megatron-LM: --no-create-attention-mask-in-dataloader); for "
                             "documents pass their boundaries (--reset-attention-mask, or "
                             "shard_batch(..., documents=cu_seqlens))")
        if first:
            _MASKS.clear()  # keep only the current batch's
        _MASKS[key] = (weakref.ref(mask), matching[0])
        return matching[0]

    def _mask_problem(self, mask: Tensor, local_seq: int) -> str | None:
        full = local_seq * self.ring_size
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
            return "it must be a bool tensor [batch, 1, local_seq, seq] (True = masked out)"
        if mask.shape[1] != 1 or mask.shape[2] != local_seq or mask.shape[3] != full:
            return (f"expected [batch, 1, {local_seq}, {full}]: this rank's query rows (sharded like the data) "
                    "against every key of the sequence in natural order")
        return None

    def _pattern_matches(self, mask: Tensor, local_seq: int, causal: bool, device) -> bool:
        full = local_seq * self.ring_size
        rows = local_positions(full, self.options.layout, self.ring_rank, self.ring_size).to(device)
        keys = torch.arange(full, device=device)
        visible = torch.ones(local_seq, full, dtype=torch.bool, device=device)
        if causal:
            visible &= keys[None, :] <= rows[:, None]
            if self.lookback is not None:
                visible &= rows[:, None] - keys[None, :] < self.lookback
        return bool((mask == ~visible).all())

    def _agree(self, ok: bool, device, what: str = "an attention_mask that ring attention cannot honour",
               fix: str = ": pass attention_mask=None") -> None:
        if self.group is None or self.ring_size == 1:
            return
        on_gpu = dist.get_backend(self.group) == "nccl"
        flag = torch.tensor([int(ok)], device=device if on_gpu else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        if not flag.item() and ok:
            raise ValueError(f"another rank of the context-parallel group got {what} (its error says why){fix}")
