"""DeepSpeed checkpoints that are either complete or not there.

``save`` writes tag ``iter_0000042`` with DeepSpeed's ``save_checkpoint`` (every rank its ZeRO
shard), waits for every rank, and only then points ``DIR/latest`` at it by writing a temporary
file and renaming it over the old one. A run killed while saving leaves a partial tag directory
that ``latest`` never names, so ``load`` resumes from the previous, complete checkpoint.
"""

from __future__ import annotations

import json
import os

import torch.distributed as dist

LATEST = "latest"


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def write_atomically(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` so a reader sees the old content or the new, never a mix."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def save(engine, directory: str, iteration: int, meta: dict) -> None:
    """Save a checkpoint of ``engine`` after ``iteration`` and make it the one ``load`` finds."""
    tag = tag_for(iteration)
    os.makedirs(directory, exist_ok=True)
    engine.save_checkpoint(directory, tag=tag, client_state={"iteration": iteration}, save_latest=False)
    dist.barrier()  # every rank's shard is on disk
    if dist.get_rank() == 0:
        write_atomically(os.path.join(directory, tag, "ring_sp.json"), json.dumps({"iteration": iteration, **meta}))
        write_atomically(os.path.join(directory, LATEST), tag)
    dist.barrier()


def latest(directory: str) -> tuple[str, dict] | None:
    """(tag, metadata) of the checkpoint ``latest`` names in ``directory``, or None if there is none."""
    path = os.path.join(directory, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    with open(os.path.join(directory, tag, "ring_sp.json")) as f:
        return tag, json.load(f)


def load(engine, directory: str, meta: dict) -> int:
    """Load the latest checkpoint of ``directory`` into ``engine``; return the iteration it was saved after.

    ``meta`` (world size, ring, tensor and data sizes) must match what the checkpoint was saved
    with, since ZeRO's optimizer shards are cut for that layout.
    """
    found = latest(directory)
    if found is None:
        raise ValueError(f"--load {directory}: no checkpoint there (no '{LATEST}' file)")
    tag, saved = found
    for key, value in meta.items():
        if saved.get(key) != value:
            raise ValueError(f"--load {directory}: the checkpoint {tag} was saved with {key}={saved.get(key)!r} but "
                             f"this run has {key}={value!r}: resume with the same parallel layout")
    path, client = engine.load_checkpoint(directory, tag=tag)
    if path is None:
        raise ValueError(f"--load {directory}: DeepSpeed could not load checkpoint {tag}")
    return int(client["iteration"])
