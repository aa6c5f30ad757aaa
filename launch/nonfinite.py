"""``--nan-policy``: what an iteration with a non-finite loss or gradient norm does to the run.

Modelled on Megatron-LM's ``--check-for-nan-in-loss-and-grad``: a NaN or Inf in the loss or in the
gradient norm ends the run (``stop``, the default) before anything is evaluated or saved after
it. ``skip`` drops the optimizer step instead, as a loss-scale overflow does (DeepSpeed's ZeRO,
bf16 and fp16 optimizers check the gradients and skip; the learning-rate schedule does not
advance), and stops after ``--nan-skip-limit`` such iterations in a row. Under fp16 a non-finite
gradient norm with a finite loss is DeepSpeed's own loss-scale overflow and is left to it.

Every rank reaches the same verdict: the ranks' flags are combined by one all-reduce (MAX over
the world) per iteration, so all stop, or skip, together.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from launch.errors import RunError


def finite(value: float | None) -> bool:
    """False for inf, nan and DeepSpeed's "invalid norm" sentinel (-1); None (no norm) counts as finite."""
    return value is None or (math.isfinite(value) and value >= 0)


class NonFiniteGuard:
    """Decides, after each optimizer step, whether the iteration counts, was skipped, or ends the run."""

    def __init__(self, policy: str, skip_limit: int | None, lr: float, fp16: bool, device: torch.device):
        self.policy, self.skip_limit, self.lr, self.fp16, self.device = policy, skip_limit, lr, fp16, device
        self.last_finite: tuple[int, float] | None = None  # (iteration, loss)
        self.in_a_row = 0

    def problem(self, loss: float, grad_norm: float | None, grads_finite: bool = True) -> str | None:
        """What was not finite, agreed by every rank ("the loss is nan", ...), or None. A collective."""
        grad_bad = not grads_finite or (not finite(grad_norm) and not (self.fp16 and math.isfinite(loss)))
        flags = torch.tensor([not math.isfinite(loss), grad_bad], dtype=torch.float32, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        loss_bad, grad_bad = (bool(f) for f in flags.tolist())
        parts = []
        if loss_bad:
            parts.append(f"the loss is {loss}" if not math.isfinite(loss) else "the loss is not finite on another rank")
        if grad_bad:  # DeepSpeed reports inf for any non-finite norm
            parts.append("the gradient norm is not finite")
        return " and ".join(parts) or None

    def check(self, iteration: int, loss: float, grad_norm: float | None, step_applied: bool,
              grads_finite: bool = True) -> str | None:
        """None if the iteration counts; a note if it was skipped; RunError (all ranks) to stop the run."""
        problem = self.problem(loss, grad_norm, grads_finite)
        if problem is None:
            self.last_finite, self.in_a_row = (iteration, loss), 0
            return None
        last = (f"the last finite loss was {self.last_finite[1]:.4f} at iteration {self.last_finite[0]}"
                if self.last_finite else "no iteration of this run had a finite loss")
        fix = f"lower --lr (now {self.lr:g}) or add warmup (--lr-warmup-iters), or check the data"
        if self.policy == "stop":
            raise RunError(f"iteration {iteration}: {problem} ({last}); stopped before evaluating or saving it "
                           f"(--nan-policy stop): {fix}; --nan-policy skip drops such steps instead", agreed=True)
        if step_applied:  # DeepSpeed's optimizer did not drop it: the weights may hold inf or nan now
            raise RunError(f"iteration {iteration}: {problem}, and the optimizer applied the step although "
                           f"--nan-policy skip asked to drop it; stopped before saving ({last})", agreed=True)
        self.in_a_row += 1
        if self.in_a_row >= self.skip_limit:
            raise RunError(f"iteration {iteration}: {problem}: {self.in_a_row} iterations in a row were not finite "
                           f"(--nan-skip-limit {self.skip_limit}); {last}: {fix}",
                           agreed=True)
        return (f"iteration {iteration}: {problem}: optimizer step skipped ({self.in_a_row} in a row, the run stops "
                f"at {self.skip_limit})")
