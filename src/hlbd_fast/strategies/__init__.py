"""Speed-ups as strategies: a role object replaces a part of the plain loop; hooks add to it.

See :mod:`hlbd_fast.strategies.base` for the loop, its roles and where every hook is called.
"""

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
from .data import DataLoaderWorkers, DevicePreload
from .distributed import DistributedTraining
from .dropout import FastDropout, fast_dropout
from .ema import EMA
from .loggers import CSVLogger, TensorBoardLogger
from .needs import Capability, Computes, Context, Declaration, Need
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
    "Capability",
    "Computes",
    "Context",
    "Declaration",
    "Need",
    "CUDAGraphStep",
    "Compile",
    "DataLoaderWorkers",
    "DeferredLossSync",
    "DevicePreload",
    "Distribution",
    "EMA",
    "EarlyStopping",
    "DistributedTraining",
    "EagerLossSync",
    "FastDropout",
    "Forward",
    "FusedAdamW",
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
