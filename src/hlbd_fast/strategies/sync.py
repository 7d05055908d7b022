"""When the running loss is read back to the host: every micro-batch, or rarely (role ``readback``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._validation import check_positive_int
from .base import LossReadback
from .needs import Capability, Context, Declaration, Need

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import FastTrainer

__all__ = ["DeferredLossSync", "EagerLossSync"]


class DeferredLossSync(LossReadback):
    """Keep the running loss on the device; read it back once per epoch.

    Every read-back (``loss.item()`` in a hand-written loop) makes the host wait for the
    device, so the device idles while the next step is launched. With this strategy the
    loss is read once at the end of each epoch, or every ``every`` optimizer steps of the
    epoch for the progress bar. Gradients are cleared with ``zero_grad(set_to_none=True)``
    (the trainer always does).

    Computes exactly what the plain loop computes: only the reading changes. A NaN/inf
    loss is still caught, at the next read-back, naming the step where it first appeared.

    Args:
        every: read the loss for the bar every ``every`` optimizer steps; ``None``: once
            per epoch.
    """

    def __init__(self, every: int | None = None) -> None:
        super().__init__()
        if every is not None:
            check_positive_int("every", every, "DeferredLossSync", hint=", or None (once per epoch)")
        self.every = every

    def should_read(self, trainer: "FastTrainer", event: str) -> bool:
        return event == "step" and self.every is not None and trainer.steps_in_epoch % self.every == 0


class EagerLossSync(LossReadback):
    """Read the loss back after every micro-batch, as ``loss.item()`` in a classic loop does.

    This is the cost the original HLBD loop pays (one host-device sync per micro-batch); the
    ``baseline`` preset uses it so that benchmarks measure that loop faithfully.
    """

    def declare(self, context: Context) -> Declaration:
        return Declaration(provides=(Need(Capability.MICRO_BATCH_READS, "EagerLossSync reads the loss after every micro-batch"),))

    def should_read(self, trainer: "FastTrainer", event: str) -> bool:
        return event == "micro_batch"
