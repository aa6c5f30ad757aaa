"""Long-context GPT pretraining with ring attention: Megatron-core's GPT, DeepSpeed's engine.

    deepspeed --num_gpus 2 launch/pretrain_gpt.py --deepspeed_config deepspeed_configs/cpu_demo.json \\
        --ring-attention --seq-length 256 --train-iters 300          # CPU: gloo, 2 ranks = one ring
    deepspeed --num_gpus 8 launch/pretrain_gpt.py --deepspeed_config deepspeed_configs/node_8gpu.json \\
        --ring-attention --seq-length 32768 --num-layers 12 --hidden-size 1024 --num-attention-heads 16
    torchrun --nproc-per-node 2 launch/pretrain_gpt.py --ring-attention --context-parallel-size 2

Every sequence of --seq-length tokens is sharded over a ring of --context-parallel-size ranks
(the DeepSpeed config's ``ring_attention.size``); every layer's attention runs over the whole
sequence by passing K/V blocks around the ring. Ranks are placed tensor × ring × data
(ring_sp.topology); ZeRO reduces gradients over data × ring.

Data: without --data-path, an embedded recall task (launch/data.py) whose answers need a fact
from far back in the sequence, often held by another rank; validation reports accuracy on
answers whose fact is on another rank ("cross-shard") and on the same rank, against chance.
With --data-path PREFIX, Megatron's indexed dataset (PREFIX.bin / PREFIX.idx).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import socket
import sys
import time
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from launch import checkpoint, data, ds_config  # noqa: E402
from ring_sp import topology  # noqa: E402
from ring_sp.topology import ring_loss  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from megatron_patch import add_ring_attention_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model (Megatron's flags)")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 × hidden size")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--num-query-groups", type=int, default=None, help="K/V heads (GQA); default: one per head")
    g.add_argument("--seq-length", type=int, default=256, help="tokens per sequence, over the whole ring")
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    g.add_argument("--position-embedding-type", choices=["rope", "learned_absolute"], default="rope")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false")
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--vocab-size", type=int, default=None, help="needed with --data-path: the tokenizer's vocabulary")
    g = p.add_argument_group("activation recompute (Megatron's flags)")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="full: keep only each layer chunk's input and run its forward again in backward "
                        "(--recompute-method, --recompute-num-layers; default: uniform, 1 layer, i.e. every layer); "
                        "selective: recompute only core attention, here the ring attention (the ring's forward, "
                        "K/V passing included, runs again in backward). Default: no recompute")
    g.add_argument("--recompute-activations", action="store_true",
                   help="Megatron-LM's shorthand for --recompute-granularity selective")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="with --recompute-granularity full: uniform (default) splits the layers into chunks of "
                        "--recompute-num-layers and recomputes every chunk; block recomputes the first "
                        "--recompute-num-layers layers and keeps the others' activations")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="with --recompute-granularity full: layers per chunk (uniform) or layers recomputed "
                        "(block); default 1")
    g = p.add_argument_group("parallelism (Megatron's flags)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1, help="the ring size (ring_attention.size)")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="default: nccl with GPUs, gloo on CPU")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="a rank that waits longer than this on the others fails instead of hanging")
    g = p.add_argument_group("training (Megatron's flags)")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=300)
    g.add_argument("--exit-interval", type=int, default=None, help="stop (and save) after this iteration")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--data-path", default=None, help="Megatron indexed dataset prefix; default: the recall task")
    g.add_argument("--recall-keys", type=int, default=8, help="facts per sequence in the recall task")
    g.add_argument("--recall-values", type=int, default=8, help="values a fact can hold (chance = 1 / this)")
    g.add_argument("--eval-interval", type=int, default=100)
    g.add_argument("--eval-iters", type=int, default=4)
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", default=None, help="resume from the latest checkpoint in this directory")
    g.add_argument("--metrics-file", default=None, help="JSON lines of every iteration and evaluation (rank 0)")
    g.add_argument("--plot", default=None, help="loss / accuracy PNG written at the end (rank 0)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="plain log lines, no progress bar")
    g = p.add_argument_group("launchers")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None)
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help="set by the DeepSpeed launcher (LOCAL_RANK is read from the environment anyway)")
    add_ring_attention_args(p)
    return p


def parse_and_check(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    """Parse the flags and the DeepSpeed config; ValueError (same on every rank) if they do not fit."""
    from megatron_patch import validate_ring_args

    parser = build_parser()
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = ds_config.load(args.deepspeed_config) if args.deepspeed_config else {}
    source = args.deepspeed_config or "the DeepSpeed config"
    config = ds_config.resolve(config, args, ds_config.explicit_dests(parser, argv), world, source)
    validate_ring_args(args, args.context_parallel_size)
    if args.pipeline_model_parallel_size != 1:
        raise ValueError("--pipeline-model-parallel-size: this job has no pipeline schedule; use 1 (ring_sp.topology "
                         "places a pipe axis for jobs that bring their own)")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    for flag, value in (("--train-iters", args.train_iters), ("--eval-interval", args.eval_interval),
                        ("--eval-iters", args.eval_iters), ("--log-interval", args.log_interval)):
        if value < 1:
            raise ValueError(f"{flag} {value}: use a positive integer")
    if args.data_path and not args.vocab_size:
        raise ValueError("--data-path needs --vocab-size (the vocabulary size of the tokenizer that made the data)")
    if args.save_interval is not None and args.save is None:
        raise ValueError("--save-interval needs --save DIR")
    check_recompute(args)
    return args, config


def check_recompute(args) -> None:
    """Megatron-LM's recompute flags → what TransformerConfig accepts; ValueError naming the flag if they clash.

    --recompute-activations = --recompute-granularity selective. Full recompute defaults to
    --recompute-method uniform, --recompute-num-layers 1; selective takes neither (it recomputes
    core attention in every layer)."""
    if args.recompute_activations:
        if args.recompute_granularity == "full":
            raise ValueError("--recompute-activations means --recompute-granularity selective, but the command line "
                             "says --recompute-granularity full: give one of them")
        args.recompute_granularity = "selective"
    given = [flag for flag, value in (("--recompute-method", args.recompute_method),
                                      ("--recompute-num-layers", args.recompute_num_layers)) if value is not None]
    if args.recompute_granularity is None:
        if given:
            raise ValueError(f"{given[0]} needs --recompute-granularity full")
        return
    if args.recompute_granularity == "selective":
        if given:
            raise ValueError(f"{given[0]} applies to --recompute-granularity full only: selective recompute "
                             "recomputes core attention in every layer")
        return
    if args.recompute_method is None:
        args.recompute_method = "uniform"
    if args.recompute_num_layers is None:
        args.recompute_num_layers = 1
    n, layers = args.recompute_num_layers, args.num_layers
    if not 1 <= n <= layers:
        raise ValueError(f"--recompute-num-layers {n}: use 1 to --num-layers ({layers})")
    if args.recompute_method == "uniform" and layers % n:
        raise ValueError(f"--recompute-num-layers {n} with --recompute-method uniform: it must divide --num-layers "
                         f"{layers} (the layers are recomputed in chunks of that many)")


def init_distributed(args) -> tuple[torch.device, object]:
    """Process group (gloo on CPU, NCCL on GPU) and Megatron-core's groups; returns (device, mpu)."""
    if "RANK" not in os.environ:  # plain `python launch/pretrain_gpt.py`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank or 0))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    gpu = torch.cuda.is_available() and args.distributed_backend != "gloo"
    device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    else:  # share the cores among this node's ranks instead of oversubscribing them
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    timeout = timedelta(minutes=args.distributed_timeout_minutes)
    topology.init_distributed(args.distributed_backend or ("nccl" if gpu else "gloo"), timeout)
    mpu = topology.initialize(tensor=args.tensor_model_parallel_size, pipeline=args.pipeline_model_parallel_size,
                              ring=args.context_parallel_size, timeout=timeout)
    return device, mpu


def cpu_recompute_rng() -> None:
    """Let Megatron-core's activation recompute run on CPU.

    ``megatron.core.tensor_parallel.checkpoint`` saves the CPU and the CUDA RNG state before a
    checkpointed forward and restores both for its recompute, so that dropout draws the same
    masks again; the CUDA half calls torch.cuda unconditionally ("Torch not compiled with CUDA
    enabled" on a CPU-only torch; megatron's model_parallel_cuda_manual_seed fails the same way).
    On CPU only the CPU generator draws, and megatron saves and restores that one itself: the
    CUDA half becomes a no-op. Process-wide; call it only when the job's device is the CPU."""
    from megatron.core.tensor_parallel import random as megatron_random

    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: None
    megatron_random._set_cuda_rng_state = lambda *args, **kwargs: None


def build_model(args, vocab_size: int):
    """Megatron-core GPTModel: ring core attention with --ring-attention, else dense attention on one rank."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megatron_patch import LayoutRotaryEmbedding, RingOptions, ring_gpt_model

    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        normalization=args.normalization, gated_linear_unit=args.swiglu, add_bias_linear=args.add_bias_linear,
        activation_func=torch.nn.functional.silu if args.swiglu else torch.nn.functional.gelu,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std, tensor_model_parallel_size=args.tensor_model_parallel_size,
        context_parallel_size=args.context_parallel_size, bf16=args.bf16, fp16=args.fp16, params_dtype=dtype,
        use_cpu_initialization=True, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers)
    common = dict(vocab_size=vocab_size, max_sequence_length=args.max_position_embeddings,
                  position_embedding_type=args.position_embedding_type)
    if args.ring_attention:
        return ring_gpt_model(config, options=RingOptions.from_args(args), **common)
    # Without the ring: PyTorch's fused attention over the whole sequence (flash / cuDNN on GPUs), not
    # Megatron's local DotProductAttention, which needs CUDA and materialises the seq × seq scores.
    from launch.dense_attention import DenseCoreAttention

    spec = get_gpt_layer_local_spec(normalization=args.normalization)
    spec.submodules.self_attention.submodules.core_attention = DenseCoreAttention
    model = GPTModel(config, transformer_layer_spec=spec, **common)
    if args.position_embedding_type == "rope":  # Megatron's own table moves itself to CUDA
        LayoutRotaryEmbedding.convert(model.rotary_pos_emb, "contiguous")
    return model


def build_optimizer(args, model):
    """AdamW (no decay on biases and norms) and a warmup + decay schedule stepped once per iteration."""
    def matrix(p) -> bool:  # ZeRO-3 leaves an empty p.data and keeps the shape in ds_shape
        return len(getattr(p, "ds_shape", p.shape)) > 1

    decay = [p for p in model.parameters() if p.requires_grad and matrix(p)]
    rest = [p for p in model.parameters() if p.requires_grad and not matrix(p)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=args.lr,
                                  betas=(args.adam_beta1, args.adam_beta2))

    def factor(step: int) -> float:  # step = iterations done
        if step < args.lr_warmup_iters:
            return (step + 1) / args.lr_warmup_iters
        progress = min(1.0, (step - args.lr_warmup_iters) / max(1, args.train_iters - args.lr_warmup_iters))
        shape = {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}
        low = args.min_lr / args.lr
        return low + (1.0 - low) * shape[args.lr_decay_style]

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Job:
    """The pieces a training step needs: engine, groups, data, and how to shard a batch."""

    def __init__(self, args, config, device, mpu):
        import deepspeed

        self.args, self.device, self.mpu = args, device, mpu
        self.rank = dist.get_rank()
        self.ring_group = mpu.get_sequence_parallel_group()
        self.ring_size, self.ring_rank = mpu.get_sequence_parallel_world_size(), mpu.get_sequence_parallel_rank()
        self.zero_group = mpu.get_sequence_data_parallel_group()
        self.replicas, self.replica = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
        self.accum = config["gradient_accumulation_steps"]
        self.layout = args.ring_layout if args.ring_attention else "contiguous"
        if args.data_path:
            self.data = data.IndexedTokens(args.data_path, args.seq_length, args.vocab_size)
            self.chance = None
        else:
            self.data = data.RecallTask(args.seq_length, args.recall_keys, args.recall_values, seed=args.seed)
            self.chance = self.data.chance
        tp = args.tensor_model_parallel_size
        vocab = -(-self.data.vocab_size // 128) * 128  # padded as Megatron-LM does, to a multiple of 128 ...
        while vocab % tp:  # ... that the tensor-parallel ranks split evenly (the same size for tp 1, 2, 4, 8)
            vocab += 128
        if args.recompute_granularity and device.type == "cpu":
            cpu_recompute_rng()
        torch.manual_seed(args.seed)
        model = build_model(args, vocab)
        if config.get("zero_optimization", {}).get("stage", 0) == 3:
            topology.partition_for_zero3(model, mpu, config)  # over data × ring, not data alone
        optimizer, scheduler = build_optimizer(args, model)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=config, mpu=mpu)
        self.meta = {"world_size": dist.get_world_size(), "ring": self.ring_size, "tensor": tp,
                     "data": self.replicas, "layout": self.layout}

    def batch(self, micro_step: int, split: int = 0) -> dict[str, torch.Tensor]:
        """This rank's shard of its replica's micro batch number ``micro_step`` (global count)."""
        from megatron_patch import shard_batch

        full = self.data.batch(micro_step, self.replica, self.args.micro_batch_size, self.replicas, split)
        local = shard_batch(full, self.layout, self.ring_group) if self.ring_size > 1 else full
        return {k: v.to(self.device) for k, v in local.items()}

    def sum_over_replicas(self, values: list[float]) -> torch.Tensor:
        """Sum float64 values over data × ring (tensor-parallel ranks hold copies, so not over them)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.zero_group)
        return t

    def train_step(self, iteration: int) -> tuple[float, float | None]:
        """One optimizer step (all micro batches); returns the loss over the global batch and the gradient norm."""
        args, engine = self.args, self.engine
        torch.manual_seed(hash((args.seed, iteration, self.rank)) % 2**31)  # resumable: no RNG state to save
        engine.train()
        total = 0.0
        for m in range(self.accum):
            b = self.batch(iteration * self.accum + m)
            per_token = engine(b["tokens"], b["position_ids"], None, labels=b["labels"])  # (batch, local_seq)
            loss = ring_loss(per_token, b["loss_mask"], self.ring_group)
            engine.backward(loss)
            engine.step()
            total += loss.item()
        norm = engine.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        return self.sum_over_replicas([total / self.accum]).item() / self.replicas, norm

    def full_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """(batch, seq, vocab / tensor) shards of the tensor-parallel ranks → (batch, seq, vocab).

        Megatron's own gather allocates on CUDA, so this one is plain all_gather (gloo or NCCL)."""
        group = self.mpu.get_tensor_model_parallel_group()
        if dist.get_world_size(group) == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, logits.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def evaluate(self, iteration: int) -> dict:
        """Validation loss on scored tokens and, for the recall task, same- and cross-shard accuracy."""
        self.engine.eval()
        sums = torch.zeros(6, dtype=torch.float64)
        for i in range(self.args.eval_iters):
            b = self.batch(i, split=1)
            logits = self.full_vocab(self.engine(b["tokens"], b["position_ids"], None).float())
            token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(),
                                                           reduction="none").view_as(b["labels"])
            sums[0] += (token_loss * b["loss_mask"]).sum().item()
            sums[1] += b["loss_mask"].sum().item()
            if "answer_source" in b:
                cross = data.shard_sources(b["answer_source"].cpu(), self.layout, self.ring_rank, self.ring_size)
                sums[2:] += data.recall_accuracy(logits.argmax(-1).cpu(), b["labels"].cpu(), cross)
        s = self.sum_over_replicas(sums.tolist()).cpu()
        out = {"iteration": iteration, "loss": (s[0] / s[1]).item(), "acc_same": None, "acc_cross": None,
               "answers_same": int(s[3]), "answers_cross": int(s[5])}
        if s[3] > 0:
            out["acc_same"] = (s[2] / s[3]).item()
        if s[5] > 0:
            out["acc_cross"] = (s[4] / s[5]).item()
        return out


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS of this rank


def describe_eval(e: dict, chance: float | None) -> str:
    parts = []
    if e["acc_cross"] is not None:
        parts.append(f"fact on another rank {100 * e['acc_cross']:.1f}% ({e['answers_cross']} answers)")
    if e["acc_same"] is not None:
        parts.append(f"same rank {100 * e['acc_same']:.1f}% ({e['answers_same']})")
    if chance is not None:
        parts.append(f"chance {100 * chance:.1f}%")
    return f"validation loss {e['loss']:.4f}" + (" | recall: " + ", ".join(parts) if parts else "")


def describe_recompute(config) -> str:
    """The activation recompute the built model does, from its TransformerConfig ("" for none)."""
    n = config.recompute_num_layers
    if config.recompute_granularity == "full" and config.recompute_method == "uniform":
        return f" | recompute full (uniform: chunks of {n} layer{'s' if n > 1 else ''})"
    if config.recompute_granularity == "full":
        return f" | recompute full (block: the first {n} of {config.num_layers} layers)"
    if config.recompute_granularity == "selective":
        return f" | recompute selective ({', '.join(config.recompute_modules)})"
    return ""


def train(args, config) -> None:
    device, mpu = init_distributed(args)
    job = Job(args, config, device, mpu)
    rank0 = dist.get_rank() == 0
    start = checkpoint.load(job.engine, args.load, job.meta) if args.load else 0
    stop = min(args.train_iters, args.exit_interval or args.train_iters)
    metrics = open(args.metrics_file, "a") if rank0 and args.metrics_file else None
    if rank0:
        print(f"ranks {dist.get_world_size()} = tensor {args.tensor_model_parallel_size} × ring {job.ring_size} × "
              f"data {job.replicas} | layout {job.layout} | ZeRO stage {job.engine.zero_optimization_stage()} | "
              f"{sum(getattr(p, 'ds_numel', p.numel()) for p in job.engine.module.parameters()) / 1e6:.2f}M "
              f"parameters per tensor-parallel rank | "
              f"global batch {config['train_batch_size']} × {args.seq_length} tokens"
              + describe_recompute(job.engine.module.config)
              + (f" | resumed after iteration {start}" if start else ""), flush=True)
    bar = None
    if rank0 and args.progress:
        from tqdm import tqdm

        bar = tqdm(total=stop, initial=start, desc="train", dynamic_ncols=True, file=sys.stdout)
    tokens_per_iter = config["train_batch_size"] * args.seq_length
    train_log, eval_log = [], []

    def record(entry: dict) -> None:
        if metrics:
            metrics.write(json.dumps(entry) + "\n")
            metrics.flush()

    for iteration in range(start + 1, stop + 1):
        t0, lr = time.perf_counter(), job.engine.get_lr()[0]
        loss, grad_norm = job.train_step(iteration - 1)
        dt = time.perf_counter() - t0
        entry = {"iteration": iteration, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                 "tokens_per_s": tokens_per_iter / dt, "memory_mb": memory_mb(device)}
        train_log.append(entry)
        record({"kind": "train", **entry})
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}", mem=f"{entry['memory_mb']:.0f}MB",
                            refresh=False)
            bar.update(1)
        elif rank0 and iteration % args.log_interval == 0:
            print(f"iteration {iteration}/{stop} | loss {loss:.6f} | {entry['tokens_per_s']:.0f} tokens/s | "
                  f"memory {entry['memory_mb']:.0f} MB", flush=True)
        if iteration % args.eval_interval == 0 or iteration == stop:
            e = job.evaluate(iteration)
            eval_log.append(e)
            record({"kind": "eval", **e})
            if rank0:
                (bar.write if bar is not None else print)(f"iteration {iteration}: {describe_eval(e, job.chance)}")
        if args.save and (iteration == stop or (args.save_interval and iteration % args.save_interval == 0)):
            checkpoint.save(job.engine, args.save, iteration, job.meta)
    if bar is not None:
        bar.close()
    if rank0 and args.plot and train_log:
        from launch.plot import plot_run

        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot_run(args.plot, train_log, eval_log, job.chance,
                 f"GPT {args.num_layers} layers × {args.hidden_size}, seq {args.seq_length}, ring {job.ring_size} "
                 f"({job.layout}), data {job.replicas}"
                 + ("" if args.ring_reduce_col else ", local attention only (--no-ring-reduce-col)"))
        print(f"plot: {args.plot}", flush=True)
    if rank0 and eval_log:
        print(f"final ({stop} iterations): {describe_eval(eval_log[-1], job.chance)}", flush=True)
        if job.chance is not None and job.ring_size > 1:
            how = ("this run attends only within each shard (--no-ring-reduce-col), so" if not args.ring_reduce_col
                   else "without ring attention (--no-ring-reduce-col)")
            print(f"An answer whose fact is on another rank needs attention across shards: {how} accuracy on those "
                  f"stays at chance, {100 * job.chance:.1f}%.", flush=True)
    if metrics:
        metrics.close()
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, config = parse_and_check(argv)
    except ValueError as e:  # before any process group: every rank stops here alike, nothing waits
        print(f"[rank {os.environ.get('RANK', '0')}] configuration error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    train(args, config)


if __name__ == "__main__":
    main()
