"""Third-party output that says nothing to the job's users, hidden unless ``--verbose``.

Megatron-core warns at import that Transformer Engine and Apex are missing (the job does not use
them) and that a TransformerConfig default is deprecated; DeepSpeed logs its accelerator choice
and engine set-up on every rank, and its ZeRO-1 calls a collective PyTorch has deprecated. None
of it is actionable here. Rank 0 speaks for the job: the other ranks' Python warnings are
hidden too (they repeat rank 0's), errors never are. While the progress bar is on screen, rank 0's
remaining warnings are written above it (:func:`warnings_above`), never into its line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

KNOWN_WARNINGS = (  # (category, the message's start)
    (UserWarning, "Transformer Engine and Apex are not installed"),
    (UserWarning, "Apex is not installed"),
    (UserWarning, "full scope is deprecated"),  # megatron-core's own default for cuda_graph_scope
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated"),  # DeepSpeed's ZeRO
)


def configure(verbose: bool, rank: int) -> None:
    """Hide the known third-party warnings and INFO/WARNING logs; call before importing Megatron-core or DeepSpeed."""
    if verbose:
        return
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if rank != 0:
        warnings.simplefilter("ignore")
    # DeepSpeed's logger sets its own level when it is created: a filter survives that.
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)
    logging.getLogger("megatron").setLevel(logging.ERROR)


def warnings_above(bar) -> None:
    """Print warnings above the tqdm progress ``bar`` instead of into its line."""
    def show(message, category, filename, lineno, file=None, line=None):
        bar.write(warnings.formatwarning(message, category, filename, lineno, line).rstrip(), file=bar.fp)

    warnings.showwarning = show


def prints_hidden(verbose: bool):
    """A context in which what third-party code print()s is dropped, unless ``verbose`` (DeepSpeed's pipeline
    module prints its seed, topology and stage list on rank 0)."""
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
