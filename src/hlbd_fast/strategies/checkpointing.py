"""GradientCheckpointing: recompute layer activations in backward instead of keeping them.

As a plain function for a hand-written loop::

    names = checkpoint_modules(model)          # every layer of every nn.ModuleList
    names = checkpoint_modules(model, [DecoderLayer])
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .base import Strategy
from .needs import Capability, Context, Declaration, Need

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import FastTrainer

__all__ = ["GradientCheckpointing", "checkpoint_modules", "is_checkpointed"]

#: Instance attribute holding the forward a checkpointed module wraps.
_INNER = "_hlbd_checkpoint_inner"

ModuleSpec = type | str


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Bound to a module instance as its ``forward``: checkpoint when training with grad."""
    inner = getattr(self, _INNER)
    if self.training and torch.is_grad_enabled():
        # non-reentrant: works with keyword arguments and inputs that need no grad, and
        # restores the RNG state for the recomputation (same dropout masks)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)
    return inner(*args, **kwargs)


def is_checkpointed(module: nn.Module) -> bool:
    """Whether ``module``'s forward runs under activation checkpointing (set by this module)."""
    return _INNER in vars(module)


def _matches(module: nn.Module, specs: tuple[ModuleSpec, ...]) -> bool:
    return any(isinstance(module, s) if isinstance(s, type) else type(module).__name__ == s for s in specs)


def _candidates(model: nn.Module, specs: tuple[ModuleSpec, ...] | None) -> list[tuple[str, nn.Module]]:
    """Modules to checkpoint, outermost first; nothing inside an already chosen module."""
    chosen: list[tuple[str, nn.Module]] = []
    if specs is None:
        found = []
        for name, m in model.named_modules():
            if isinstance(m, nn.ModuleList):
                found.extend(
                    (f"{name}.{i}" if name else str(i), child)
                    for i, child in enumerate(m)
                    if not isinstance(child, (nn.ModuleList, nn.ModuleDict))  # containers: their layers are found too
                )
    else:
        found = [(name, m) for name, m in model.named_modules() if m is not model and _matches(m, specs)]
    seen: set[int] = set()
    for name, m in sorted(found, key=lambda nm: nm[0].count(".")):
        if id(m) in seen or any(name.startswith(c + ".") for c, _ in chosen):
            continue
        seen.add(id(m))
        chosen.append((name, m))
    order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
    return sorted(chosen, key=lambda nm: order.get(id(nm[1]), 0))


def checkpoint_modules(model: nn.Module, modules: Sequence[ModuleSpec] | None = None) -> list[str]:
    """Make the forward of chosen submodules of ``model`` run under activation checkpointing.

    Chosen: every child of every ``nn.ModuleList`` (``modules=None``), or every submodule
    whose class is one of ``modules`` (classes, or class names). A module inside one
    already chosen is left alone (no nested recomputation). Each module's ``forward`` is
    replaced on the instance, so ``state_dict`` keys do not change and checkpoints with
    and without checkpointing load into each other; a module already checkpointed is not
    wrapped twice. Checkpointing applies only in training mode with grad enabled.

    Returns:
        The names of the modules now checkpointed (already checkpointed ones included).

    Raises:
        ValueError: no module matched.
    """
    specs = None if modules is None else tuple(modules)
    chosen = _candidates(model, specs)
    if not chosen:
        if specs is None:
            raise ValueError(
                f"GradientCheckpointing found no nn.ModuleList in {type(model).__name__} to checkpoint the layers of; "
                "pass the layer classes, e.g. GradientCheckpointing(modules=[MyLayer])"
            )
        names = [s.__name__ if isinstance(s, type) else s for s in specs]
        present = sorted({type(m).__name__ for m in model.modules() if m is not model})
        raise ValueError(
            f"GradientCheckpointing(modules={names}) matched no submodule of {type(model).__name__}; "
            f"its submodule classes are {present}. Name one of them, or use modules=None for every nn.ModuleList's layers"
        )
    for _, m in chosen:
        if not is_checkpointed(m):
            # plain attributes, not submodules or parameters: state_dict is unchanged; a
            # bound method (not a closure) so copy.deepcopy rebinds it to the copy
            object.__setattr__(m, _INNER, m.forward)
            object.__setattr__(m, "forward", types.MethodType(_checkpointed_forward, m))
    return [name for name, _ in chosen]


class GradientCheckpointing(Strategy):
    """Trade compute for memory: keep only layer inputs, recompute the rest in backward.

    In :meth:`wrap_model` (order 0, in-place), every child of each ``nn.ModuleList`` of
    the model, or only submodules of the given classes, runs its forward under
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` while training with
    grad enabled. Activation memory drops to about one layer's worth, for roughly one
    more forward per step: use it to fit a larger micro-batch, not to go faster.

    Computes what the plain loop computes: the recomputation replays the same
    operations with the same RNG state (same dropout masks), so losses and gradients
    match; the tests check within 1e-6. ``state_dict`` keys are unchanged; checkpoints
    load with or without this strategy.

    Args:
        modules: classes (or class names) of the modules to checkpoint; ``None``: every
            child of every ``nn.ModuleList``.

    Raises:
        ValueError: at construction for a bad ``modules``; when the trainer is built, if
            no module matched (naming what was searched).
        StrategyConflictError: with a strategy that forbids reading the RNG state in the
            forward (:class:`~hlbd_fast.strategies.CUDAGraphStep`) or replaces the same
            layers' forward (:class:`~hlbd_fast.strategies.Unpad` on torch's layers).
    """

    order = 0

    def __init__(self, modules: Sequence[ModuleSpec] | ModuleSpec | None = None) -> None:
        if isinstance(modules, (type, str)):
            modules = [modules]
        if modules is not None:
            if not isinstance(modules, (list, tuple)):
                raise ValueError(
                    f"GradientCheckpointing(modules={modules!r}): modules must be None or nn.Module classes "
                    "(or class names), e.g. GradientCheckpointing(modules=[DecoderLayer])"
                )
            modules = list(modules)
            bad = [m for m in modules if not ((isinstance(m, type) and issubclass(m, nn.Module)) or (isinstance(m, str) and m))]
            if not modules or bad:
                raise ValueError(
                    f"GradientCheckpointing(modules={modules!r}): modules must be None or nn.Module classes "
                    "(or class names), e.g. GradientCheckpointing(modules=[DecoderLayer])"
                )
        self.modules: list[ModuleSpec] | None = modules
        self.checkpointed: list[str] = []  # names of the modules wrapped, set by wrap_model

    def declare(self, context: Context) -> Declaration:
        """It replaces the chosen layers' forward, and reads the RNG state in each checkpointed forward."""
        layers = "GradientCheckpointing runs the chosen layers' forward under torch.utils.checkpoint"
        rng = "torch.utils.checkpoint reads the random generator's state in every checkpointed forward, to recompute the same dropout masks in backward"
        return Declaration(
            provides=(Need(Capability.LAYER_FORWARD, layers), Need(Capability.RNG_STATE_IN_FORWARD, rng)),
            forbids=(Need(Capability.LAYER_FORWARD, layers),),
        )

    def wrap_model(self, trainer: "FastTrainer", model: nn.Module) -> nn.Module:
        """Checkpoint the chosen modules in place; the model object is returned unchanged."""
        self.checkpointed = checkpoint_modules(model, self.modules)
        return model
