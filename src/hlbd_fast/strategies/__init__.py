"""Speed-ups as strategies: each overrides only the loop hooks it changes.

See :mod:`hlbd_fast.strategies.base` for the loop and where every hook is called.
"""

from .accumulation import GradientAccumulation
from .base import EXCLUSIVE_HOOKS, Strategy, StrategyConflictError
from .checkpointing import GradientCheckpointing
from .compile import Compile
from .cuda_graph import CUDAGraphStep
from .data import DataLoaderWorkers, GPUPreload
from .distributed import DistributedDataParallel
from .dropout import FastDropout, fast_dropout
from .optim import FusedAdamW
from .padding import TrimPadding, verify_trim
from .precision import MixedPrecision
from .sync import DeferredLossSync, EagerLossSync
from .tf32 import AllowTF32

__all__ = [
    "EXCLUSIVE_HOOKS",
    "AllowTF32",
    "CUDAGraphStep",
    "Compile",
    "DataLoaderWorkers",
    "DeferredLossSync",
    "DistributedDataParallel",
    "EagerLossSync",
    "FastDropout",
    "FusedAdamW",
    "GPUPreload",
    "GradientAccumulation",
    "GradientCheckpointing",
    "MixedPrecision",
    "Strategy",
    "StrategyConflictError",
    "TrimPadding",
    "fast_dropout",
    "verify_trim",
]
