"""What a training run reports: one record per epoch."""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

__all__ = ["EpochRecord", "History", "Best", "reports_dict"]


@dataclass
class EpochRecord:
    """The figures of one epoch."""

    epoch: int  # 1-based epoch number
    loss: float  # mean training loss of the epoch (see FastTrainer's loss_normalization)
    seconds: float  # wall time of the epoch, including its final loss read-back
    tokens_per_second: float  # non-pad target tokens trained on per wall second
    optimizer_steps: int  # optimizer steps taken (skipped ones included)
    skipped_steps: int  # steps skipped because fp16 gradients overflowed
    micro_batches: int  # forward/backward passes
    empty_micro_batches: int  # micro-batches whose targets were all padding
    tokens: int  # non-pad target tokens
    extra: dict[str, Any] = field(default_factory=dict)  # figures added by strategies
    lr: float | None = None  # learning rate of the first param group at the epoch's end
    eval: dict[str, float] | None = None  # FastTrainer.evaluate's metrics, when fit evaluated after this epoch

    @classmethod
    def from_figures(cls, epoch: int, figures: Any, seconds: float, *, steps: int, micro_batches: int) -> "EpochRecord":
        """The record of a finished epoch from its read-back :class:`~hlbd_fast.meter.Figures`."""
        return cls(
            epoch=epoch,
            loss=figures.loss,
            seconds=seconds,
            tokens_per_second=figures.tokens / seconds if seconds > 0 else 0.0,
            optimizer_steps=steps,
            skipped_steps=int(figures.skipped),
            micro_batches=micro_batches,
            empty_micro_batches=int(figures.empty),
            tokens=int(figures.tokens),
        )


def reports_dict(reports: dict[str, Any]) -> dict[str, Any]:
    """Strategy reports (:meth:`FastTrainer.reports`) as JSON-ready data: each dataclass as a dict, by strategy."""
    return {name: asdict(r) if is_dataclass(r) and not isinstance(r, type) else str(r) for name, r in reports.items()}


@dataclass(frozen=True)
class Best:
    """The best evaluation so far of ``fit(keep_best=...)``, whose weights are in ``best.pt``."""

    metric: str  # "eval_loss" or "eval_token_accuracy"
    value: float  # its best value
    epoch: int  # the 1-based epoch that reached it
    path: str | None = None  # the best.pt written with it (None: none was written, e.g. another process)


@dataclass
class History:
    """Per-epoch records of a run, the best evaluation kept, and the seconds spent evaluating.

    What strategies have to say about the run is their typed ``report()``
    (:meth:`FastTrainer.reports` gathers them).
    """

    records: list[EpochRecord] = field(default_factory=list)
    best: Best | None = None  # fit(keep_best=...)'s best evaluation so far
    eval_seconds: float = 0.0  # wall seconds fit spent evaluating (not in any epoch's seconds)
    left_out: dict[str, str] = field(default_factory=dict)  # strategies a preset brought whose proof failed, and why

    @property
    def losses(self) -> list[float]:
        """The mean loss of every epoch, in order."""
        return [r.loss for r in self.records]

    @property
    def seconds(self) -> list[float]:
        """The wall seconds of every epoch, in order."""
        return [r.seconds for r in self.records]

    def s_per_epoch(self) -> float:
        """Median wall seconds of the epochs after the first (the first pays one-off costs).

        The only epoch's seconds when there is one; ``nan`` when there is none.
        """
        s = self.seconds
        if not s:
            return float("nan")
        return statistics.median(s[1:]) if len(s) > 1 else s[0]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> EpochRecord:
        return self.records[i]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"epochs": [...], "best": {...} or None, "eval_seconds": s}``."""
        best = None if self.best is None else asdict(self.best)
        return {"epochs": [asdict(r) for r in self.records], "best": best, "eval_seconds": self.eval_seconds, "left_out": dict(self.left_out)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "History":
        """Inverse of :meth:`to_dict` (also reads the ``info`` dict that earlier checkpoints carry)."""
        legacy = d.get("info") or {}
        best = d.get("best", legacy.get("best"))
        seconds = float(d.get("eval_seconds", legacy.get("eval_seconds", 0.0)))
        records = [EpochRecord(**r) for r in d.get("epochs", [])]
        return cls(records, None if best is None else Best(**best), seconds, dict(d.get("left_out", {})))

    def save_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as indented JSON."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False, default=str)

    def __str__(self) -> str:
        lines = ["epoch  loss      s/epoch  tok/s     steps  skipped"]
        for r in self.records:
            lines.append(f"{r.epoch:>5}  {r.loss:<8.4f}  {r.seconds:>7.2f}  {r.tokens_per_second:>8.0f}  {r.optimizer_steps:>5}  {r.skipped_steps:>7}")
        return "\n".join(lines)
