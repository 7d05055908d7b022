"""hlbd_fast: fast PyTorch seq2seq training loops that compute what the plain loop computes."""

from importlib import metadata as _metadata

from . import presets, schedules
from .checkpoint import CheckpointError, load_weights
from .history import EpochRecord, History
from .meter import Figures, NonFiniteError, NonFiniteGradientError, NonFiniteLossError
from .presets import Preset
from .strategies import (
    EMA,
    ROLES,
    AllowTF32,
    Compile,
    CSVLogger,
    CUDAGraphStep,
    DataLoaderWorkers,
    DeferredLossSync,
    DevicePreload,
    DistributedTraining,
    EagerLossSync,
    EarlyStopping,
    FastDropout,
    FusedAdamW,
    GradientAccumulation,
    GradientCheckpointing,
    MixedPrecision,
    Strategy,
    StrategyConflictError,
    TensorBoardLogger,
    TrimPadding,
    Unpad,
    verify_trim,
    verify_unpad,
)
from .trainer import DataSource, FastTrainer
from .tuning import TuneReport, tune

try:
    __version__ = _metadata.version("hlbd-fast")  # written once, in pyproject.toml
except _metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree without installing
    __version__ = "0+unknown"

__all__ = [
    "ROLES",
    "AllowTF32",
    "CSVLogger",
    "CUDAGraphStep",
    "CheckpointError",
    "Compile",
    "DataLoaderWorkers",
    "DataSource",
    "DeferredLossSync",
    "DevicePreload",
    "DistributedTraining",
    "EMA",
    "EagerLossSync",
    "EarlyStopping",
    "EpochRecord",
    "FastDropout",
    "FastTrainer",
    "Figures",
    "FusedAdamW",
    "GradientAccumulation",
    "GradientCheckpointing",
    "History",
    "MixedPrecision",
    "NonFiniteError",
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "Preset",
    "Strategy",
    "StrategyConflictError",
    "TensorBoardLogger",
    "TrimPadding",
    "TuneReport",
    "Unpad",
    "__version__",
    "load_weights",
    "presets",
    "schedules",
    "tune",
    "verify_trim",
    "verify_unpad",
]
