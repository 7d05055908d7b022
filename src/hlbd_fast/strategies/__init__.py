"""Speed-ups as strategies: a role object replaces a part of the plain loop; hooks add to it.

See :mod:`hlbd_fast.strategies.base` for the loop, its roles and where every hook is called.
"""

from typing import Any

from .accumulation import GradientAccumulation
from .base import (
    ROLES,
    Accumulation,
    BatchSource,
    Distribution,
    Forward,
    LossReadback,
    OptimizerFactory,
    Precision,
    Roles,
    StepRunner,
    Strategy,
    StrategyConflictError,
)
from .checkpointing import GradientCheckpointing
from .compile import Compile
from .cuda_graph import CUDAGraphStep, GraphBackend
from .data import DataLoaderWorkers, DevicePreload, GPUPreload
from .distributed import DistributedDataParallel, DistributedTraining
from .dropout import FastDropout, fast_dropout
from .ema import EMA
from .loggers import CSVLogger, TensorBoardLogger
from .optim import FusedAdamW
from .padding import TrimPadding, verify_trim
from .precision import MixedPrecision
from .stopping import EarlyStopping
from .sync import DeferredLossSync, EagerLossSync
from .tf32 import AllowTF32
from .unpad import Unpad, verify_unpad

__all__ = [
    "ROLES",
    "Accumulation",
    "AllowTF32",
    "BatchSource",
    "CSVLogger",
    "CUDAGraphStep",
    "Compile",
    "DataLoaderWorkers",
    "DeferredLossSync",
    "DevicePreload",
    "Distribution",
    "EMA",
    "EarlyStopping",
    "DistributedDataParallel",
    "DistributedTraining",
    "EagerLossSync",
    "FastDropout",
    "Forward",
    "FusedAdamW",
    "GPUPreload",
    "GradientAccumulation",
    "GradientCheckpointing",
    "GraphBackend",
    "LossReadback",
    "MixedPrecision",
    "OptimizerFactory",
    "Precision",
    "Roles",
    "StepRunner",
    "Strategy",
    "StrategyConflictError",
    "TensorBoardLogger",
    "TrimPadding",
    "Unpad",
    "fast_dropout",
    "verify_trim",
    "verify_unpad",
]


def __getattr__(name: str) -> Any:
    if name == "EXCLUSIVE_HOOKS":  # an ImportError, so `from ... import EXCLUSIVE_HOOKS` shows this message
        raise ImportError(
            "EXCLUSIVE_HOOKS was retired in hlbd_fast 0.2: a strategy that replaces a part of the loop now fills a role "
            "(hlbd_fast.strategies.ROLES); trainer.roles holds the object of each"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
