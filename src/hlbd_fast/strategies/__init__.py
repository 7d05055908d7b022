"""Speed-ups as strategies: each overrides only the loop hooks it changes."""

from .accumulation import GradientAccumulation
from .base import EXCLUSIVE_HOOKS, Strategy, StrategyConflictError
from .sync import DeferredLossSync, EagerLossSync

__all__ = [
    "EXCLUSIVE_HOOKS",
    "DeferredLossSync",
    "EagerLossSync",
    "GradientAccumulation",
    "Strategy",
    "StrategyConflictError",
]
