"""AllowTF32: TensorFloat-32 matmuls on CUDA for the length of a run."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from .base import Strategy

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import FastTrainer

__all__ = ["AllowTF32"]

log = logging.getLogger("hlbd_fast")


class AllowTF32(Strategy):
    """Let CUDA matmuls and convolutions use TF32 (10-bit mantissa inputs, fp32 accumulation).

    This changes results within float rounding of TF32, not bit for bit: the CUDA tests
    compare a TF32 run's final loss with fp32 (within 0.5%). The setting is global in
    PyTorch, so it is switched on when the trainer is built, said once in the log, and
    restored when ``fit`` ends. On a CPU it does nothing.
    """

    def __init__(self) -> None:
        self._saved: tuple[bool, bool] | None = None

    def setup(self, trainer: "FastTrainer") -> None:
        if trainer.device.type != "cuda":
            return
        self._saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        trainer.history.info["tf32"] = True
        log.info("AllowTF32: TF32 matmuls are on for this run (results within TF32 rounding of fp32)")

    def on_epoch_start(self, trainer: "FastTrainer", epoch: int) -> None:
        if self._saved is not None:  # fit may be called again after teardown
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def teardown(self, trainer: "FastTrainer") -> None:
        if self._saved is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._saved
