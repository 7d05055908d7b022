"""How a :class:`~hlbd_fast.trainer.FastTrainer` is put together from its strategies, and taken apart.

:func:`build` fills the roles, finds the device, checks every strategy's declaration
together, reads the vocabulary and the pad id from the model, runs each strategy's
``setup`` and ``wrap_model``, and builds the optimizer and the schedule. :func:`close` ends
what the strategies started and gives them back; :func:`reports` gathers what they report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._validation import check_forward_override, default_device, infer_vocab_size, resolve_pad_id
from .meter import EpochMeter
from .schedules import resolve_scheduler
from .strategies.base import ROLES, Strategy, StrategyConflictError, release, resolve_roles
from .strategies.needs import Context, check_strategies

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import FastTrainer

__all__ = ["build", "setup_order", "close", "reports", "seed_torch"]


def build(trainer: "FastTrainer", model: nn.Module, optimizer: Any, device: Any, seed: int | None, pad_id: int | None, scheduler: Any) -> None:
    """Roles, device, the declarations' check, set-up, wrapping, optimizer and schedule."""
    from .trainer import FastTrainer  # here: trainer imports this module

    trainer.roles, problems = resolve_roles(trainer.strategies, optimizer)
    check_forward_override(type(trainer), FastTrainer, trainer.roles.forward)
    trainer.device = trainer.roles.distribution.resolve_device(default_device(model, device))
    model.to(trainer.device)
    problems += check_strategies(setup_order(trainer), Context(model, trainer.device))
    if problems:
        raise StrategyConflictError("these strategies cannot train together:\n- " + "\n- ".join(problems))
    trainer.seed = seed_torch(seed)
    trainer.vocab_size = infer_vocab_size(model)
    trainer.pad_id = resolve_pad_id(pad_id, model, trainer.vocab_size)
    for s in setup_order(trainer):
        s.setup(trainer)
    wrapped = model
    for s in sorted(trainer.strategies, key=lambda s: s.order):
        wrapped = s.wrap_model(trainer, wrapped)
    trainer.train_model = wrapped  # what the loop calls; ``trainer.model`` holds the weights
    trainer.params = [p for p in model.parameters() if p.requires_grad]
    if not trainer.params:
        raise ValueError("model has no trainable parameters (all requires_grad=False)")
    trainer.optimizer = trainer.roles.optimizer.build_optimizer(trainer, trainer.params)
    trainer.roles.step.check_optimizer(trainer.optimizer)  # e.g. graph capture needs capturable param groups
    trainer.scheduler = resolve_scheduler(scheduler, trainer.optimizer)
    trainer.meter = EpochMeter(trainer.device)


def setup_order(trainer: "FastTrainer") -> list[Strategy]:
    """Roles first, in role order (the distribution decides the device others see); then the rest as given."""
    by_role = [getattr(trainer.roles, name) for name in ROLES]
    return by_role + [s for s in trainer.strategies if s.role is None]


def seed_torch(seed: int | None) -> int:
    """The run's seed: ``seed`` (seeding torch's global RNG once), or one that follows torch.manual_seed."""
    if seed is None:
        # follows torch.manual_seed without drawing from the RNG (dropout streams stay as they were)
        return torch.initial_seed() % (2**62)
    torch.manual_seed(seed)
    return int(seed)


def close(trainer: "FastTrainer") -> None:
    """Close every strategy the trainer holds (the roles' defaults too), then release its own strategies."""
    roles = getattr(trainer, "roles", None)  # absent when building failed early
    owned = list(trainer.strategies) + [s for s in (roles or ()) if all(s is not t for t in trainer.strategies)]
    try:
        for s in owned:
            s.close()
    finally:
        for s in trainer.strategies:
            release(s, trainer)


def reports(trainer: "FastTrainer") -> dict[str, Any]:
    """Every strategy's report that has one, by class name (``Name#2`` for a second of a class)."""
    out: dict[str, Any] = {}
    for s in setup_order(trainer):
        report = s.report()
        if report is not None:
            name = type(s).__name__
            out[name if name not in out else f"{name}#{sum(k.split('#')[0] == name for k in out) + 1}"] = report
    return out
