"""Learning-rate schedules for ``FastTrainer(scheduler=...)``.

A schedule is stepped once per optimizer step (never per micro-batch), after the step,
fp16 steps that the GradScaler skipped included: the learning rate is then a function of
the step count alone, known without reading anything back from the device. Its state goes
into checkpoints and is resumed exactly.

``FastTrainer(scheduler=...)`` takes a callable ``optimizer -> LRScheduler`` (such as
:func:`warmup_cosine`'s result, or ``lambda opt: torch.optim.lr_scheduler.StepLR(opt, 100)``),
or a scheduler already built on the optimizer given as ``optimizer=``. Either way the
scheduler must act on the trainer's optimizer, and ``ReduceLROnPlateau`` (stepped with a
metric, not with the step count) is refused when the trainer is built.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

from ._validation import check_number, check_positive_int

__all__ = ["warmup_cosine", "warmup_cosine_factor", "resolve_scheduler"]

SchedulerFactory = Callable[[torch.optim.Optimizer], LRScheduler]


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """The lr multiplier after ``step`` optimizer steps: linear warm-up, then cosine decay to ``min_ratio``.

    Step 0 (before the first step) is ``1 / (warmup_steps + 1)``; ``warmup_steps`` reaches 1;
    ``total_steps`` and later stay at ``min_ratio``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= total_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> SchedulerFactory:
    """A schedule for ``FastTrainer(scheduler=...)``: linear warm-up, then cosine decay to ``min_ratio`` x lr.

    Args:
        warmup_steps: optimizer steps of linear warm-up (>= 0).
        total_steps: optimizer steps until the end of the cosine (> ``warmup_steps``);
            e.g. ``epochs * ceil(samples / (batch_size * accumulation))``.
        min_ratio: the lr at the end, as a share of the optimizer's lr (0 to 1).
    """
    check_positive_int("warmup_steps", warmup_steps, "warmup_cosine", minimum=0)
    check_positive_int("total_steps", total_steps, "warmup_cosine")
    if total_steps <= warmup_steps:
        raise ValueError(f"warmup_cosine(total_steps={total_steps}): total_steps must exceed warmup_steps={warmup_steps}")
    check_number("min_ratio", min_ratio, "warmup_cosine", low_inclusive=True, high=1.0 + 1e-12, hint=" (0 to 1)")

    def build(optimizer: torch.optim.Optimizer) -> LRScheduler:
        return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_ratio))

    build.__qualname__ = f"warmup_cosine({warmup_steps}, {total_steps}, min_ratio={min_ratio})"
    return build


def resolve_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> LRScheduler | None:
    """The trainer's scheduler from what ``FastTrainer(scheduler=...)`` got; refused with the fix otherwise."""
    if scheduler is None:
        return None
    if isinstance(scheduler, (LRScheduler, ReduceLROnPlateau)):
        _check_built(scheduler, optimizer, "is built")
        return scheduler
    if callable(scheduler):
        built = scheduler(optimizer)
        if not isinstance(built, (LRScheduler, ReduceLROnPlateau)):
            raise TypeError(f"scheduler= returned {type(built).__name__}; it must return a torch.optim.lr_scheduler.LRScheduler")
        _check_built(built, optimizer, "returned a scheduler built")
        return built
    raise TypeError(
        f"scheduler={scheduler!r} must be a callable optimizer -> LRScheduler (e.g. hlbd_fast.schedules.warmup_cosine(...)) "
        "or an LRScheduler built on the optimizer passed as optimizer="
    )


def _check_built(scheduler: Any, optimizer: torch.optim.Optimizer, how: str) -> None:
    """Refuse a metric-stepped scheduler, and one acting on another optimizer than the trainer's."""
    if isinstance(scheduler, ReduceLROnPlateau):
        raise ValueError(
            "scheduler=ReduceLROnPlateau is stepped with a metric, but FastTrainer steps its scheduler once per optimizer "
            "step with none; use a schedule of the step count (hlbd_fast.schedules.warmup_cosine(...), StepLR, CosineAnnealingLR), "
            "and EarlyStopping('eval_loss') to stop when the evaluation stops improving"
        )
    if scheduler.optimizer is not optimizer:
        raise ValueError(
            f"scheduler= {how} on another optimizer than the trainer's, so the trainer's lr would never change; "
            "build it on the optimizer it is given: pass a callable such as lambda opt: torch.optim.lr_scheduler.StepLR(opt, 100) "
            "(or warmup_cosine(...)), or a scheduler built on the same optimizer you pass as optimizer="
        )
