"""The epoch's running figures: kept on the device, combined across processes, read back once.

Everything the loop learns about an epoch while it runs — the summed loss, the token
count, skipped steps, the first step whose loss or gradients were not finite — is added
in place to one small float64 tensor on the training device. Adding costs no host sync,
and a captured CUDA graph replays the additions. Reading the figures back
(:meth:`EpochMeter.read`) is the one host sync; under several processes it is a
collective, through the distribution role's ``all_reduce``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .strategies.base import Distribution

__all__ = ["EpochMeter", "Figures", "NonFiniteError", "NonFiniteLossError", "NonFiniteGradientError", "raise_if_diverged"]


class NonFiniteError(FloatingPointError):
    """Training diverged: a loss or a gradient became NaN or infinite. No checkpoint holds it."""

    def __init__(self, message: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch = epoch  # 1-based epoch in which it happened
        self.step = step  # 1-based optimizer step (counted over the run)


class NonFiniteLossError(NonFiniteError):
    """The training loss became NaN or infinite."""


class NonFiniteGradientError(NonFiniteError):
    """The gradients of a step were NaN or infinite while its loss was finite (the weights would be too)."""


@dataclass(frozen=True)
class Figures:
    """The running figures of the current epoch, as read back (summed over processes)."""

    loss: float  # mean loss so far (see FastTrainer's loss_normalization)
    tokens: float  # non-pad target tokens so far
    skipped: float  # optimizer steps skipped (fp16 overflow)
    empty: float  # micro-batches without a target token
    bad_loss_step: int | None  # first optimizer step (0-based, over the run) with a non-finite loss
    bad_grad_step: int | None  # first step with non-finite gradients but a finite loss


class EpochMeter:
    """The epoch's running figures on the device; every update is in place (CUDA-graph safe).

    Layout of :attr:`values` (float64): the first five slots are sums over processes,
    the last three are combined with a maximum (the bad-step slots hold minus the step,
    so the maximum is the earliest).
    """

    LOSS_SUM, TOKENS, MICRO_LOSS_SUM, COUNTED_MICRO, EMPTY, SKIPPED, BAD_LOSS, BAD_GRAD = range(8)
    _SUMMED = 5
    _NONE = -float("inf")  # a bad-step slot that saw nothing bad

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.values = torch.zeros(8, dtype=torch.float64, device=device)
        self.step_index = torch.zeros((), dtype=torch.float64, device=device)  # optimizer steps over the run
        self.reset()

    def reset(self) -> None:
        """Start a new epoch (the run's step index carries on)."""
        self.values.zero_()
        self.values[self.BAD_LOSS :] = self._NONE

    def add_micro(self, loss_sum: torch.Tensor, n_tokens: torch.Tensor) -> None:
        """Add one micro-batch: its summed token loss and its non-pad token count."""
        loss_sum = loss_sum.detach().to(torch.float64)
        n = n_tokens.to(torch.float64)
        has = (n > 0).to(torch.float64)
        # micro-batches without a token are left out of the per-micro-batch mean
        upd = torch.stack([loss_sum, n, loss_sum / n.clamp(min=1.0), has, 1.0 - has])
        self.values[: self._SUMMED].add_(upd)
        self._mark(self.BAD_LOSS, ~torch.isfinite(loss_sum))

    def add_step(self, skipped: torch.Tensor | bool, grad_norm: torch.Tensor | None) -> None:
        """Count one optimizer step; ``skipped`` and the gradient norm stay on the device."""
        bad = None if grad_norm is None else ~torch.isfinite(grad_norm.detach())
        if isinstance(skipped, torch.Tensor):
            self.values[self.SKIPPED].add_(skipped.to(self.values.dtype))
            bad = None if bad is None else bad & ~skipped.to(torch.bool)  # a skipped step left the weights alone
        elif skipped:
            self.values[self.SKIPPED].add_(1.0)
            bad = None
        if bad is not None:
            self._mark(self.BAD_GRAD, bad)
        self.step_index.add_(1.0)

    def _mark(self, slot: int, bad: torch.Tensor) -> None:
        current = self.values[slot]
        first = bad & torch.isinf(current)
        current.copy_(torch.where(first, -self.step_index, current))

    def read(self, distribution: "Distribution", trainer: Any, normalization: str) -> Figures:
        """Combine across processes and read back: the one host sync of a read."""
        values = self.values.clone()
        stand_ins = distribution.stand_ins(trainer)
        if stand_ins:  # a process's stand-in micro-batches are not data
            values[self.EMPTY] -= stand_ins
        values[: self._SUMMED] = distribution.all_reduce(trainer, values[: self._SUMMED].contiguous(), "sum")
        values[self._SUMMED :] = distribution.all_reduce(trainer, values[self._SUMMED :].contiguous(), "max")
        v = values.tolist()  # host sync: waits for the device, like loss.item()
        if normalization == "tokens":
            loss = v[self.LOSS_SUM] / max(v[self.TOKENS], 1.0)
        else:
            loss = v[self.MICRO_LOSS_SUM] / max(v[self.COUNTED_MICRO], 1.0)
        return Figures(
            loss=loss,
            tokens=v[self.TOKENS],
            skipped=v[self.SKIPPED],
            empty=v[self.EMPTY],
            bad_loss_step=_step_of(v[self.BAD_LOSS]),
            bad_grad_step=_step_of(v[self.BAD_GRAD]),
        )

    def state_dict(self) -> dict[str, Any]:
        """The figures so far (for a mid-epoch checkpoint)."""
        return {"values": self.values.detach().cpu(), "step_index": self.step_index.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.values.copy_(state["values"])
        self.step_index.copy_(state["step_index"])

    def set_step(self, step: int) -> None:
        """Set the run's optimizer-step index (after loading a checkpoint)."""
        self.step_index.fill_(float(step))


def _step_of(slot: float) -> int | None:
    return None if slot == -float("inf") else int(-slot)


def raise_if_diverged(figures: Figures, epoch: int, checkpoint: Any) -> None:
    """Raise :class:`NonFiniteLossError` / :class:`NonFiniteGradientError` when the figures saw one."""
    where = f"; the last checkpoint {checkpoint} is untouched" if checkpoint else ""
    loss_at, grad_at = figures.bad_loss_step, figures.bad_grad_step
    if loss_at is not None and (grad_at is None or loss_at <= grad_at):
        step = loss_at + 1
        raise NonFiniteLossError(
            f"loss became NaN or inf at epoch {epoch}, optimizer step {step} (counted over the run){where}. "
            "Lower lr, keep max_grad_norm on, or check the data for ids the model cannot embed",
            epoch=epoch,
            step=step,
        )
    if grad_at is not None:
        step = grad_at + 1
        raise NonFiniteGradientError(
            f"gradients became NaN or inf at epoch {epoch}, optimizer step {step} (counted over the run) while the loss "
            f"was finite, so the weights are no longer finite{where}. Look for an operation whose backward overflows "
            "(a sqrt or log at 0, a division by a tiny number), lower lr, or keep max_grad_norm on",
            epoch=epoch,
            step=step,
        )
