"""DeepSpeed checkpoints that are complete and verified, or not used.

``save`` has DeepSpeed write tag ``iter_0000042`` under a temporary name (``iter_0000042.partial``,
every rank its files), records the size and SHA-256 of every file in the tag's ``ring_sp.json``
(the ranks share the hashing), renames the directory to its tag and only then points
``DIR/latest`` at it (a temporary file renamed over the old one). A run killed while saving
leaves at most a ``.partial`` directory that nothing names; the next save of that iteration
replaces it.

Loading is checked twice. :func:`check`, before any process group exists, on every rank alike:
``latest``, the tag, its ``ring_sp.json``, the parallel layout it was saved with, and that every
file is there with its recorded size. :func:`load`, after start-up: the SHA-256 of every file (the
ranks share the reading and agree on the verdict), then DeepSpeed's ``load_checkpoint``. A
problem ends the run with the damaged file's name and the previous complete checkpoint.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil

import torch
import torch.distributed as dist

from launch.errors import ConfigError

LATEST = "latest"
MANIFEST = "ring_sp.json"
PARTIAL = ".partial"


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # make a rename in this directory durable
    finally:
        os.close(fd)


def write_atomically(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` so a reader sees the old content or the new, never a mix."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _record(path: str) -> dict:
    """Size and SHA-256 of a file just saved, after flushing it to disk (torch.save does not)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"bytes": os.path.getsize(path), "sha256": sha256(path)}


def _shared(items: list[str], fn) -> list[tuple]:
    """``(item, fn(item))`` for every item, sorted; each rank computes every world-th one and all gather."""
    rank, world = dist.get_rank(), dist.get_world_size()
    parts: list[list] = [[] for _ in range(world)]
    dist.all_gather_object(parts, [(item, fn(item)) for item in items[rank::world]])
    return sorted(pair for part in parts for pair in part)


def save(engine, directory: str, iteration: int, meta: dict) -> None:
    """Save a checkpoint of ``engine`` after ``iteration`` and make it the one ``load`` finds (all ranks)."""
    tag = tag_for(iteration)
    final = os.path.join(directory, tag)
    partial = final + PARTIAL
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a save of this iteration that was killed
    dist.barrier()
    engine.save_checkpoint(directory, tag=tag + PARTIAL, client_state={"iteration": iteration}, save_latest=False)
    dist.barrier()  # every rank's files are on disk
    names = sorted(os.path.relpath(os.path.join(root, name), partial)
                   for root, _, files in os.walk(partial) for name in files)
    files = dict(_shared(names, lambda name: _record(os.path.join(partial, name))))
    if rank == 0:
        write_atomically(os.path.join(partial, MANIFEST),
                         json.dumps({"iteration": iteration, **meta, "files": files}, indent=1))
        shutil.rmtree(final, ignore_errors=True)  # an older save of this iteration, which `latest` does not name
        os.replace(partial, final)
        _fsync_dir(directory)
        write_atomically(os.path.join(directory, LATEST), tag)
    dist.barrier()


def _manifest(directory: str, tag: str) -> dict:
    """The tag's ring_sp.json; ValueError (a sentence without the directory) if it cannot be used."""
    if not os.path.isdir(os.path.join(directory, tag)):
        raise ValueError(f"'{LATEST}' names {tag}, which does not exist")
    try:
        with open(os.path.join(directory, tag, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{tag}/{MANIFEST} is missing or unreadable ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{tag}/{MANIFEST} lists no files (saved by an older version of this job?)")
    return manifest


def _check_sizes(directory: str, tag: str) -> dict:
    """The manifest, after checking that every file it lists is there with its recorded size."""
    manifest = _manifest(directory, tag)
    for name, record in sorted(manifest["files"].items()):
        path = os.path.join(directory, tag, name)
        if not os.path.isfile(path):
            raise ValueError(f"{tag}/{name} is missing")
        size = os.path.getsize(path)
        if size != record["bytes"]:
            raise ValueError(f"{tag}/{name} is truncated or damaged ({size} bytes, {record['bytes']} when saved)")
    return manifest


def _fallback(directory: str, tag: str) -> str:
    """Where to resume instead: the newest complete checkpoint before ``tag`` (sizes checked)."""
    for path in sorted(glob.glob(os.path.join(directory, "iter_*")), reverse=True):
        older = os.path.basename(path)
        if older < tag and not older.endswith(PARTIAL):
            try:
                _check_sizes(directory, older)
            except ValueError:
                continue
            return (f"the previous complete checkpoint is {older}: to resume from it, write its name into "
                    f"{os.path.join(directory, LATEST)}")
    return f"there is no earlier complete checkpoint in {directory}"


def check(directory: str, meta: dict) -> str:
    """The tag ``DIR/latest`` names, if it is complete and saved with ``meta``; else ValueError saying why.

    No tensor is read: this runs on every rank before start-up. ``meta`` (world size, ring,
    tensor and data sizes, layout) must match, since ZeRO's optimizer shards are cut for it."""
    path = os.path.join(directory, LATEST)
    if not os.path.isfile(path):
        raise ValueError(f"--load {directory}: no checkpoint there (no '{LATEST}' file)")
    with open(path) as f:
        tag = f.read().strip()
    try:
        saved = _check_sizes(directory, tag)
    except ValueError as e:
        raise ValueError(f"--load {directory}: {e}; {_fallback(directory, tag)}") from None
    for key, value in meta.items():
        if saved.get(key) != value:
            raise ValueError(f"--load {directory}: the checkpoint {tag} was saved with {key}={saved.get(key)!r} but "
                             f"this run has {key}={value!r}: resume with the same parallel layout")
    return tag


def load(engine, directory: str, tag: str) -> int:
    """Verify the SHA-256 of every file of ``tag`` (found by :func:`check`), then load it into ``engine``.

    All ranks: each hashes its share of the files and all agree on the verdict. Returns the
    iteration the checkpoint was saved after."""
    files = _manifest(directory, tag)["files"]
    digests = _shared(sorted(files), lambda name: sha256(os.path.join(directory, tag, name)))
    damaged = [name for name, digest in digests if digest != files[name]["sha256"]]
    if damaged:
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise ConfigError(f"--load {directory}: {tag}/{damaged[0]}{more} is damaged: its SHA-256 differs from the one "
                          f"recorded when it was saved; {_fallback(directory, tag)}", agreed=True)
    path, client = engine.load_checkpoint(directory, tag=tag)
    if path is None:
        raise ConfigError(f"--load {directory}: DeepSpeed could not load checkpoint {tag}", agreed=True)
    base = base_optimizer(engine)
    if isinstance(base, torch.optim.AdamW):  # the saved groups' settings replaced the job's: keep it fused
        for group in base.param_groups:
            group["fused"], group["foreach"] = True, None
    return int(client["iteration"])


def base_optimizer(engine) -> torch.optim.Optimizer | None:
    """The torch optimizer inside ``engine``'s (ZeRO, bf16, fp16) wrappers.

    torch's ``Optimizer.load_state_dict`` restores the saved param groups' settings, ``fused`` among them, so a
    checkpoint saved before the job's AdamW was fused would otherwise resume on the slower for-each path."""
    opt = engine.optimizer
    while opt is not None and not isinstance(opt, torch.optim.Optimizer):
        opt = getattr(opt, "optimizer", None)
    return opt
