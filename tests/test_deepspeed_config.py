"""DeepSpeed JSON configs: the shipped ones resolve for their launch commands; bad ones fail with a message."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess

import pytest

from launch import ds_config
from launch.args import parse_and_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "deepspeed_configs", "*.json")))


def _check(monkeypatch, world: int, argv: list[str], config: dict | None = None, tmp_path=None):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    if config is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(config))
        argv = ["--deepspeed_config", str(path), *argv]
    return parse_and_check(argv)


def _world(command: list[str]) -> int:
    nodes = int(command[command.index("--num_nodes") + 1]) if "--num_nodes" in command else 1
    return nodes * int(command[command.index("--num_gpus") + 1])


def _demo_command(demo_args: str = "") -> str:
    """`make demo DEMO_ARGS=...`'s command line, as make would run it."""
    # under `make test` this is a sub-make: drop the parent's flags so no "Entering directory" lines appear
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    out = subprocess.run(["make", "-s", "--no-print-directory", "-n", "-o", ".venv/.installed", "demo",
                          f"DEMO_ARGS={demo_args}"], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=env).stdout
    return out.replace("\\\n", " ")


def test_shipped_configs_resolve_for_their_launch_commands(monkeypatch):
    assert {os.path.basename(c) for c in CONFIGS} >= {"cpu_demo.json", "node_8gpu.json", "multinode_2x8.json"}
    monkeypatch.chdir(ROOT)
    for path in CONFIGS:
        raw = json.load(open(path))
        # cpu_demo.json's command is the Makefile's demo target
        command = shlex.split(raw["_launch"] if "_launch" in raw else _demo_command())
        argv = command[command.index("launch/pretrain_gpt.py") + 1:]
        assert argv[argv.index("--deepspeed_config") + 1] == os.path.relpath(path, ROOT)
        args, config = _check(monkeypatch, _world(command), argv)
        assert config["ring_attention"]["size"] == args.context_parallel_size == raw["ring_attention"]["size"]
        assert config["train_batch_size"] == raw.get("train_batch_size", config["train_batch_size"])
        if "--hostfile" in command:
            hostfile = command[command.index("--hostfile") + 1]
            assert os.path.exists(hostfile)


def _demo_argv(demo_args: str = "") -> list[str]:
    command = shlex.split(_demo_command(demo_args))
    return command[command.index("launch/pretrain_gpt.py") + 1:]


def test_each_demo_run_has_its_own_directory_and_takes_a_backend(monkeypatch):
    argv = _demo_argv()
    save = argv[argv.index("--save") + 1]
    assert re.fullmatch(r"runs/demo-\d{8}-\d{6}", save) and argv[argv.index("--plot") + 1] == f"{save}/loss.png"
    monkeypatch.chdir(ROOT)
    args, config = _check(monkeypatch, 2, _demo_argv("--no-ring-reduce-col --ring-backend sdpa"))
    assert (args.ring_reduce_col, args.ring_backend, config["ring_attention"]["backend"]) == (False, "sdpa", "sdpa")
    args, _ = _check(monkeypatch, 2, _demo_argv("--save runs/mine"))  # given --save, the run goes there
    assert (args.save, args.plot) == ("runs/mine", None)


def test_command_line_fills_what_the_config_leaves_out(monkeypatch, tmp_path):
    args, config = _check(monkeypatch, 4, ["--ring-attention", "--micro-batch-size", "3", "--seq-length", "64"],
                          {"ring_attention": {"size": 2, "layout": "striped"}}, tmp_path)
    assert (args.context_parallel_size, args.ring_layout, args.global_batch_size) == (2, "striped", 6)
    assert config["train_batch_size"] == 6 and config["gradient_accumulation_steps"] == 1
    assert config["ring_attention"]["layout"] == "striped" and config["gradient_clipping"] == 1.0
    args, config = _check(monkeypatch, 2, ["--global-batch-size", "8", "--micro-batch-size", "2"], None)
    assert config["gradient_accumulation_steps"] == 2 and "ring_attention" not in config


def test_untie_embeddings_as_megatron_lm_takes_it(monkeypatch):
    """Megatron-LM command lines carry --untie-embeddings-and-output-weights: it is this job's default (the model
    builders read tie_embeddings_and_output_weights), and it contradicts --tie-embeddings-and-output-weights."""
    args, _ = _check(monkeypatch, 1, ["--untie-embeddings-and-output-weights"])
    assert args.tie_embeddings_and_output_weights is False
    assert _check(monkeypatch, 1, ["--tie-embeddings-and-output-weights"])[0].tie_embeddings_and_output_weights
    with pytest.raises(ValueError, match="choose one"):
        _check(monkeypatch, 1, ["--tie-embeddings-and-output-weights", "--untie-embeddings-and-output-weights"])


def test_recompute_flags_as_megatron_lm_takes_them(monkeypatch):
    args, _ = _check(monkeypatch, 1, [])  # auto: the job plans it once it knows its memory (launch/recompute.py)
    assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers) == ("auto", None, None)
    args, _ = _check(monkeypatch, 1, ["--recompute-granularity", "none"])
    assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers) == (None, None, None)
    args, _ = _check(monkeypatch, 1, ["--recompute-granularity", "full"])  # the defaults: every layer
    assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers) == ("full", "uniform", 1)
    args, _ = _check(monkeypatch, 1, ["--recompute-granularity", "full", "--recompute-method", "block",
                                      "--num-layers", "4", "--recompute-num-layers", "3"])
    assert (args.recompute_method, args.recompute_num_layers) == ("block", 3)
    args, _ = _check(monkeypatch, 1, ["--recompute-activations"])
    assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers) == ("selective", None, None)


BAD = [
    ({"train_micro_batch_size": 2}, [], 2, "unknown key 'train_micro_batch_size' (did you mean "
                                           "'train_micro_batch_size_per_gpu'?)"),
    ({"ring_attention": {"size": 2, "layuot": "zigzag"}}, ["--ring-attention"], 2, "unknown key 'layuot'"),
    ({"ring_attention": {"size": 3}}, ["--ring-attention", "--seq-length", "96"], 4,
     "4 ranks cannot be split into tensor 1 × pipeline 1 × ring 3"),
    ({"ring_attention": {"size": 2, "layout": "zigzag"}}, ["--ring-attention", "--seq-length", "66"], 2,
     "--seq-length 66: sequence length 66 cannot be sharded with layout='zigzag' over 2 ranks: it must be a "
     "multiple of 4"),
    ({"ring_attention": {"size": 2}}, ["--ring-attention", "--context-parallel-size", "4"], 8,
     "ring_attention.size is 2 but the command line says --context-parallel-size 4"),
    ({"ring_attention": {"size": 2, "layout": "zigzag"}}, ["--ring-attention", "--ring-layout", "striped"], 2,
     "ring_attention.layout is 'zigzag' but the command line says --ring-layout 'striped'"),
    ({"ring_attention": {"size": 2}}, [], 2, "has a ring_attention section but --ring-attention was not given"),
    ({"ring_attention": {"size": 0}}, ["--ring-attention"], 2, "ring_attention.size = 0: use a positive integer"),
    ({"ring_attention": {"size": 2, "reduce_col": "yes"}}, ["--ring-attention"], 2, "reduce_col = 'yes'"),
    ({"train_micro_batch_size_per_gpu": 2}, ["--micro-batch-size", "4"], 2,
     "train_micro_batch_size_per_gpu is 2 but the command line says --micro-batch-size 4"),
    ({"train_batch_size": 6, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}, [], 2,
     "train_batch_size 6 != micro batch 2 × gradient_accumulation_steps 1 × data-parallel size 2"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, [], 2, "builds AdamW and its learning-rate schedule"),
    ({"activation_checkpointing": {"partition_activations": True}}, [], 2,
     "'activation_checkpointing' is not read by this job"),
    ({"zero_optimization": {"stage": 4}}, [], 2, "zero_optimization must be an object whose stage is 0, 1, 2 or 3"),
    ({}, ["--lr", "fast"], 2, "argument --lr: invalid float value: 'fast' (--help lists the flags)"),
    ({}, ["--nan-policy", "ignore"], 2, "argument --nan-policy: invalid choice: 'ignore'"),
    ({}, ["--seq-lenght", "64"], 2, "unrecognized arguments: --seq-lenght 64 (--help lists the flags)"),
    ({}, ["--nan-skip-limit", "3"], 2, "--nan-skip-limit applies to --nan-policy skip only"),
    ({}, ["--nan-policy", "skip"], 2, "--nan-policy skip: with ZeRO stage 0 in fp32 DeepSpeed applies every"),
    ({"zero_optimization": {"stage": 1}}, ["--nan-policy", "skip", "--nan-skip-limit", "0"], 2,
     "--nan-skip-limit 0: use a positive integer"),
    ({"ring_attention": {"size": 2, "backend": "tirton"}}, ["--ring-attention"], 2,
     "ring_attention.backend = 'tirton': use \"auto\" or one of"),
    ({"bf16": {"enabled": False}}, ["--bf16"], 2, "bf16.enabled is False but the command line says --bf16 True"),
    ({}, ["--context-parallel-size", "2"], 2, "--context-parallel-size 2 needs --ring-attention"),
    ({"zero_optimization": {"stage": 3, "reduce_scatter": True}, "ring_attention": {"size": 2}}, ["--ring-attention"],
     2, "reduce_scatter is true, but with ZeRO-3 and a ring"),
    ({}, ["--ring-attention", "--context-parallel-size", "2", "--attention-dropout", "0.1"], 2,
     "--attention-dropout 0.1"),
    ({}, ["--recompute-method", "block"], 2, "--recompute-method applies to --recompute-granularity full only"),
    ({}, ["--recompute-granularity", "selective", "--recompute-num-layers", "1"], 2,
     "--recompute-num-layers applies to --recompute-granularity full only"),
    ({}, ["--recompute-activations", "--recompute-granularity", "full"], 2,
     "--recompute-activations means --recompute-granularity selective, but the command line says "
     "--recompute-granularity full"),
    ({}, ["--recompute-granularity", "full", "--recompute-num-layers", "3", "--num-layers", "2"], 2,
     "--recompute-num-layers 3: use 1 to --num-layers (2)"),
    ({}, ["--recompute-granularity", "full", "--recompute-num-layers", "2", "--num-layers", "3"], 2,
     "--recompute-num-layers 2 with --recompute-method uniform: it must divide --num-layers 3"),
]


@pytest.mark.parametrize("config,argv,world,message", BAD)
def test_bad_config_names_the_problem(monkeypatch, tmp_path, config, argv, world, message):
    with pytest.raises(ValueError) as info:
        _check(monkeypatch, world, argv, config, tmp_path)
    assert message in str(info.value)


def test_zero_section_is_checked_against_deepspeeds_schema():
    with pytest.raises(ValueError, match="ds.json: zero_optimization is invalid"):
        ds_config.check_zero_section({"zero_optimization": {"stage": 2, "overlap_com": True}}, "ds.json")
    ds_config.check_zero_section({"zero_optimization": {"stage": 2, "overlap_comm": True}}, "ds.json")


def test_unreadable_config(monkeypatch, tmp_path):
    (tmp_path / "broken.json").write_text("{\"train_batch_size\": 2,")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_and_check(["--deepspeed_config", str(tmp_path / "broken.json")])
    with pytest.raises(ValueError, match="no such file"):
        ds_config.load(str(tmp_path / "missing.json"))
