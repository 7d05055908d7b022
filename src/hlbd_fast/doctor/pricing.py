"""What fixing the padding would buy, measured on copies of the model: the proofs and the price of each cut.

Run once after the passes, on one batch the doctor saw (before any strategy cut it):

* whether the model computes the same with the batch's trailing padding columns cut
  (:func:`~hlbd_fast.strategies.padding.verify_trim`) and, for a model that can run
  unpadded, with only its real tokens (:func:`~hlbd_fast.strategies.unpad.verify_unpad`):
  a model that lets padding reach real positions fails them, and then TrimPadding and
  Unpad refuse it;
* the price: one training step of the batch padded, with its padding columns cut
  (``TrimPadding``) and, where the model can, with only its real tokens (``TrimPadding``
  and ``Unpad``, as the CPU ``fastest`` runs them), each on its own copy of the model,
  timed step after step in turn. The cuts run unchecked here: for a model that lets
  padding leak they compute something else, so they are only timed, never kept.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .._validation import token_pair
from ..strategies.base import Strategy
from ..strategies.padding import TrimPadding, row_lengths, verify_trim
from ..strategies.unpad import Unpad, unpad_mode, verify_unpad

__all__ = ["PaddingPrice", "price_padding"]


@dataclass
class PaddingPrice:
    """What the doctor measured about the padding of one batch, on copies of the model."""

    columns_cut: int  # trailing source + target columns that are padding in every row of the batch
    trim_refused: str | None  # what verify_trim measured when the cut changes the model's numbers (None: exact)
    unpad_refused: str | None  # the same for running only the real tokens (None: exact, or the model cannot run unpadded)
    unpad_capable: bool  # the model can run unpadded (Unpad's protocol or torch's transformer layers)
    padded_s: float  # seconds of one training step of the padded batch (median)
    trimmed_s: float  # the same with the padding columns cut
    unpadded_s: float | None  # the same with only the real tokens (None: the model cannot run unpadded)

    @property
    def trim_ratio(self) -> float:
        """How many times cheaper a step is with the padding columns cut."""
        return _ratio(self.padded_s, self.trimmed_s)

    @property
    def unpad_ratio(self) -> float | None:
        """How many times cheaper a step is with only the real tokens (None: the model cannot run unpadded)."""
        return None if self.unpadded_s is None else _ratio(self.padded_s, self.unpadded_s)

    @property
    def leaks(self) -> bool:
        """Whether the model lets padding reach real positions (a proof failed)."""
        return self.trim_refused is not None or self.unpad_refused is not None


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def price_padding(trainer: Any, batch: Any, reps: int = 3) -> PaddingPrice | None:
    """Prove and price the cuts of ``batch``'s padding on copies of ``trainer.model``; ``None``: no padding."""
    src, tgt = token_pair(batch, "doctor")
    src, tgt = src.cpu(), tgt.cpu()
    pad_id = trainer.pad_id
    if not (bool(src.eq(pad_id).any()) or bool(tgt.eq(pad_id).any())):
        return None
    ks = max(int(row_lengths(src, pad_id).max()), 1)
    kt = max(int(row_lengths(tgt, pad_id).max()), 2)
    model = copy.deepcopy(trainer.model)
    cut = (src.shape[1] - ks) + (tgt.shape[1] - kt)
    trim = _refusal(lambda: verify_trim(model, (src, tgt), pad_id)) if cut > 0 else None
    capable = unpad_mode(model) is not None
    unpad = _refusal(lambda: verify_unpad(model, (src, tgt), pad_id)) if capable else None
    runs: dict[str, tuple[Strategy, ...]] = {"padded": (), "trimmed": (TrimPadding(multiple_of=1, check=False),)}
    if capable:
        runs["unpadded"] = (TrimPadding(multiple_of=1, check=False), Unpad(check=False))
    seconds = _time_steps(trainer, model, (src, tgt), runs, reps)
    return PaddingPrice(cut, trim, unpad, capable, seconds["padded"], seconds["trimmed"], seconds.get("unpadded"))


def _refusal(prove: Callable[[], Any]) -> str | None:
    """What a proof measured when it refused (its message up to the fix), or ``None`` when it held."""
    try:
        prove()
    except ValueError as e:
        message = str(e).split(". The model", 1)[0]
        return message.removeprefix("verify_trim: ").removeprefix("verify_unpad: ")
    return None


def _time_steps(trainer: Any, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], runs: dict[str, tuple[Strategy, ...]], reps: int) -> dict[str, float]:
    """Median seconds of one training step of ``batch`` under each run's strategies, the runs taking turns
    (each on its own copy of ``model``; the first step of each, which pays one-off costs, left out)."""
    from ..trainer import FastTrainer

    kwargs = {"batch_size": len(batch[0]), "pad_id": trainer.pad_id, "device": trainer.device, "progress": False, "seed": 0}
    trainers = {name: FastTrainer(copy.deepcopy(model), strategies=s, **kwargs) for name, s in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # check=False says it trains another model: here it is only timed
            for _ in range(reps + 1):
                for name, t in trainers.items():
                    t0 = time.perf_counter()
                    t.train_epoch(batch, shuffle=False)  # one step; the epoch's loss read waits for the device
                    times[name].append(time.perf_counter() - t0)
    finally:
        for t in trainers.values():
            t.close()
    return {name: statistics.median(x[1:]) for name, x in times.items()}
