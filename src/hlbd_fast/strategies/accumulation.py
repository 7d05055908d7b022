"""GradientAccumulation: several micro-batches per optimizer step."""

from __future__ import annotations

from .base import Strategy

__all__ = ["GradientAccumulation"]


class GradientAccumulation(Strategy):
    """Accumulate gradients over ``steps`` micro-batches before each optimizer step.

    With the trainer's default ``loss_normalization="tokens"`` the step's loss is the
    sum over all its non-pad target tokens divided by their count, so micro-batch 4 ×
    8 steps computes what one batch of 32 computes (up to float rounding). Leftover
    micro-batches at the end of an epoch form a final, smaller step, normalised by
    their own token count.

    Args:
        steps: micro-batches per optimizer step (>= 1).
    """

    def __init__(self, steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"GradientAccumulation(steps={steps!r}): steps must be an integer >= 1 (1 means no accumulation)")
        self.steps = steps

    def accumulation_steps(self) -> int:
        return self.steps
