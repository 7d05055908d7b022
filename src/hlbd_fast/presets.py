"""Presets: named lists of strategies with a micro-batch size, nothing more.

Use them with :meth:`hlbd_fast.FastTrainer.from_preset`::

    trainer = FastTrainer.from_preset(model, "baseline")
    trainer = FastTrainer.from_preset(model, presets.fastest(device="cuda"))
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .strategies import DeferredLossSync, EagerLossSync, GradientAccumulation, Strategy
from .strategies.compile import Compile
from .strategies.cuda_graph import CUDAGraphStep
from .strategies.data import DataLoaderWorkers, DevicePreload
from .strategies.dropout import FastDropout
from .strategies.needs import Context
from .strategies.optim import FusedAdamW
from .strategies.padding import TrimPadding
from .strategies.precision import MixedPrecision
from .strategies.tf32 import AllowTF32
from .strategies.unpad import Unpad

log = logging.getLogger("hlbd_fast")

__all__ = ["Preset", "baseline", "quick", "extreme", "fastest", "get_preset", "resolve_preset", "PRESETS"]

#: Length buckets of the ``fastest`` CUDA preset: a handful of static shapes to capture.
CUDA_BUCKETS = (16, 32, 48, 64)


@dataclass(frozen=True)
class Preset:
    """A named training configuration."""

    name: str  # shown in logs and benchmark tables
    strategies: tuple[Strategy, ...]  # fresh instances: a preset is built per trainer
    batch_size: int  # micro-batch size
    loss_normalization: str = "tokens"  # see FastTrainer
    lr: float = 5e-5  # the original loop's learning rate
    description: str = ""  # one line for tables and --help

    def trainer_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """:class:`~hlbd_fast.FastTrainer` keyword arguments for this preset; ``overrides`` win.

        ``strategies=`` in ``overrides`` is appended to the preset's own.
        """
        extra = tuple(overrides.pop("strategies", None) or ())
        kwargs: dict[str, Any] = {
            "batch_size": self.batch_size,
            "loss_normalization": self.loss_normalization,
            "lr": self.lr,
            **overrides,
        }
        kwargs["strategies"] = tuple(self.strategies) + extra
        return kwargs

    def without(self, *kinds: type[Strategy]) -> "Preset":
        """This preset less its strategies of the given classes, e.g. ``fastest("cpu").without(MixedPrecision)``
        for the CPU ``fastest`` in fp32 (exact up to rounding, dropout streams aside).

        Raises:
            ValueError: a class the preset does not hold (nothing would change).
        """
        missing = [
            k.__name__ if isinstance(k, type) else repr(k) for k in kinds if not (isinstance(k, type) and any(isinstance(s, k) for s in self.strategies))
        ]
        if missing:
            held = [type(s).__name__ for s in self.strategies]
            raise ValueError(f"Preset {self.name!r} holds no {', '.join(missing)} to leave out; it holds {held}")
        kept = tuple(s for s in self.strategies if not isinstance(s, kinds))
        names = ", ".join(k.__name__ for k in kinds)
        return dataclasses.replace(self, name=f"{self.name} without {names}", strategies=kept)

    def for_model(self, model: nn.Module, device: str | torch.device | None = None) -> "Preset":
        """This preset for ``model`` on ``device`` (default: the model's): without the strategies
        whose declaration says they cannot run it (e.g. :class:`Unpad` for a model that cannot run
        unpadded), each named in the log.

        The rest of the preset stays (in ``fastest`` on CPU, such a model then trains padded
        and trimmed, with the same ``MixedPrecision("auto")``).
        """
        context = Context(model, _model_device(model) if device is None else torch.device(device))
        kept = []
        for s in self.strategies:
            reason = s.declare(context).unsupported
            if reason is None:
                kept.append(s)
            else:
                log.info("preset %s: %s is left out: %s", self.name, type(s).__name__, reason)
        if len(kept) == len(self.strategies):
            return self
        return dataclasses.replace(self, strategies=tuple(kept))


def baseline(device: str | torch.device | None = None) -> Preset:
    """The original HLBD loop: micro-batch 4 × accumulation 8, Adam 5e-5, clip 1.0, loss read every micro-batch."""
    return Preset(
        name="baseline",
        strategies=(GradientAccumulation(8), EagerLossSync()),
        batch_size=4,
        loss_normalization="micro_batch",
        description="the original HLBD loop: batch 4 x accumulation 8, Adam, loss.item() every micro-batch",
    )


def quick(device: str | torch.device | None = None) -> Preset:
    """The plan's "quick" combo: micro-batch 16 × accumulation 2, mixed precision, fused AdamW, DataLoader workers.

    The plan asks for 4 workers; :func:`~hlbd_fast.strategies.data.default_workers` sizes
    them from the cores there are (one core stays with training: 1 worker on 2 cores).

    The loss is still read every micro-batch, as in the plan's loop.
    """
    return Preset(
        name="quick",
        strategies=(GradientAccumulation(2), MixedPrecision("auto"), FusedAdamW(), DataLoaderWorkers(), EagerLossSync()),
        batch_size=16,
        description="the plan's quick combo: batch 16 x accumulation 2, AMP, fused AdamW, DataLoader workers",
    )


def extreme(device: str | torch.device | None = None) -> Preset:
    """The plan's "extreme" combo: batch 32, mixed precision, workers, max-autotune compile, fused AdamW, deferred sync."""
    return Preset(
        name="extreme",
        strategies=(MixedPrecision("auto"), DataLoaderWorkers(), Compile("max-autotune"), FusedAdamW(), DeferredLossSync()),
        batch_size=32,
        description="the plan's extreme combo: batch 32, AMP, workers, compile max-autotune, fused AdamW, deferred sync",
    )


def fastest(device: str | torch.device | None = None) -> Preset:
    """The fastest configuration measured for this workload on ``device`` (default: CUDA if available).

    CUDA: data preloaded on the GPU, loss read once per epoch, fused AdamW, the whole step
    captured as a CUDA graph per length bucket, TF32 matmuls. CPU: data preloaded, loss
    read once per epoch, each batch trimmed to its longest row and run on its real tokens
    only (:class:`~hlbd_fast.strategies.Unpad`, for models that follow its protocol or are built
    from torch's transformer layers), fused
    AdamW, dropout masks from half the random draws (:class:`~hlbd_fast.strategies.FastDropout`:
    the same distribution, another random stream), and ``MixedPrecision("auto")``: bf16
    autocast on CPUs with native bf16 (AVX512-BF16 or AMX), fp32 elsewhere. For a model
    that cannot run unpadded, :meth:`Preset.for_model` trains it padded and trimmed instead.
    Batch 32 (the plan's effective batch) and lr 5e-5 in both.

    The preset fits the model in front of it: a strategy that cannot run the model is left
    out when the trainer is built (:meth:`Preset.for_model`), and ``TrimPadding``/``Unpad``,
    whose proof fails on the first batch for a model that lets padding reach real
    positions, leave themselves out for the run with one warning (``history.left_out``).
    Listed by hand, the same strategies raise instead.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        strategies: tuple[Strategy, ...] = (
            DevicePreload(),
            TrimPadding(buckets=CUDA_BUCKETS, on_refusal="leave out"),
            DeferredLossSync(),
            FusedAdamW(),
            AllowTF32(),
            CUDAGraphStep(),
        )
        description = "GPU preload + length buckets + deferred sync + fused AdamW + TF32 + whole-step CUDA graphs"
    else:
        # multiple_of=1: rounding lengths up helps GPU tensor cores, not CPU kernels. bf16 autocast
        # pays with Unpad once its packed rows come in a few sizes (Unpad rounds them to 32 under CPU
        # autocast: oneDNN builds a kernel per shape); padded and trimmed batches have few shapes anyway
        strategies = (
            DevicePreload(),
            TrimPadding(multiple_of=1, on_refusal="leave out"),
            Unpad(on_refusal="leave out"),
            DeferredLossSync(),
            FusedAdamW(),
            FastDropout(),
            MixedPrecision("auto"),
        )
        description = (
            "preloaded tensors + trimmed padding + real tokens only (Unpad) + deferred sync + fused AdamW "
            "+ fast dropout masks + bf16 autocast where the CPU has native bf16"
        )
    return Preset(name="fastest", strategies=strategies, batch_size=32, description=description)


#: Every preset by name; each takes the target device.
PRESETS: dict[str, Callable[..., Preset]] = {"baseline": baseline, "quick": quick, "extreme": extreme, "fastest": fastest}


def get_preset(name: str, device: str | torch.device | None = None) -> Preset:
    """Build the preset called ``name`` for ``device``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](device=device)


def resolve_preset(preset: "Preset | str", device: str | torch.device | None = None, model: nn.Module | None = None) -> Preset:
    """``preset`` itself, or the preset of that name built for ``device``; fitted to ``model`` when given."""
    resolved = preset if isinstance(preset, Preset) else get_preset(str(preset), device=device)
    return resolved if model is None else resolved.for_model(model, device)


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")
