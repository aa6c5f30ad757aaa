"""The pretraining job fails loudly and cleanly: non-finite values, damaged checkpoints.

In-process runs use the gloo worker pool with the job's real model, engine and training loop
(tests/pretrain_jobs.py), and plant an inf in the data; the end-to-end runs start the job as
processes and read what each rank prints and its exit code.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess

import pytest
import torch

from launch import errors
from launch.args import parse_and_check
from tests.pretrain_jobs import fused_after_resume, run_job
from tests.pretrain_runs import GLOBAL_BATCH, MODEL, bare_ranks, read_metrics, write_config


@pytest.fixture(scope="session")
def config(tmp_path_factory) -> str:
    """ZeRO-1, one ring of 2 (DeepSpeed's ZeRO optimizer drops a step with non-finite gradients)."""
    return write_config(tmp_path_factory.mktemp("config") / "ring2.json", 2, 1, GLOBAL_BATCH)


def _argv(config: str, *extra: str) -> list[str]:
    return ["--deepspeed_config", config, "--ring-attention", *MODEL, "--log-interval", "1000", *extra]


def _tags(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("iter_"))


def _weights(directory, tag: str) -> dict[str, torch.Tensor]:
    module = torch.load(os.path.join(directory, tag, "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    return {k: v for k, v in module.items() if isinstance(v, torch.Tensor)}  # not Megatron's None extra states


@pytest.mark.parametrize("stage,pipeline", [(0, 1), (1, 1), (0, 2), (1, 2)])
def test_planted_inf_stops_every_rank_before_its_checkpoint(dist_pool, tmp_path, stage, pipeline):
    # An inf in one rank's loss mask at iteration 3 (one micro batch of 4 per step, or with a
    # pipeline of 2 stages, 4 ranks, two of 2); a checkpoint after every iteration. The loss is the masked
    # sum over the mask's sum: inf / inf = nan. The gradients: DeepSpeed's ZeRO optimizer checks them
    # (stage 1); under stage 0 it does not, and the job does (ring_sp.pipeline's engine with a pipeline).
    config = write_config(tmp_path / "ring2.json", 2, stage, GLOBAL_BATCH // pipeline)
    save = str(tmp_path / "ckpt")
    argv = _argv(config, "--save", save, "--save-interval", "1", "--pipeline-model-parallel-size", str(pipeline))
    results = dist_pool(2 * pipeline).run(run_job, argv, [2 * pipeline])  # iteration 3's first micro step
    for r in results:  # every rank stops, with the same message, which rank 0 alone prints
        assert r["exit_code"] == 1 and r["agreed"], r
        assert r["error"].startswith("iteration 3: the loss is nan and the gradient norm is not finite"), r["error"]
        assert "the last finite loss was" in r["error"] and "at iteration 2" in r["error"]
        assert "lower --lr (now 0.01)" in r["error"] and "check the data" in r["error"]
    assert _tags(save) == ["iter_0000001", "iter_0000002"]  # nothing saved at or after the inf
    assert open(os.path.join(save, "latest")).read() == "iter_0000002"


def test_skip_policy_drops_the_step_and_goes_on(dist_pool, config, tmp_path):
    save, metrics = str(tmp_path / "ckpt"), str(tmp_path / "m.jsonl")
    argv = _argv(config, "--nan-policy", "skip", "--train-iters", "4", "--save", save, "--save-interval", "1",
                 "--metrics-file", metrics)
    assert dist_pool(2).run(run_job, argv, [2]) == [{"error": None}] * 2
    logged = read_metrics(metrics)
    assert math.isnan(logged[3]["loss"]) and all(math.isfinite(logged[i]["loss"]) for i in (1, 2, 4))
    before, skipped, after = (_weights(save, f"iter_{i:07d}") for i in (2, 3, 4))
    assert before and all(torch.equal(before[k], skipped[k]) for k in before)  # iteration 3 changed no weight ...
    assert not all(torch.equal(skipped[k], after[k]) for k in skipped)  # ... iteration 4 did


def test_skip_policy_stops_after_the_limit(dist_pool, config, tmp_path):
    argv = _argv(config, "--nan-policy", "skip", "--nan-skip-limit", "3")
    for r in dist_pool(2).run(run_job, argv, [1, 2, 3]):  # iterations 2, 3, 4
        assert r["exit_code"] == 1 and r["agreed"], r
        assert r["error"].startswith("iteration 4: the loss is nan"), r["error"]
        assert "3 iterations in a row were not finite (--nan-skip-limit 3)" in r["error"]
        assert "the last finite loss was" in r["error"] and "at iteration 1" in r["error"]


@pytest.mark.slow
def test_huge_learning_rate_ends_the_job_with_one_line(config, tmp_path):
    # The issue's `--lr 1e6`: the loss turns nan. Exit code 1 on every rank, one line (rank 0's), no
    # traceback, and no checkpoint from the first non-finite iteration on.
    save = str(tmp_path / "ckpt")
    procs = bare_ranks(2, _argv(config, "--lr", "1e6", "--train-iters", "30", "--save", save, "--save-interval", "1"),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], errs
    assert errs[1].strip() == "", errs[1]
    (line,) = errs[0].strip().splitlines()
    found = re.match(r"\[rank 0\] error: iteration (\d+): the loss is nan", line)
    assert found and "(the last finite loss was" in line and "lower --lr (now 1e+06)" in line, line
    first_bad = int(found.group(1))
    assert first_bad >= 2 and _tags(save) == [f"iter_{i:07d}" for i in range(1, first_bad)]


@pytest.fixture(scope="module")
def saved(dist_pool, config, tmp_path_factory) -> str:
    """A checkpoint directory with iter_0000001 and iter_0000002 (ring 2, ZeRO-1, 2 ranks)."""
    save = str(tmp_path_factory.mktemp("saved") / "ckpt")
    argv = _argv(config, "--train-iters", "2", "--save", save, "--save-interval", "1")
    assert dist_pool(2).run(run_job, argv, []) == [{"error": None}] * 2
    assert _tags(save) == ["iter_0000001", "iter_0000002"]
    return save


def _damaged_copy(saved: str, tmp_path, name: str) -> str:
    """A copy of ``saved`` whose file ``name`` (under iter_0000002, or ``latest``) is damaged."""
    copy = str(tmp_path / "ckpt")
    shutil.copytree(saved, copy)
    if name == "latest":
        with open(os.path.join(copy, "latest"), "w") as f:
            f.write("iter_0000009")
    else:
        path = os.path.join(copy, "iter_0000002", name)
        os.truncate(path, os.path.getsize(path) // 2)
    return copy


@pytest.mark.parametrize("name,says", [
    ("mp_rank_00_model_states.pt", "iter_0000002/mp_rank_00_model_states.pt is truncated or damaged"),
    ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "iter_0000002/zero_pp_rank_0_mp_rank_00_optim_states.pt is "
                                                  "truncated or damaged"),
    ("zero_pp_rank_1_mp_rank_00_optim_states.pt", "iter_0000002/zero_pp_rank_1_mp_rank_00_optim_states.pt is "
                                                  "truncated or damaged"),
    ("ring_sp.json", "iter_0000002/ring_sp.json is missing or unreadable"),
    ("latest", "'latest' names iter_0000009, which does not exist"),
])
def test_damaged_checkpoint_is_named_before_start_up(monkeypatch, saved, config, tmp_path, name, says):
    copy = _damaged_copy(saved, tmp_path, name)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError) as info:
        parse_and_check(_argv(config, "--load", copy))
    fallback = "iter_0000002" if name == "latest" else "iter_0000001"
    assert str(info.value).startswith(f"--load {copy}: {says}"), str(info.value)
    assert str(info.value).endswith(f"the previous complete checkpoint is {fallback}: to resume from it, write its "
                                    f"name into {copy}/latest")
    # the intact checkpoint itself passes the same check
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parse_and_check(_argv(config, "--load", saved))[0].load_tag == "iter_0000002"


@pytest.mark.slow
def test_damaged_checkpoint_ends_every_rank_with_one_line(saved, config, tmp_path):
    copy = _damaged_copy(saved, tmp_path, "mp_rank_00_model_states.pt")
    size = {d: os.path.getsize(os.path.join(d, "iter_0000002", "mp_rank_00_model_states.pt")) for d in (saved, copy)}
    procs = bare_ranks(2, _argv(config, "--load", copy), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for rank, p in enumerate(procs):
        err = p.communicate(timeout=120)[1]
        assert p.returncode == 2, err
        assert err.strip().splitlines() == [
            f"[rank {rank}] error: --load {copy}: iter_0000002/mp_rank_00_model_states.pt is truncated or damaged "
            f"({size[copy]} bytes, {size[saved]} when saved); the previous complete checkpoint is iter_0000001: to "
            f"resume from it, write its name into {copy}/latest"], err


def test_changed_bytes_are_found_by_their_checksum_after_start_up(dist_pool, saved, config, tmp_path):
    # Same size, different content: only the SHA-256 (checked by the ranks together after start-up) sees it.
    copy = str(tmp_path / "ckpt")
    shutil.copytree(saved, copy)
    path = os.path.join(copy, "iter_0000002", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    for r in dist_pool(2).run(run_job, _argv(config, "--load", copy), []):
        assert r["exit_code"] == 2 and r["agreed"], r
        assert r["error"] == (f"--load {copy}: iter_0000002/zero_pp_rank_1_mp_rank_00_optim_states.pt is damaged: its "
                              f"SHA-256 differs from the one recorded when it was saved; the previous complete "
                              f"checkpoint is iter_0000001: to resume from it, write its name into {copy}/latest")
    manifest = json.load(open(os.path.join(copy, "iter_0000002", "ring_sp.json")))
    assert sorted(manifest["files"]) == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                         "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_a_backend_that_cannot_run_stops_every_rank_as_bad_input(dist_pool, tmp_path):
    # Found at the first ring attention, after start-up; ring_attention makes every rank raise alike.
    config = write_config(tmp_path / "no_backend.json", 2, 1, GLOBAL_BATCH, backend=None)
    for r in dist_pool(2).run(run_job, _argv(config, "--ring-backend", "sdpa_cudnn"), []):
        assert r["exit_code"] == 2 and r["error"].startswith("backend='sdpa_cudnn' cannot compute"), r


GLOO_PEER = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:22191: Connection "
             "reset by peer. This is typically caused by a remote worker hanging or bugs in the application.")


@pytest.mark.parametrize("error,rank,code,printed", [
    (ValueError("--seq-length 66: use a multiple of 4"), 1, 2, "[rank 1] error: --seq-length 66: use a multiple of 4"),
    (errors.ConfigError("--load d: damaged", agreed=True), 0, 2, "[rank 0] error: --load d: damaged"),
    (errors.ConfigError("--load d: damaged", agreed=True), 1, 2, None),  # rank 0 speaks for all
    (errors.RunError("iteration 3: the loss is nan", agreed=True), 1, 1, None),
    (errors.RunError("iteration 3: the loss is nan", agreed=True), 0, 1,
     "[rank 0] error: iteration 3: the loss is nan"),
    (RuntimeError(GLOO_PEER), 1, 1, "[rank 1] error: another rank stopped (its own output says why), so this one "
                                    "cannot go on (connection reset by peer)"),
])
def test_one_line_and_an_exit_code_per_failure(capsys, error, rank, code, printed):
    with pytest.raises(SystemExit) as info, errors.reported(rank, debug=False):
        raise error
    assert info.value.code == code
    assert capsys.readouterr().err.splitlines() == ([printed] if printed else [])


@pytest.mark.parametrize("error,debug", [(RuntimeError("an unforeseen bug"), False), (ValueError("bad input"), True),
                                         (errors.RunError("the loss is nan", agreed=True), True)])
def test_the_unforeseen_and_debug_keep_the_traceback(error, debug):
    with pytest.raises(type(error)), errors.reported(0, debug=debug):
        raise error


def test_a_checkpoint_from_before_the_fused_adamw_resumes_fused(dist_pool, config, tmp_path):
    """torch's Optimizer.load_state_dict takes the saved groups' settings: a checkpoint whose AdamW groups say
    fused None (saved before the job's AdamW was fused) must not resume on the for-each path."""
    directory = str(tmp_path / "ckpt")
    got = dist_pool(2).run(fused_after_resume, _argv(config, "--train-iters", "1"), directory)
    assert got == [["AdamW", True, True]] * 2, got
