"""DeepSpeed JSON configs with a ``"ring_attention"`` section: loaded, checked, and merged with the flags.

Checked before any process group exists, from what every rank knows alike (the file, the
command line, WORLD_SIZE), so a bad config stops every rank with the same ``ValueError`` and
nothing can hang. The rules:

- Top-level keys must be DeepSpeed keys this job uses (``KNOWN_KEYS``) or ``"ring_attention"``;
  keys starting with ``_`` are comments. ``"optimizer"`` / ``"scheduler"`` are refused: the job
  builds AdamW and its schedule from Megatron's flags (``--lr``, ``--lr-decay-style``, ...);
  so is ``"activation_checkpointing"`` (``--recompute-granularity`` does it).
- ``"ring_attention"``: the JSON keys of ``ring_sp.options.RingOptions`` (``size`` =
  ``--context-parallel-size``, ``layout``, ``backend``, ``max_lookback``, ``reduce_col``,
  ``bucket_size``), each filling its flag; it needs ``--ring-attention``.
- ``"pipeline"`` (DeepSpeed's section): ``stages`` (= ``--pipeline-model-parallel-size``),
  ``pipe_partitioned``, ``grad_partitioned``.
- A value given both in the file and explicitly on the command line must agree; what only one
  of them gives fills the other. The ring, tensor and pipeline sizes must divide the world, the
  sequence length must split as the layout needs, and train_batch_size = micro batch ×
  gradient accumulation × data-parallel size.
- ``zero_optimization`` is checked against DeepSpeed's own schema by :func:`check_zero_section`,
  separately, because that imports DeepSpeed (seconds) and the rest of the checks need not wait.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json

from ring_sp.layout import check_seq_len
from ring_sp.options import OPTIONS, Json, check_option, json_keys

RING_KEYS = json_keys()  # ring_attention key -> RingOptions field
KNOWN_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "steps_per_print",
    "wall_clock_breakdown", "memory_breakdown", "dump_state", "bf16", "fp16", "torch_autocast", "data_types",
    "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "gradient_clipping",
    "prescale_gradients", "gradient_predivide_factor", "communication_data_type", "disable_allgather",
    "seq_parallel_communication_data_type", "flops_profiler", "comms_logger",
    "tensorboard", "wandb", "csv_monitor", "checkpoint", "aio", "sparse_gradients", "dataloader_drop_last",
    "ring_attention", "pipeline",
}
# DeepSpeed's "pipeline" keys the job reads; stages = --pipeline-model-parallel-size
PIPELINE_KEYS = ("stages", "pipe_partitioned", "grad_partitioned")


def load(path: str) -> dict:
    """Read a JSON config; ValueError naming the file on a missing file or bad JSON."""
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--deepspeed_config {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed_config {path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"--deepspeed_config {path}: the top level must be a JSON object")
    return config


def explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The argparse destinations that ``argv`` sets explicitly (not left at their defaults)."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    namespace, _ = quiet.parse_known_args(argv)
    return set(vars(namespace))


def _unknown(key: str, known, where: str) -> ValueError:
    near = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ValueError(f"{where}: unknown key {key!r}{hint}; known keys: {', '.join(sorted(known))}")


def _merge(args, explicit: set[str], dest: str, flag: str, value, where: str) -> None:
    """Put a config value on ``args`` unless the command line said something else explicitly."""
    if dest in explicit and getattr(args, dest) != value:
        raise ValueError(f"{where} is {value!r} but the command line says {flag} {getattr(args, dest)!r}: "
                         "make them agree or drop one of them")
    setattr(args, dest, value)


def _check_ring_section(section, where: str) -> None:
    if not isinstance(section, dict):
        raise ValueError(f"{where} must be a JSON object with keys {', '.join(RING_KEYS)}")
    for key in section:
        if key not in RING_KEYS:
            raise _unknown(key, RING_KEYS, where)
    for key, value in section.items():
        check_option(RING_KEYS[key], value, Json(where))


def _merge_pipeline_section(config: dict, args, explicit: set[str], source: str) -> None:
    """``"pipeline": {"stages": P, ...}`` (DeepSpeed's section) and --pipeline-model-parallel-size: one value."""
    section = config.get("pipeline", {})
    if not isinstance(section, dict):
        raise ValueError(f"{source}: pipeline must be a JSON object with keys {', '.join(PIPELINE_KEYS)}")
    for key in section:
        if key not in PIPELINE_KEYS:
            raise _unknown(key, PIPELINE_KEYS, f"{source}: pipeline")
    if "stages" in section:
        _merge(args, explicit, "pipeline_model_parallel_size", "--pipeline-model-parallel-size", section["stages"],
               f"{source}: pipeline.stages")
    pp = args.pipeline_model_parallel_size
    if isinstance(pp, bool) or not isinstance(pp, int) or pp < 1:
        raise ValueError(f"--pipeline-model-parallel-size / pipeline.stages = {pp!r}: use a positive integer")
    if pp > 1:
        config["pipeline"] = {**section, "stages": pp}


def check_zero_section(config: dict, source: str) -> None:
    """DeepSpeed's own schema for ``zero_optimization`` (unknown keys, bad values); ValueError naming the file.

    Imports DeepSpeed, so the job calls it after :func:`resolve` has checked everything else."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        DeepSpeedZeroConfig(**config.get("zero_optimization", {}))
    except Exception as e:  # pydantic's ValidationError: unknown keys, bad values
        raise ValueError(f"{source}: zero_optimization is invalid: {e}") from None


def _positive(config: dict, key: str, where: str):
    value = config.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{where}: {key} = {value!r}: use a positive integer")
    return value


def resolve(config: dict, args: argparse.Namespace, explicit: set[str], world_size: int,
            source: str = "the DeepSpeed config") -> dict:
    """Check ``config`` against itself, the command line and the world; return the completed config.

    ``args`` is updated in place with what the config decides (ring options, batch sizes,
    precision, clipping); ``explicit`` is :func:`explicit_dests` of the command line.
    """
    config = copy.deepcopy(config)
    for key in config:
        if key.startswith("_"):
            continue
        if key in ("optimizer", "scheduler"):
            raise ValueError(f"{source}: {key!r} is not read by this job, which builds AdamW and its learning-rate "
                             "schedule from Megatron's flags (--lr, --min-lr, --lr-warmup-iters, --lr-decay-style, "
                             "--weight-decay, --adam-beta1/2): remove the section and pass those flags")
        if key == "activation_checkpointing":
            raise ValueError(f"{source}: 'activation_checkpointing' is not read by this job (the model does not call "
                             "DeepSpeed's checkpointing): remove it and pass Megatron's --recompute-granularity full "
                             "(or --recompute-activations for attention only)")
        if key not in KNOWN_KEYS:
            raise _unknown(key, KNOWN_KEYS, source)
    config = {k: v for k, v in config.items() if not k.startswith("_")}

    # ring attention
    ring = config.get("ring_attention")
    if ring is not None:
        where = f"{source}: ring_attention"
        _check_ring_section(ring, where)
        if not getattr(args, "ring_attention", False):
            raise ValueError(f"{source} has a ring_attention section but --ring-attention was not given: add "
                             "--ring-attention, or remove the section to train without ring attention")
        for key, value in ring.items():
            dest, flag = OPTIONS[RING_KEYS[key]].json_target
            _merge(args, explicit, dest, flag, value, f"{where}.{key}")
    _merge_pipeline_section(config, args, explicit, source)
    cp = args.context_parallel_size
    if cp > 1 and not getattr(args, "ring_attention", False):
        raise ValueError(f"--context-parallel-size {cp} needs --ring-attention (the ring is the context-parallel "
                         "group; Megatron's own context parallelism needs Transformer Engine)")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size % (tp * pp * cp):
        raise ValueError(
            f"{world_size} ranks cannot be split into tensor {tp} × pipeline {pp} × ring {cp} (= {tp * pp * cp}) "
            f"× data: choose sizes whose product divides {world_size} (ring size: ring_attention.size in {source} "
            "or --context-parallel-size)")
    data = world_size // (tp * pp * cp)
    if getattr(args, "ring_attention", False):
        try:
            check_seq_len(args.ring_layout, args.seq_length, cp)
        except ValueError as e:
            raise ValueError(f"--seq-length {args.seq_length}: {e} (ring size {cp}, layout {args.ring_layout!r}); "
                             "change --seq-length or the layout") from None

    # batch sizes
    where = f"{source}"
    micro = _positive(config, "train_micro_batch_size_per_gpu", where)
    total = _positive(config, "train_batch_size", where)
    accum = _positive(config, "gradient_accumulation_steps", where)
    if micro is not None:
        _merge(args, explicit, "micro_batch_size", "--micro-batch-size", micro,
               f"{source}: train_micro_batch_size_per_gpu")
    if total is not None:
        _merge(args, explicit, "global_batch_size", "--global-batch-size", total, f"{source}: train_batch_size")
    micro = args.micro_batch_size
    if args.global_batch_size is None:
        args.global_batch_size = micro * (accum or 1) * data
    total = args.global_batch_size
    if accum is None:
        accum, rest = divmod(total, micro * data)
        if rest or accum < 1:
            raise ValueError(f"global batch {total} is not a multiple of micro batch {micro} × data-parallel size "
                             f"{data} (world {world_size} / (tensor {tp} × pipeline {pp} × ring {cp})): change "
                             "--global-batch-size / train_batch_size or --micro-batch-size")
    if total != micro * accum * data:
        raise ValueError(f"train_batch_size {total} != micro batch {micro} × gradient_accumulation_steps {accum} × "
                         f"data-parallel size {data} (world {world_size} / (tensor {tp} × pipeline {pp} × ring "
                         f"{cp})): fix one of them")
    config.update(train_batch_size=total, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)

    # precision and clipping
    for name, dest in (("bf16", "bf16"), ("fp16", "fp16")):
        section = config.get(name)
        if section is not None:
            if not isinstance(section, dict) or not isinstance(section.get("enabled", False), bool):
                raise ValueError(f"{source}: {name} must be an object like {{\"enabled\": true}}")
            _merge(args, explicit, dest, f"--{name}", section.get("enabled", False), f"{source}: {name}.enabled")
        elif getattr(args, dest):
            config[name] = {"enabled": True}
    if args.bf16 and args.fp16:
        raise ValueError(f"bf16 and fp16 are both enabled ({source} / --bf16 / --fp16): pick one")
    if "gradient_clipping" in config:
        _merge(args, explicit, "clip_grad", "--clip-grad", float(config["gradient_clipping"]),
               f"{source}: gradient_clipping")
    config["gradient_clipping"] = args.clip_grad

    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ValueError(f"{source}: zero_optimization must be an object whose stage is 0, 1, 2 or 3 "
                         f"(got {zero!r})")
    if zero.get("stage", 0) == 3 and cp > 1:  # see ring_sp.topology.partition_for_zero3
        if zero.get("reduce_scatter", False):
            raise ValueError(f"{source}: zero_optimization.reduce_scatter is true, but with ZeRO-3 and a ring "
                             "DeepSpeed's reduce-scatter averages gradients over the ring instead of summing them: set "
                             "it to false or leave it out")
        config["zero_optimization"] = {**zero, "reduce_scatter": False}
    if zero.get("stage", 0) == 3 and tp > 1:
        raise ValueError(f"{source}: ZeRO stage 3 with --tensor-model-parallel-size {tp} is not supported by this "
                         "job: use stage 1 or 2 with tensor parallelism")
    config.setdefault("steps_per_print", 10**9)  # the job prints its own progress
    if ring is not None or getattr(args, "ring_attention", False):
        config["ring_attention"] = {key: getattr(args, OPTIONS[name].json_target[0]) for key, name in RING_KEYS.items()}
    return config
