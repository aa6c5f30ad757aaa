"""The job's flags (Megatron's names), checked with the DeepSpeed JSON before anything heavy is imported.

Importing this module imports torch and ring_sp, not Megatron-core, DeepSpeed or a process group,
so a bad command line, config or checkpoint ends every rank within seconds
(:func:`parse_and_check`; ``ValueError`` names the flag and the fix).
"""

from __future__ import annotations

import argparse
import os

from launch import checkpoint, ds_config
from megatron_patch.fused import FUSED_KERNELS, resolve_fused_kernels
from megatron_patch.options import add_ring_attention_args, validate_ring_args

DESCRIPTION = """Long-context GPT pretraining with ring attention: Megatron-core's GPT, DeepSpeed's engine.

    deepspeed --num_gpus 2 launch/pretrain_gpt.py --deepspeed_config deepspeed_configs/cpu_demo.json \\
        --ring-attention --seq-length 256 --train-iters 300          # CPU: gloo, 2 ranks = one ring
    torchrun --nproc-per-node 2 launch/pretrain_gpt.py --ring-attention --context-parallel-size 2

Exit codes: 0 done, 2 unusable input (flags, JSON, checkpoint to --load), 1 the run failed."""
NAN_SKIP_LIMIT = 10  # --nan-policy skip: stop after this many non-finite iterations in a row, unless told


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A bad flag is a ValueError like every other bad input (one line), not argparse's usage dump."""
        raise ValueError(f"{message} (--help lists the flags)")


def build_parser() -> argparse.ArgumentParser:
    """The job's flags; ``--help`` lists them."""
    p = _Parser(prog="pretrain_gpt.py", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model (Megatron's flags)")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 × hidden size")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--num-query-groups", type=int, default=None, help="K/V heads (GQA); default: one per head")
    g.add_argument("--seq-length", type=int, default=256, help="tokens per sequence, over the whole ring")
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    g.add_argument("--position-embedding-type", choices=["rope", "learned_absolute"], default="rope",
                   help="default rope (Megatron-LM's: learned_absolute)")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false")
    g.add_argument("--hidden-dropout", type=float, default=0.0, help="default 0 (Megatron-LM's: 0.1)")
    g.add_argument("--attention-dropout", type=float, default=0.0,
                   help="default 0 (Megatron-LM's: 0.1); ring attention takes 0 only")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--tie-embeddings-and-output-weights", action="store_true",
                   help="the output layer is the word embedding (with pipeline parallelism a copy on the last stage, "
                        "kept equal to the first stage's). Default: an output layer of its own (Megatron-LM ties by "
                        "default and unties with --untie-embeddings-and-output-weights)")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="Megatron-LM's flag for this job's default (an output layer of its own), taken so that "
                        "Megatron-LM command lines run unchanged")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="the tokenizer's vocabulary, needed with --data-path; with the recall task, the model's "
                        "vocabulary (default: the task's few tokens)")
    g = p.add_argument_group("activation recompute (Megatron's flags)")
    g.add_argument("--recompute-granularity", choices=["auto", "none", "selective", "full"], default="auto",
                   help="auto (default): the plan with the least recomputation whose estimated activations fit in "
                        "the GPU's free memory (the smallest over the ranks) or --recompute-memory-budget, printed "
                        "at start (launch/recompute.py); on CPU without a budget, none. none: keep every "
                        "activation. selective: recompute the MLP of every layer (Megatron's recompute module "
                        "mlp; never the ring attention, which keeps only q, k, v, "
                        "out and would pass K/V around the ring again). full: keep only each layer chunk's input "
                        "and run its forward again in backward (--recompute-method, --recompute-num-layers; "
                        "default: uniform, 1 layer, i.e. every layer)")
    g.add_argument("--recompute-activations", action="store_true",
                   help="Megatron-LM's shorthand for --recompute-granularity selective")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="with --recompute-granularity full: uniform (default) splits the layers into chunks of "
                        "--recompute-num-layers and recomputes every chunk; block recomputes the first "
                        "--recompute-num-layers layers and keeps the others' activations")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="with --recompute-granularity full: layers per chunk (uniform) or layers recomputed "
                        "(block); default 1")
    g.add_argument("--recompute-memory-budget", type=float, default=None, metavar="GB",
                   help="with --recompute-granularity auto: plan for this much memory per rank (GB, 1e9 bytes) "
                        "instead of the GPU's free memory; on CPU, what makes auto plan at all")
    g = p.add_argument_group("fused kernels")
    g.add_argument("--fused-kernels", choices=list(FUSED_KERNELS), default="auto",
                   help="liger: liger-kernel's Triton RMSNorm, SwiGLU, RoPE and fused linear cross-entropy in the GPT "
                        "layers (pip install liger-kernel; CUDA only); none: Megatron's own modules; auto "
                        "(default): liger when it is installed and the job runs on GPUs, else none")
    g = p.add_argument_group("parallelism (Megatron's flags)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="pipeline stages (DeepSpeed's pipeline engine, 1F1B over gradient_accumulation_steps micro "
                        "batches, at least this many; ZeRO stage 0 or 1); the DeepSpeed config's pipeline.stages")
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
    g.add_argument("--lr-warmup-iters", type=int, default=0,
                   help="linear warmup from 0 over this many iterations (Megatron-LM's schedule: the first runs at "
                        "lr 0), then decay to --min-lr at --train-iters")
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="linear",
                   help="default linear, as in Megatron-LM")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999, help="default 0.999, as in Megatron-LM")
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--data-path", default=None, help="Megatron indexed dataset prefix; default: the recall task")
    g.add_argument("--recall-keys", type=int, default=8, help="facts per sequence in the recall task")
    g.add_argument("--recall-values", type=int, default=8, help="values a fact can hold (chance = 1 / this)")
    g.add_argument("--recall-documents", type=int, default=None,
                   help="recall episodes (documents) packed in each sequence, each with its own facts; default 2 "
                        "with --reset-attention-mask, else 1")
    g = p.add_argument_group("packed documents (Megatron's flags)")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="a token attends only to tokens of its own document (the recall task's episodes, the "
                        "indexed dataset's documents); with --ring-attention the ring skips whatever crosses "
                        "documents")
    g.add_argument("--reset-position-ids", action="store_true",
                   help="position ids restart at 0 in every document (learned absolute positions; with RoPE this "
                        "changes nothing once --reset-attention-mask keeps attention inside documents)")
    g.add_argument("--eod-mask-loss", action="store_true",
                   help="no loss on the last token of a document, whose label starts the next document")
    g.add_argument("--eval-interval", type=int, default=100)
    g.add_argument("--eval-iters", type=int, default=4)
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", default=None, help="resume from the latest checkpoint in this directory")
    g.add_argument("--metrics-file", default=None, help="JSON lines of every iteration and evaluation (rank 0)")
    g.add_argument("--plot", default=None, help="loss / accuracy PNG written at the end (rank 0)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="plain log lines, no progress bar")
    g = p.add_argument_group("failures")
    g.add_argument("--nan-policy", choices=["stop", "skip"], default="stop",
                   help="when the loss or the gradient norm is not finite (inf or nan): stop (default; every rank "
                        "stops, no checkpoint is written after it, exit code 1) or skip the optimizer step, as a "
                        "loss-scale overflow does, and stop after --nan-skip-limit such iterations in a row")
    g.add_argument("--nan-skip-limit", type=int, default=None,
                   help=f"with --nan-policy skip: stop after this many non-finite iterations in a row "
                        f"(default {NAN_SKIP_LIMIT})")
    g.add_argument("--debug", action="store_true", help="print the traceback of every error, not one line")
    g.add_argument("--verbose", action="store_true",
                   help="show the third-party warnings and log lines the job hides (missing Transformer Engine or "
                        "Apex, deprecations, DeepSpeed's INFO lines) and every rank's warnings")
    g = p.add_argument_group("launchers")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None)
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help="set by the DeepSpeed launcher (LOCAL_RANK is read from the environment anyway)")
    add_ring_attention_args(p)
    return p


def parse_and_check(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    """Parse the flags and the DeepSpeed config; ValueError (same on every rank) if they do not fit."""
    parser = build_parser()
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = ds_config.load(args.deepspeed_config) if args.deepspeed_config else {}
    source = args.deepspeed_config or "the DeepSpeed config"
    config = ds_config.resolve(config, args, ds_config.explicit_dests(parser, argv), world, source)
    validate_ring_args(args, args.context_parallel_size)
    check_pipeline(args, config)
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    for flag, value in (("--train-iters", args.train_iters), ("--eval-interval", args.eval_interval),
                        ("--eval-iters", args.eval_iters), ("--log-interval", args.log_interval)):
        if value < 1:
            raise ValueError(f"{flag} {value}: use a positive integer")
    if args.tie_embeddings_and_output_weights and args.untie_embeddings_and_output_weights:
        raise ValueError("--tie-embeddings-and-output-weights and --untie-embeddings-and-output-weights: choose one")
    if args.data_path and not args.vocab_size:
        raise ValueError("--data-path needs --vocab-size (the vocabulary size of the tokenizer that made the data)")
    if args.save_interval is not None and args.save is None:
        raise ValueError("--save-interval needs --save DIR")
    check_recompute(args)
    args.fused_kernels = resolve_fused_kernels(args.fused_kernels, "cuda" if uses_gpu(args) else "cpu")
    check_nan_policy(args, config)
    check_documents(args)
    args.load_tag = checkpoint.check(args.load, run_meta(args, world)) if args.load else None
    return args, config


def run_meta(args: argparse.Namespace, world_size: int) -> dict:
    """What a checkpoint must have been saved with to be loaded by this run (ZeRO shards are cut for it)."""
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    meta = {"world_size": world_size, "ring": cp, "tensor": tp, "data": world_size // (tp * pp * cp),
            "layout": args.ring_layout if args.ring_attention else "contiguous"}
    return {**meta, "pipeline": pp} if pp > 1 else meta  # checkpoints of P = 1 runs keep their meta


def check_pipeline(args: argparse.Namespace, config: dict) -> None:
    """--pipeline-model-parallel-size P > 1: P splits the layers, DeepSpeed's pipeline engine can run it."""
    pp = args.pipeline_model_parallel_size
    if pp < 1:
        raise ValueError(f"--pipeline-model-parallel-size {pp}: use a positive integer")
    if pp == 1:
        return
    if args.num_layers % pp:
        raise ValueError(f"--pipeline-model-parallel-size {pp} does not divide --num-layers {args.num_layers}: every "
                         "stage holds the same number of layers; change one of them")
    accum = config["gradient_accumulation_steps"]
    if accum < pp:
        raise ValueError(f"gradient_accumulation_steps {accum} (the micro batches of a step) is below "
                         f"--pipeline-model-parallel-size {pp}: the pipeline would idle most of the step; raise "
                         "--global-batch-size / train_batch_size or lower --micro-batch-size so that global batch "
                         f"= micro batch × data-parallel size × at least {pp}")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage > 1:
        raise ValueError(f"zero_optimization.stage {stage} with --pipeline-model-parallel-size {pp}: DeepSpeed's "
                         "pipeline engine supports ZeRO stage 0 and 1 only; set the stage to 1")


def check_documents(args: argparse.Namespace) -> None:
    """--recall-documents' default; --reset-position-ids must change something."""
    if args.recall_documents is None:
        args.recall_documents = 2 if args.reset_attention_mask else 1
    if args.recall_documents < 1:
        raise ValueError(f"--recall-documents {args.recall_documents}: use a positive integer")
    if args.reset_position_ids and args.position_embedding_type == "rope" and not args.reset_attention_mask:
        raise ValueError("--reset-position-ids with RoPE: RoPE positions here follow the sequence, and restarting "
                         "them only changes attention across documents; add --reset-attention-mask (then it "
                         "changes nothing) or use --position-embedding-type learned_absolute")


def check_nan_policy(args: argparse.Namespace, config: dict) -> None:
    """--nan-skip-limit only with --nan-policy skip; skip only where DeepSpeed drops a non-finite step."""
    if args.nan_policy == "stop":
        if args.nan_skip_limit is not None:
            raise ValueError("--nan-skip-limit applies to --nan-policy skip only: add --nan-policy skip or drop it")
        return
    if args.nan_skip_limit is None:
        args.nan_skip_limit = NAN_SKIP_LIMIT
    if args.nan_skip_limit < 1:
        raise ValueError(f"--nan-skip-limit {args.nan_skip_limit}: use a positive integer")
    # DeepSpeed checks the gradients and drops a non-finite step in its ZeRO, bf16 and fp16 optimizers;
    # with none of them (ZeRO stage 0 in fp32) it hands our AdamW the gradients as they are.
    if config.get("zero_optimization", {}).get("stage", 0) == 0 and not (args.bf16 or args.fp16):
        raise ValueError("--nan-policy skip: with ZeRO stage 0 in fp32 DeepSpeed applies every optimizer step, "
                         "finite or not; set zero_optimization.stage to 1, 2 or 3 in the DeepSpeed config (or use "
                         "--bf16), or use --nan-policy stop")


def uses_gpu(args: argparse.Namespace) -> bool:
    """Whether the job runs on GPUs (NCCL), as launch.job.init_distributed decides."""
    import torch

    return torch.cuda.is_available() and args.distributed_backend != "gloo"


def check_recompute(args) -> None:
    """Megatron-LM's recompute flags → what TransformerConfig accepts; ValueError naming the flag if they clash.

    --recompute-activations = --recompute-granularity selective; none becomes None; auto stays until the
    job knows its memory (launch/recompute.py). Full recompute defaults to --recompute-method uniform,
    --recompute-num-layers 1; the other modes take neither."""
    if args.recompute_activations:
        if args.recompute_granularity == "full":
            raise ValueError("--recompute-activations means --recompute-granularity selective, but the command line "
                             "says --recompute-granularity full: give one of them")
        args.recompute_granularity = "selective"
    if args.recompute_memory_budget is not None:
        if args.recompute_granularity != "auto":
            raise ValueError(f"--recompute-memory-budget plans --recompute-granularity auto, but the command line "
                             f"forces --recompute-granularity {args.recompute_granularity}: drop one of them")
        if not args.recompute_memory_budget > 0:
            raise ValueError(f"--recompute-memory-budget {args.recompute_memory_budget}: use a positive number of GB")
    given = [flag for flag, value in (("--recompute-method", args.recompute_method),
                                      ("--recompute-num-layers", args.recompute_num_layers)) if value is not None]
    if args.recompute_granularity != "full":
        if given:
            raise ValueError(f"{given[0]} applies to --recompute-granularity full only (it needs "
                             f"--recompute-granularity full; {args.recompute_granularity} chooses its own layers)")
        if args.recompute_granularity == "none":
            args.recompute_granularity = None
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
