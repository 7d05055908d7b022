"""GradientAccumulation: several micro-batches per optimizer step."""

from __future__ import annotations

from .._validation import check_positive_int
from .base import Accumulation

__all__ = ["GradientAccumulation"]


class GradientAccumulation(Accumulation):
    """Accumulate gradients over ``steps`` micro-batches before each optimizer step (role ``accumulation``).

    With the trainer's default ``loss_normalization="tokens"`` the step's loss is the
    sum over all its non-pad target tokens divided by their count, so micro-batch 4 ×
    8 steps computes what one batch of 32 computes (up to float rounding). Leftover
    micro-batches at the end of an epoch form a final, smaller step, normalised by
    their own token count.

    Args:
        steps: micro-batches per optimizer step (>= 1).
    """

    def __init__(self, steps: int) -> None:
        self.steps = check_positive_int("steps", steps, "GradientAccumulation", hint=" (1 means no accumulation)")
