"""Running launch/pretrain_gpt.py in tests: under the DeepSpeed launcher or torchrun, or as bare processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "pretrain_gpt.py")
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
         "--seq-length", "64", "--recall-keys", "8", "--recall-values", "8", "--lr", "1e-2", "--train-iters", "6",
         "--eval-interval", "1000", "--eval-iters", "1", "--no-progress"]
GLOBAL_BATCH = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env() -> dict:
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def write_config(path, ring: int | None, stage: int, micro: int, backend: str | None = "torch") -> str:
    """A DeepSpeed config at ``path`` (a ring section if ``ring``; no backend in it if ``backend`` is None)."""
    config = {"train_micro_batch_size_per_gpu": micro, "train_batch_size": GLOBAL_BATCH,
              "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0}
    if ring:
        config["ring_attention"] = {"size": ring, "layout": "zigzag", **({"backend": backend} if backend else {})}
    path.write_text(json.dumps(config))
    return str(path)


def read_metrics(path) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    return {r["iteration"]: r for r in rows if r["kind"] == "train"}


def deepspeed_run(tmp_path, name: str, nproc: int, ring: int | None, stage: int, extra: list[str],
                  timeout: float = 300, launcher: str = "torchrun", tensor: int = 1,
                  output: list[str] | None = None, pipeline: int = 1) -> dict[int, dict]:
    """Run the DeepSpeed job under torchrun (or ``launcher="deepspeed"``: `deepspeed --num_gpus nproc`);
    returns its per-iteration metrics.

    The DeepSpeed launcher starts two Python processes of its own before the ranks (5.7 s of an 11 s run
    on 2 idle cores), so tests use it only where it is what they check. ``output``: a list to append the
    launcher's standard output and error to."""
    replicas = nproc // ((ring or 1) * tensor * pipeline)
    extra = [*extra, "--tensor-model-parallel-size", str(tensor), "--pipeline-model-parallel-size", str(pipeline)]
    # a pipeline of P stages needs at least P micro batches per step: P of them
    config = write_config(tmp_path / f"{name}.json", ring, stage, GLOBAL_BATCH // (replicas * pipeline))
    path = tmp_path / f"{name}.jsonl"
    launch = {"deepspeed": [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(free_port())],
              "torchrun": [TORCHRUN, "--nproc-per-node", str(nproc), "--master-port", str(free_port())]}[launcher]
    cmd = [*launch, SCRIPT, "--deepspeed_config", config, *(["--ring-attention"] if ring else []), *MODEL,
           "--metrics-file", str(path), *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    if output is not None:
        output.append(done.stdout + done.stderr)
    return read_metrics(path)


def bare_ranks(nproc: int, argv: list[str], logs=None, profile_imports: bool = False,
               **popen) -> list[subprocess.Popen]:
    """Start the job as nproc plain processes (the environment a launcher would give them).

    ``logs``: one open file per rank for its stdout and stderr; else ``popen`` keywords apply to all.
    ``profile_imports``: Python writes every import to stderr ("import time: ...").
    """
    master = free_port()
    procs = []
    for rank in range(nproc):
        env = {**job_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master),
               **({"PYTHONPROFILEIMPORTTIME": "1"} if profile_imports else {})}
        out = {"stdout": logs[rank], "stderr": subprocess.STDOUT} if logs else popen
        procs.append(subprocess.Popen([sys.executable, SCRIPT, *argv], cwd=ROOT, env=env, **out))
    return procs
