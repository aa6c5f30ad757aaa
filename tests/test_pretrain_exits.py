"""launch/pretrain_gpt.py ends cleanly: a bad config fails fast on every rank (before Megatron-core or
DeepSpeed is imported), an unknown JSON key under the real DeepSpeed launcher, and a rank killed while
saving ends the run with one line and leaves a checkpoint that resumes."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import time

import pytest

from tests.pretrain_runs import (
    DEEPSPEED,
    GLOBAL_BATCH,
    MODEL,
    ROOT,
    SCRIPT,
    bare_ranks,
    deepspeed_run,
    free_port,
    job_env,
    read_metrics,
    write_config,
)

pytestmark = pytest.mark.slow


BAD = [
    ("ring does not divide the world", 3, {"ring_attention": {"size": 2}}, [],
     "3 ranks cannot be split into tensor 1 × pipeline 1 × ring 2"),
    ("zigzag, indivisible length", 2, {"ring_attention": {"size": 2, "layout": "zigzag"}}, ["--seq-length", "66"],
     "--seq-length 66: sequence length 66 cannot be sharded with layout='zigzag' over 2 ranks"),
    ("pipeline does not divide the layers", 2, {"ring_attention": {"size": 1}},
     ["--pipeline-model-parallel-size", "2", "--num-layers", "3"],
     "--pipeline-model-parallel-size 2 does not divide --num-layers 3"),
]


@pytest.mark.parametrize("what,nproc,config,extra,message", BAD, ids=[b[0] for b in BAD])
def test_bad_config_fails_fast_on_every_rank(tmp_path, what, nproc, config, extra, message):
    # One line per rank, exit code 2, and neither Megatron-core nor DeepSpeed imported (they take most of
    # the start-up): Python's import profile (PYTHONPROFILEIMPORTTIME) lists every module imported.
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    procs = bare_ranks(nproc, ["--deepspeed_config", str(path), "--ring-attention", *MODEL, *extra],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, profile_imports=True)
    for rank, p in enumerate(procs):
        _, err = p.communicate(timeout=120)
        lines = err.splitlines()
        said = [line for line in lines if not line.startswith("import time:")]
        imported = {line.split("|")[-1].strip().split(".")[0] for line in lines if line.startswith("import time:")}
        assert p.returncode == 2, err[-3000:]
        assert len(said) == 1 and said[0].startswith(f"[rank {rank}] error: ") and message in said[0], said
        assert "torch" in imported and not imported & {"megatron", "deepspeed"}, sorted(imported)


def test_unknown_key_fails_fast_under_the_deepspeed_launcher(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"ring_attention": {"size": 2, "layuot": "zigzag"}}))
    done = subprocess.run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), SCRIPT,
                           "--deepspeed_config", str(path), "--ring-attention", *MODEL], cwd=ROOT, env=job_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    # the launcher ends the other rank once one has exited, maybe before it printed: one line at least
    said = re.findall(r"\[rank \d\] error: .*", done.stderr)
    assert said and all(line.endswith(f"{path}: ring_attention: unknown key 'layuot' (did you mean 'layout'?); "
                                      "known keys: backend, bucket_size, layout, max_lookback, reduce_col, size")
                        for line in said), said


def test_rank_killed_while_saving_ends_the_run_and_latest_still_resumes(tmp_path):
    # The job saves after every iteration. While a save is under way (its .partial directory exists) both
    # ranks are frozen (SIGSTOP) and rank 0, which alone renames the tag and rewrites `latest`, is killed;
    # rank 1 goes on. It must stop with one error line, not hang; `latest` must still name a complete
    # checkpoint, and a run resumed from it must save the killed iteration over the partial one.
    config = write_config(tmp_path / "ring.json", 2, 1, GLOBAL_BATCH)
    save, metrics = str(tmp_path / "ckpt"), str(tmp_path / "killed.jsonl")
    argv = ["--deepspeed_config", config, "--ring-attention", *MODEL, "--train-iters", "1000", "--save", save,
            "--save-interval", "1", "--metrics-file", metrics, "--distributed-timeout-minutes", "0.5"]
    logs = [open(tmp_path / f"rank{r}.log", "w") for r in range(2)]
    procs = bare_ranks(2, argv, logs)
    partial = None
    try:
        deadline = time.monotonic() + 240
        while partial is None:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                open(tmp_path / "rank0.log").read()[-3000:]
            found = glob.glob(os.path.join(save, "iter_*.partial"))
            if found and max(read_metrics(metrics), default=0) >= 3:
                for p in procs:
                    p.send_signal(signal.SIGSTOP)
                if os.path.isdir(found[0]):
                    partial = found[0]  # frozen mid-save
                else:  # the save finished in between: try the next one
                    for p in procs:
                        p.send_signal(signal.SIGCONT)
            time.sleep(0.001)
        procs[0].send_signal(signal.SIGKILL)
        procs[1].send_signal(signal.SIGCONT)
        killed_at = time.monotonic()
        procs[1].wait(timeout=30 + 60)  # the configured 0.5 min, plus slack for a loaded machine
        survivor_exit = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
    log = open(tmp_path / "rank1.log").read()
    assert procs[1].returncode == 1 and survivor_exit < 90, log[-3000:]
    assert log.strip().splitlines()[-1].startswith("[rank 1] error: another rank stopped") and "Traceback" not in log
    killed = int(os.path.basename(partial)[len("iter_"):-len(".partial")])
    assert os.path.isdir(partial)  # the kill left it half-written ...
    assert open(os.path.join(save, "latest")).read() == f"iter_{killed - 1:07d}"  # ... and `latest` never named it
    logged = read_metrics(metrics)
    resumed = deepspeed_run(tmp_path, "after_kill", 2, 2, 1, ["--load", save, "--save", save, "--train-iters", "1000",
                                                                "--exit-interval", str(killed)])
    assert sorted(resumed) == [killed] and resumed[killed]["loss"] == logged[killed]["loss"]
    assert open(os.path.join(save, "latest")).read() == f"iter_{killed:07d}" and not os.path.exists(partial)
