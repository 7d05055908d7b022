"""hlbd_fast: fast PyTorch seq2seq training loops that compute what the plain loop computes."""

from . import presets
from .history import EpochRecord, History
from .presets import Preset
from .strategies import DeferredLossSync, EagerLossSync, GradientAccumulation, Strategy, StrategyConflictError
from .trainer import DataSource, FastTrainer, NonFiniteLossError

__version__ = "0.1.0"

__all__ = [
    "DataSource",
    "DeferredLossSync",
    "EagerLossSync",
    "EpochRecord",
    "FastTrainer",
    "GradientAccumulation",
    "History",
    "NonFiniteLossError",
    "Preset",
    "Strategy",
    "StrategyConflictError",
    "presets",
]
