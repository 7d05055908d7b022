"""hlbd_fast: fast PyTorch seq2seq training loops that compute what the plain loop computes."""

from . import presets
from .history import EpochRecord, History
from .presets import Preset
from .strategies import (
    AllowTF32,
    Compile,
    CUDAGraphStep,
    DataLoaderWorkers,
    DeferredLossSync,
    DistributedDataParallel,
    EagerLossSync,
    FastDropout,
    FusedAdamW,
    GPUPreload,
    GradientAccumulation,
    GradientCheckpointing,
    MixedPrecision,
    Strategy,
    StrategyConflictError,
    TrimPadding,
    verify_trim,
)
from .trainer import DataSource, FastTrainer, NonFiniteLossError, load_weights

__version__ = "0.1.0"

__all__ = [
    "AllowTF32",
    "CUDAGraphStep",
    "Compile",
    "DataLoaderWorkers",
    "DataSource",
    "DeferredLossSync",
    "DistributedDataParallel",
    "EagerLossSync",
    "EpochRecord",
    "FastDropout",
    "FastTrainer",
    "FusedAdamW",
    "GPUPreload",
    "GradientAccumulation",
    "GradientCheckpointing",
    "History",
    "MixedPrecision",
    "NonFiniteLossError",
    "Preset",
    "Strategy",
    "StrategyConflictError",
    "TrimPadding",
    "load_weights",
    "presets",
    "verify_trim",
]
