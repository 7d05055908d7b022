"""AllowTF32: TensorFloat-32 matmuls on CUDA for the length of a run."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, ContextManager, Iterator

import torch

from .base import Strategy

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import FastTrainer

__all__ = ["AllowTF32"]

log = logging.getLogger("hlbd_fast")


class AllowTF32(Strategy):
    """Let CUDA matmuls and convolutions use TF32 (10-bit mantissa inputs, fp32 accumulation).

    This changes results within float rounding of TF32, not bit for bit. The setting is
    global in PyTorch, so it is switched on for the length of each ``fit`` or
    ``train_epoch`` (:meth:`run_scope`) and the previous flags are restored on every exit
    path. On a CPU it does nothing.
    """

    def setup(self, trainer: "FastTrainer") -> None:
        if trainer.device.type == "cuda":
            trainer.history.info["tf32"] = True
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
