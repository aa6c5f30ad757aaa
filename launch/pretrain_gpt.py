"""Long-context GPT pretraining with ring attention: Megatron-core's GPT, DeepSpeed's engine.

    deepspeed --num_gpus 2 launch/pretrain_gpt.py --deepspeed_config deepspeed_configs/cpu_demo.json \\
        --ring-attention --seq-length 256 --train-iters 300          # CPU: gloo, 2 ranks = one ring
    deepspeed --num_gpus 8 launch/pretrain_gpt.py --deepspeed_config deepspeed_configs/node_8gpu.json \\
        --ring-attention --seq-length 32768 --num-layers 12 --hidden-size 1024 --num-attention-heads 16
    torchrun --nproc-per-node 2 launch/pretrain_gpt.py --ring-attention --context-parallel-size 2

Every sequence of --seq-length tokens is sharded over a ring of --context-parallel-size ranks
(the DeepSpeed config's ``ring_attention.size``); every layer's attention runs over the whole
sequence by passing K/V blocks around the ring. Ranks are placed tensor × ring × data × pipeline
(ring_sp.topology); ZeRO reduces gradients over data × ring. With --pipeline-model-parallel-size P > 1
DeepSpeed's pipeline engine runs P stages of the model (1F1B over the step's micro batches).

Data: without --data-path, an embedded recall task (launch/data.py) whose answers need a fact
from far back in the sequence, often held by another rank; validation reports accuracy on
answers whose fact is on another rank ("cross-shard") and on the same rank, against chance.
With --data-path PREFIX, Megatron's indexed dataset (PREFIX.bin / PREFIX.idx).

The pieces: launch/args.py (flags, checked with the JSON and the checkpoint to load before
Megatron-core or DeepSpeed is imported), launch/model.py (the GPT), launch/job.py (groups, engine,
one step), launch/gpt_pipe.py and launch/pipeline_job.py (the same with pipeline stages),
launch/train.py (the loop), launch/checkpoint.py, launch/nonfinite.py (--nan-policy),
launch/errors.py (one line per failure: exit code 2 for unusable input, 1 for a failed run).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from launch import errors, quiet  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    rank = int(os.environ.get("RANK", "0"))
    with errors.reported(rank, debug="--debug" in argv):
        from launch import ds_config
        from launch.args import parse_and_check

        args, config = parse_and_check(argv)  # every rank alike, before any process group: nothing can hang
        quiet.configure(args.verbose, rank)
        ds_config.check_zero_section(config, args.deepspeed_config or "the DeepSpeed config")  # imports DeepSpeed
        from launch.train import train

        train(args, config)


if __name__ == "__main__":
    main()
