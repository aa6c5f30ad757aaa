"""A pool of gloo worker processes that stays up across tests.

``pool.run(fn, *args)`` calls ``fn(*args)`` on every rank (``fn`` importable by module and
name) and returns the per-rank results, or raises with the failing ranks' tracebacks. A job
that does not finish within its timeout kills the pool: a hang fails the test, it never stalls.
"""

from __future__ import annotations

import importlib
import os
import queue
import socket
import traceback
from datetime import timedelta

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, jobs, results) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    while True:
        job = jobs.get()
        if job is None:
            break
        module, name, args = job
        try:
            results.put((rank, True, getattr(importlib.import_module(module), name)(*args)))
        except BaseException:  # report everything, the parent decides
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.world = world
        self.jobs = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, world, port, self.jobs[r], self.results), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()
        self.broken = False

    def run(self, fn, *args, timeout: float = 300.0) -> list:
        if self.broken:
            raise RuntimeError("the pool was killed by an earlier hang")
        for q in self.jobs:
            q.put((fn.__module__, fn.__name__, args))
        out, errors = [None] * self.world, []
        for _ in range(self.world):
            try:
                rank, ok, value = self.results.get(timeout=timeout)
            except queue.Empty:
                self.close(kill=True)
                raise TimeoutError(f"{fn.__name__} did not finish on every rank within {timeout}s (a hang)") from None
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            raise AssertionError("\n".join(errors))
        return out

    def close(self, kill: bool = False) -> None:
        if kill:
            self.broken = True
            for p in self.procs:
                p.kill()
        else:
            for q in self.jobs:
                q.put(None)
            for p in self.procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
