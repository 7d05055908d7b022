"""AllowTF32: TensorFloat-32 matmuls on CUDA for the length of a run."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager, Iterator

import torch

from .base import Strategy
from .needs import Computes, Context, Declaration

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import FastTrainer

__all__ = ["AllowTF32", "TF32Report"]

log = logging.getLogger("hlbd_fast")


@dataclass(frozen=True)
class TF32Report:
    """Whether :class:`AllowTF32` switches TF32 on for the trainer's runs."""

    tf32: bool  # True on a CUDA device; a CPU has no TF32


class AllowTF32(Strategy):
    """Let CUDA matmuls and convolutions use TF32 (10-bit mantissa inputs, fp32 accumulation).

    This changes results within float rounding of TF32, not bit for bit. The setting is
    global in PyTorch, so it is switched on for the length of each ``fit`` or
    ``train_epoch`` (:meth:`run_scope`) and the previous flags are restored on every exit
    path. On a CPU it does nothing. :meth:`report` says whether it is on.
    """

    _active = False

    def report(self) -> "TF32Report":
        """Whether TF32 is on during training (a CUDA device)."""
        return TF32Report(self._active)

    def declare(self, context: Context) -> Declaration:
        return Declaration(computes=Computes.PRECISION if context.device.type == "cuda" else Computes.EXACT)

    def setup(self, trainer: "FastTrainer") -> None:
        self._active = trainer.device.type == "cuda"
        if self._active:
            log.info("AllowTF32: TF32 matmuls are on during training (results within TF32 rounding of fp32)")

    @contextlib.contextmanager
    def _tf32(self) -> Iterator[None]:
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    def run_scope(self, trainer: "FastTrainer") -> ContextManager[Any]:
        """TF32 on for the run (CUDA only); the previous flags come back when it ends."""
        return self._tf32() if trainer.device.type == "cuda" else contextlib.nullcontext()
