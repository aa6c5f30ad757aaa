"""How the job fails: one ``[rank N] error: ...`` line per rank and an exit code, no traceback.

- Exit code 2: the input is unusable (flags, the DeepSpeed JSON, the checkpoint to ``--load``):
  :class:`ConfigError`, and any ``ValueError`` (the project's convention for bad input, which
  names the argument and the fix).
- Exit code 1: the run failed (:class:`RunError`: a non-finite loss, a rank that stopped).

An error that every rank has agreed on through a collective (``agreed=True``) is printed by
rank 0 alone. ``--debug`` re-raises instead, so the traceback shows; an error nobody foresaw
keeps its traceback anyway.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class JobError(Exception):
    """A failure the job foresees. ``agreed``: every rank raises the same one (rank 0 prints it)."""

    exit_code = 1

    def __init__(self, message: str, *, agreed: bool = False):
        super().__init__(message)
        self.agreed = agreed


class ConfigError(JobError, ValueError):
    """The flags, the JSON config or the checkpoint to load cannot be used (exit code 2)."""

    exit_code = 2


class RunError(JobError):
    """Training failed (exit code 1)."""


def _lost_peer(error: BaseException) -> str | None:
    """The one-line account of a collective that failed because another rank stopped, else None."""
    text = str(error).lower()
    for phrase in ("connection closed by peer", "connection reset by peer"):
        if phrase in text:
            return f"another rank stopped (its own output says why), so this one cannot go on ({phrase})"
    if "timed out" in text or "timeout" in text:
        return ("another rank did not answer within --distributed-timeout-minutes: it hangs or has stopped (its own "
                "output says why)")
    return None


@contextlib.contextmanager
def reported(rank: int | str, debug: bool) -> Iterator[None]:
    """Turn the errors raised inside into one line on stderr and ``sys.exit(code)``."""
    try:
        yield
    except (ValueError, JobError) as error:  # ConfigError is both
        if debug:
            raise
        if not getattr(error, "agreed", False) or str(rank) == "0":
            print(f"[rank {rank}] error: {error}", file=sys.stderr, flush=True)
        sys.exit(getattr(error, "exit_code", 2))
    except RuntimeError as error:  # torch.distributed's errors derive from it
        message = _lost_peer(error)
        if debug or message is None:
            raise
        print(f"[rank {rank}] error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
