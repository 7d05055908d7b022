"""Presets: named lists of strategies with a micro-batch size, nothing more.

Use them with :meth:`hlbd_fast.FastTrainer.from_preset`::

    trainer = FastTrainer.from_preset(model, "baseline")
    trainer = FastTrainer.from_preset(model, presets.fastest(device="cuda"))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .strategies import DeferredLossSync, EagerLossSync, GradientAccumulation, Strategy

__all__ = ["Preset", "baseline", "get_preset", "PRESETS"]


@dataclass(frozen=True)
class Preset:
    """A named training configuration."""

    name: str  # shown in logs and benchmark tables
    strategies: tuple[Strategy, ...]  # fresh instances: a preset is built per trainer
    batch_size: int  # micro-batch size
    loss_normalization: str = "tokens"  # see FastTrainer
    lr: float = 5e-5  # the seed's learning rate
    description: str = ""  # one line for tables and --help


def baseline(device: str | torch.device | None = None) -> Preset:
    """The seed's loop: micro-batch 4 × accumulation 8, Adam 5e-5, clip 1.0, loss read every micro-batch."""
    return Preset(
        name="baseline",
        strategies=(GradientAccumulation(8), EagerLossSync()),
        batch_size=4,
        loss_normalization="micro_batch",
        description="the seed's loop: batch 4 x accumulation 8, Adam, loss.item() every micro-batch",
    )


#: Every preset by name; each takes the target device.
PRESETS: dict[str, Callable[..., Preset]] = {"baseline": baseline}


def get_preset(name: str, device: str | torch.device | None = None) -> Preset:
    """Build the preset called ``name`` for ``device``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](device=device)
