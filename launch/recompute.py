"""Activation recompute as a policy: from what a run's activations would take and the memory a rank has,
choose none, selective or full recompute of the first N layers (``--recompute-granularity auto``).

Everything is in bytes per rank and counted per token of the rank's micro batch (micro batch ×
seq / ring). A layer of Megatron's local spec (RMSNorm or LayerNorm, no biases or dropout, hidden
h, feed-forward f, query heads × head_dim = h, K/V heads × head_dim = g·d, tensor parallel t, element
size e of the activations) keeps for backward, per token:

- ``none``: e · (4h + (2h + 2gd)/t + 4f/t) (SwiGLU; 2f/t less without a gate, f/t less with liger's fused
  SwiGLU, which keeps only its input): the two norms' inputs and outputs (4h), q, out, k, v of the
  attention — ring attention keeps only those and its float32 lse (4 · heads/t) —, and the MLP's fc1
  output, activation and fc2 input;
- ``selective`` (Megatron's recompute_modules ``mlp``; never core attention, which keeps nothing it
  could drop and would run the ring again; ``layernorm`` needs Transformer Engine): e · (4h + (2h +
  2gd)/t): the MLP keeps only its input and runs again in backward;
- ``full`` (a layer recomputed whole): e · h, its input.

Selective recompute may cover only the first M layers, and full recompute of the first N layers may be
combined with selective recompute in the others (the MLPs of layers N+1 .. L recompute themselves): at long
sequences, where a layer's recompute is mostly attention, that fits with fewer layers recomputed whole.

The rest of the rank: model states (weights, gradients, AdamW states, as DeepSpeed's ZeRO stage splits
them), the logits with their float32 softmax (or liger's chunked fused linear cross-entropy), and the
working set of one recomputed layer. The plan that fits with the fewest recomputed FLOPs wins:
selective re-runs every MLP's forward, full re-runs the first N layers' forward, attention included.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9
SELECTIVE_MODULES = ("mlp",)  # what selective recompute recomputes in this job (layernorm: needs TE)


def recomputed_mlp(mlp_class: type) -> type:
    """``mlp_class`` whose forward keeps no activations and runs again in backward (PyTorch's non-reentrant
    checkpoint; the MLP draws no random numbers, so the recompute is the same arithmetic)."""
    import torch.utils.checkpoint

    def forward(self, hidden_states, *args, **kwargs):
        run = super(recomputed, self).forward
        if not getattr(self, "recompute_self", True):  # inside a layer recomputed whole (whole_layer)
            return run(hidden_states, *args, **kwargs)
        return torch.utils.checkpoint.checkpoint(run, hidden_states, *args, use_reentrant=False, **kwargs)

    recomputed = type(f"Recomputed{mlp_class.__name__}", (mlp_class,), {"forward": forward, "recomputed": True})
    return recomputed


def whole_layer(config, layer_number: int) -> bool:
    """Whether Megatron recomputes the layer ``layer_number`` (1-based, within its pipeline stage) whole: full
    recompute of the first ``recompute_num_layers`` layers (block) or of every layer (uniform)."""
    if config.recompute_granularity != "full":
        return False
    return config.recompute_method != "block" or layer_number <= config.recompute_num_layers


def last_mlp_layer(args: argparse.Namespace) -> int | None:
    """Under the job's recompute settings, the last layer of a stage whose MLP recomputes itself: 0 when none
    does, None when every layer does (``--recompute-activations``, or auto's selective in every layer)."""
    mlps = getattr(args, "recompute_mlp_layers", None)  # auto's plans (resolve); None: as the flags say
    if mlps is None:
        return None if args.recompute_granularity == "selective" else 0
    return mlps and (args.recompute_num_layers if args.recompute_granularity == "full" else 0) + mlps


def mlp_recomputes(config, layer_number: int, last: int | None) -> bool:
    """Whether layer ``layer_number``'s self-recomputing MLP recomputes itself: it sits at or before ``last``
    (:func:`last_mlp_layer`) in a layer Megatron does not recompute whole, which keeps nothing to drop."""
    return not whole_layer(config, layer_number) and (last is None or layer_number <= last)


MARGIN = 0.9  # of the memory available, what the plan may fill (allocator slack, NCCL and DeepSpeed buffers)


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a run (per rank)."""

    layers: int  # layers on this rank
    tokens: int  # micro batch × seq / ring
    seq: int  # the ring's whole sequence (attention FLOPs)
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    tensor: int
    element: int  # bytes per activation element
    gated: bool
    fused_swiglu: bool
    fused_loss: bool
    parameters: int  # on this rank
    state_bytes_per_parameter: float

    @classmethod
    def from_args(cls, args: argparse.Namespace, vocab: int, zero_stage: int, zero_shards: int,
                  fused: tuple[str, ...] = ()) -> Shape:
        h, t = args.hidden_size, args.tensor_model_parallel_size
        heads = args.num_attention_heads
        kv_heads = args.num_query_groups or heads
        f = args.ffn_hidden_size or 4 * h
        d = h // heads
        element = 2 if (args.bf16 or args.fp16) else 4
        mlp_in = (2 if args.swiglu else 1) * f
        per_layer = (h * (h + 2 * kv_heads * d) + h * h + h * mlp_in + f * h) // t + 2 * h
        embeddings = 2 * vocab * h // t + (args.max_position_embeddings * h
                                            if args.position_embedding_type == "learned_absolute" else 0)
        layers = args.num_layers // getattr(args, "pipeline_model_parallel_size", 1)
        return cls(layers=layers, tokens=args.micro_batch_size * args.seq_length // args.context_parallel_size,
                   seq=args.seq_length, hidden=h, ffn=f, heads=heads, kv_heads=kv_heads, vocab=vocab, tensor=t,
                   element=element, gated=args.swiglu, fused_swiglu="swiglu" in fused,
                   fused_loss="cross_entropy" in fused, parameters=layers * per_layer + embeddings,
                   state_bytes_per_parameter=state_bytes(element, zero_stage, zero_shards))


def state_bytes(element: int, zero_stage: int, shards: int) -> float:
    """Bytes per parameter of weights, gradients and AdamW (float32 master, exp_avg, exp_avg_sq) under ZeRO."""
    if element == 4:  # fp32: the parameters are the master weights; ZeRO still keeps an fp32 partition
        return 8 + (12 if zero_stage == 0 else 12 / shards)
    if zero_stage == 0:  # DeepSpeed's bf16/fp16 optimizer: float32 master, gradients and AdamW states
        return 2 * element + 16
    if zero_stage < 3:
        return 2 * element + 16 / shards
    return (2 * element + 16) / shards


def layer_bytes(s: Shape, mode: str) -> float:
    """Activation bytes one layer keeps for backward, per token (see the module docstring)."""
    h, t, e = s.hidden, s.tensor, s.element
    attention = (2 * h + 2 * s.kv_heads * (h // s.heads)) / t
    lse = 4 * s.heads / t
    if mode == "full":
        return e * h
    if mode == "selective":
        return e * (4 * h + attention) + lse + 8
    mlp = (4 if s.gated else 2) * s.ffn / t - (s.ffn / t if s.gated and s.fused_swiglu else 0)
    return e * (4 * h + attention + mlp) + lse + 8  # + the norms' float32 1/rms


def logits_bytes(s: Shape) -> float:
    """The loss's working set per token: logits in the activation dtype with a float32 copy and softmax, or
    liger's fused linear cross-entropy, which keeps only its input (one chunk of logits at a time)."""
    if s.fused_loss:
        return s.element * s.hidden
    return (s.element + 8) * s.vocab / s.tensor


def activations(s: Shape, granularity: str | None, method: str | None = None, n: int | None = None,
                mlp_layers: int | None = None) -> float:
    """Activation bytes of the rank's micro batch under a recompute setting (full: ``method`` block or uniform
    with ``n`` layers), the working set of one recomputed layer and the ring's float32 buffers included.
    ``mlp_layers``: how many layers (after block's whole ones) recompute their MLP; default every layer for
    selective, none for full."""
    L = s.layers
    none, sel, full = (layer_bytes(s, m) for m in ("none", "selective", "full"))
    work = 4 * (2 * s.hidden + 2 * s.kv_heads * (s.hidden // s.heads)) / s.tensor  # ring state, dq, dk, dv
    if granularity is None:
        per_token = L * none
    elif granularity == "selective":  # the first m layers: backward frees the others' before it recomputes any
        m = L if mlp_layers is None else mlp_layers
        per_token = m * sel + (L - m) * none + (none - sel if m == L else 0)  # the last layer's MLP recompute
    elif method == "block":  # backward reaches the recomputed layers after freeing the others'
        m = mlp_layers or 0
        working = none - sel if m else (none if n == L else 0)  # one MLP's, or one whole layer's with no others
        per_token = n * full + m * sel + (L - n - m) * none + working
    else:  # uniform: each chunk of n layers keeps its input; one chunk is recomputed at a time
        per_token = -(-L // n) * full + n * none
    return s.tokens * (per_token + work)


@dataclass(frozen=True)
class Plan:
    """A recompute setting (TransformerConfig's fields) and what it is estimated to need and cost."""

    granularity: str | None  # None, "selective", "full"
    num_layers: int | None = None  # full: the first N layers (recompute_method "block")
    activations: float = 0.0  # bytes
    flops: float = 0.0  # recomputed forward FLOPs per micro batch
    mlp_layers: int = 0  # the MLPs of the layers after the whole ones that recompute themselves (selective)

    @property
    def method(self) -> str | None:
        return "block" if self.granularity == "full" else None

    def name(self, layers: int) -> str:
        if self.granularity == "full":
            name = f"full (the first {self.num_layers} of {layers} layers)" if self.num_layers < layers else "full"
            return name + (", selective (MLP) in the others" if self.mlp_layers else "")
        if self.granularity == "selective" and self.mlp_layers < layers:
            return f"selective (MLP) in the first {self.mlp_layers} of {layers} layers"
        return self.granularity or "none"


def plans(s: Shape) -> list[Plan]:
    """Every plan the policy considers, with its activation bytes and recomputed FLOPs per micro batch:
    none, selective in the first M layers for M = layers .. 1, full recompute of the first N layers for
    N = 1 .. layers, and for N = 1 .. layers - 1 with selective recompute in the others."""
    h, f, t, n = s.hidden, s.ffn, s.tensor, s.tokens
    d = h // s.heads
    mlp_flops = 2 * (3 if s.gated else 2) * h * f / t
    layer_flops = 2 * (h * (h + 2 * s.kv_heads * d) + h * h) / t + mlp_flops + 2 * s.seq * h / t  # causal
    L = s.layers
    out = [Plan(None, activations=activations(s, None))]
    out += [Plan("selective", activations=activations(s, "selective", mlp_layers=m), flops=n * m * mlp_flops,
                 mlp_layers=m) for m in range(L, 0, -1)]
    out += [Plan("full", k, activations(s, "full", "block", k), n * k * layer_flops) for k in range(1, L + 1)]
    out += [Plan("full", k, activations(s, "full", "block", k, mlp_layers=L - k),
                 n * (k * layer_flops + (L - k) * mlp_flops), mlp_layers=L - k) for k in range(1, L)]
    return out


def choose(s: Shape, available: float) -> tuple[Plan, Plan]:
    """(the plan with the fewest recomputed FLOPs whose activations fit in ``available`` bytes — else
    full recompute of every layer —, the plan without recompute)."""
    every = plans(s)
    fitting = [p for p in every if p.activations <= available]
    best = min(fitting, key=lambda p: (p.flops, p.activations)) if fitting else max(every, key=lambda p: p.flops)
    return best, every[0]


def size(n: float) -> str:
    """Bytes for a person: GB (1e9) from one GB up, else MB."""
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 1e6:.1f} MB"


def fixed_bytes(s: Shape) -> float:
    """Model states and the loss's working set: what the rank needs besides the layers' activations."""
    return s.parameters * s.state_bytes_per_parameter + s.tokens * logits_bytes(s)


def available_memory(args: argparse.Namespace, device) -> tuple[float | None, str]:
    """(bytes per rank to plan for, where the number comes from): --recompute-memory-budget, else the smallest
    free GPU memory over the ranks (every rank must choose the same plan: recompute changes collectives),
    else None (CPU)."""
    import torch
    import torch.distributed as dist

    if args.recompute_memory_budget is not None:
        return args.recompute_memory_budget * GB, "(--recompute-memory-budget)"
    if device.type != "cuda":
        return None, "CPU"
    free = torch.tensor([float(torch.cuda.mem_get_info(device)[0])], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(free, op=dist.ReduceOp.MIN)
    return free.item(), "free on the GPU"


def resolve(args: argparse.Namespace, s: Shape, device) -> str:
    """Turn --recompute-granularity auto into a plan (sets ``args.recompute_granularity``, ``_method``,
    ``_num_layers``) and return the line that says what was chosen and why."""
    mode = args.recompute_granularity
    args.recompute_mlp_layers = None  # after the whole layers, how many MLPs recompute themselves (None: all)
    if mode != "auto":
        estimate = activations(s, mode, args.recompute_method, args.recompute_num_layers)
        n = args.recompute_num_layers
        name = f"full ({args.recompute_method}, {n} layer{'s' if n != 1 else ''})" if mode == "full" else mode
        return f"recompute: {name or 'none'} (as the command line says; estimated activations {size(estimate)})"
    memory, source = available_memory(args, device)
    if memory is None:
        args.recompute_granularity = None
        return (f"recompute: none ({source}: no memory limit to plan for; --recompute-memory-budget GB plans "
                "for one)")
    fixed = fixed_bytes(s)
    left = MARGIN * memory - fixed
    plan, without = choose(s, left)
    args.recompute_granularity, args.recompute_method, args.recompute_num_layers, args.recompute_mlp_layers = (
        plan.granularity, plan.method, plan.num_layers, plan.mlp_layers)
    fits = "" if plan.activations <= left else "; it may not fit"
    return (f"recompute: {plan.name(s.layers)} (estimated activations {size(plan.activations)}, "
            f"{size(without.activations)} without recompute; {size(max(left, 0))} left for them of "
            f"{size(memory)} {source} after {size(fixed)} of model states and logits and a "
            f"{100 * (1 - MARGIN):.0f}% margin{fits})")
