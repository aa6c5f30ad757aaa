"""launch/pretrain_gpt.py under the real DeepSpeed launcher (and as bare processes) on CPU with gloo.

A tiny GPT on the recall task, 6 iterations. Ring attention must reproduce a run without it (dense
attention, whole sequence per rank) on the same global batches; a stopped and resumed run, and runs
with activation recompute (full, selective), must reproduce an uninterrupted plain one exactly; bad
configs and dead ranks must end every process.
"""

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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The runs the loss comparisons share (each about 10-30 s on 2 CPU cores)."""
    tmp = tmp_path_factory.mktemp("pretrain")
    out = {"tmp": tmp}
    out["dense"] = deepspeed_run(tmp, "dense", 2, None, 1, ["--exit-interval", "4"])
    out["ring2"] = deepspeed_run(tmp, "ring2", 2, 2, 1, [])
    out["ring2_data2"] = deepspeed_run(tmp, "ring2_data2", 4, 2, 2, ["--exit-interval", "4"])
    out["ring2_zero3"] = deepspeed_run(tmp, "ring2_zero3", 2, 2, 3, ["--exit-interval", "4"])
    # One replica, as the ring of 2: with documents the scored tokens differ between samples, and the job
    # averages each replica's token mean (as Megatron does), so the data-parallel split must match.
    out["dense_docs"] = deepspeed_run(tmp, "dense_docs", 1, None, 1, ["--exit-interval", "4", *DOCUMENTS])
    out["ring2_docs"] = deepspeed_run(tmp, "ring2_docs", 2, 2, 1, ["--exit-interval", "4", *DOCUMENTS])
    return out


# Three recall episodes per sequence, learned positions restarting in every document, no loss at document ends.
DOCUMENTS = ["--recall-keys", "4", "--recall-documents", "3", "--position-embedding-type", "learned_absolute",
             "--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"]


def _close(a: dict, b: dict, iterations, rtol: float) -> None:
    for i in iterations:
        for key in ("loss", "grad_norm"):
            assert abs(a[i][key] - b[i][key]) <= rtol * abs(b[i][key]), (i, key, a[i][key], b[i][key])


@pytest.mark.parametrize("name", ["ring2", "ring2_data2", "ring2_zero3"])
def test_ring_attention_losses_match_dense_attention(runs, name):
    # dense: 2 ranks of data parallelism, whole sequences, ZeRO-1. ring2: one ring of 2, ZeRO-1.
    # ring2_data2: 4 ranks = ring 2 × data 2, ZeRO-2. ring2_zero3: one ring of 2, ZeRO-3.
    # Same global batches, same initial weights.
    dense, ring = runs["dense"], runs[name]
    assert sorted(dense) == [1, 2, 3, 4]
    _close(ring, dense, [1, 2, 3, 4], rtol=1e-5)  # seen: 1e-7
    assert dense[4]["loss"] < dense[1]["loss"] - 0.05  # it learns: the comparison is not of constants


def test_packed_documents_ring_matches_dense_attention(runs):
    """--reset-attention-mask --reset-position-ids --eod-mask-loss: ring 2 equals dense attention with the same
    document masks; the same data without the document mask gives another run (the flag takes effect)."""
    _close(runs["ring2_docs"], runs["dense_docs"], [1, 2, 3, 4], rtol=1e-5)
    unmasked = [f for f in DOCUMENTS if f != "--reset-attention-mask"]
    ring = deepspeed_run(runs["tmp"], "ring2_docs_unmasked", 2, 2, 1, ["--exit-interval", "2", *unmasked])
    dense = runs["dense_docs"]
    misses = max(abs(ring[i][k] - dense[i][k]) / abs(dense[i][k]) for i in (1, 2) for k in ("loss", "grad_norm"))
    assert misses > 10 * 1e-5, misses  # seen: the loss alone 3.6e-5 off at iteration 1 (near-uniform attention)


def test_tensor_parallel_ring_matches_dense_attention(runs):
    # 4 ranks = tensor 2 × ring 2, ZeRO-2: one set of groups serves Megatron's tensor parallelism,
    # the ring and ZeRO. Megatron initialises the full weights on CPU, then splits them, so the
    # reference is still the dense data-parallel run.
    ring = deepspeed_run(runs["tmp"], "tp2_ring2", 4, 2, 2, ["--exit-interval", "4"], tensor=2)
    _close(ring, runs["dense"], [1, 2, 3, 4], rtol=1e-5)


def test_pipeline_tensor_ring_matches_dense_attention(runs):
    # 8 ranks = pipeline 2 × ring 2 × tensor 2 (1 layer per stage), ZeRO-1, under the DeepSpeed launcher: the
    # pipeline engine's stages, their rings and tensor-parallel pairs reproduce the dense data-parallel run.
    # GLOBAL_BATCH in 2 micro batches of 2 (data 1), as the pipeline of 2 stages needs at least 2.
    ring = deepspeed_run(runs["tmp"], "p2_ring2_tp2", 8, 2, 1, ["--exit-interval", "4"], tensor=2, pipeline=2,
                         timeout=600)
    _close(ring, runs["dense"], [1, 2, 3, 4], rtol=1e-5)


def test_stopped_and_resumed_run_equals_uninterrupted_run(runs):
    tmp = runs["tmp"]
    save = str(tmp / "ckpt")
    # stopped under torchrun, resumed under the DeepSpeed launcher: the job runs under both
    quiet, verbose = [], []
    first = deepspeed_run(tmp, "stopped", 2, 2, 1, ["--exit-interval", "3", "--save", save], launcher="torchrun",
                          output=quiet)
    assert open(os.path.join(save, "latest")).read() == "iter_0000003"
    resumed = deepspeed_run(tmp, "resumed", 2, 2, 1, ["--load", save, "--verbose"], output=verbose)
    assert sorted(first) == [1, 2, 3] and sorted(resumed) == [4, 5, 6]
    # Megatron-core's and DeepSpeed's warnings are hidden, and shown with --verbose (torchrun adds nothing
    # of its own: what the first run printed is the job's; the DeepSpeed launcher logs its own lines)
    assert "Setting accelerator to CPU" not in quiet[0]
    for hidden in ("Transformer Engine and Apex are not installed", "UserWarning", "FutureWarning"):
        assert hidden not in quiet[0] and hidden in verbose[0], hidden
    uninterrupted = runs["ring2"]
    for i in range(1, 7):
        got = (first if i <= 3 else resumed)[i]
        assert (got["loss"], got["grad_norm"]) == (uninterrupted[i]["loss"], uninterrupted[i]["grad_norm"]), i


@pytest.mark.parametrize("name,flags,says", [
    ("full", ["--recompute-granularity", "full"], "recompute full (uniform: chunks of 1 layer)"),
    ("selective", ["--recompute-activations"], "recompute selective (core_attn)"),
], ids=["full", "selective"])
def test_activation_recompute_gives_the_same_run(runs, name, flags, says):
    # Megatron-core's recompute on CPU (gloo), ring of 2, ZeRO-1. full: every layer's forward runs again
    # in backward; selective: core attention, i.e. the ring attention with its K/V passing, runs again in
    # backward. The recomputed forward is the same arithmetic on the same inputs, so loss and gradient
    # norm are those of the ring2 run without recompute; seen: bitwise equal, every iteration.
    out = []
    got = deepspeed_run(runs["tmp"], f"recompute_{name}", 2, 2, 1, ["--exit-interval", "4", *flags], output=out)
    assert says in out[0]  # the built model's TransformerConfig has it: the flags were not silently dropped
    assert sorted(got) == [1, 2, 3, 4]
    plain = runs["ring2"]
    for i in got:
        assert (got[i]["loss"], got[i]["grad_norm"]) == (plain[i]["loss"], plain[i]["grad_norm"]), i


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
