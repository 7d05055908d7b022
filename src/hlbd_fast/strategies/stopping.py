"""EarlyStopping: stop ``fit`` when an evaluation metric stops improving."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager

from .._validation import check_number, check_positive_int
from .base import Strategy

if TYPE_CHECKING:  # pragma: no cover
    from ..history import EpochRecord
    from ..trainer import FastTrainer

__all__ = ["EarlyStopping", "StopReport"]


@dataclass(frozen=True)
class StopReport:
    """Where :class:`EarlyStopping` stopped a run."""

    epoch: int  # the 1-based epoch it stopped after
    metric: str  # the metric it followed
    best: float | None  # the best value seen
    best_epoch: int | None  # the epoch of that value


class EarlyStopping(Strategy):
    """Stop training after ``patience`` evaluations in a row that did not improve ``metric``.

    Lightning's and Keras's rule: an evaluation *improves* when it beats the best value
    so far by more than ``min_delta`` (a loss must fall below ``best - min_delta``,
    anything else rise above ``best + min_delta``; the first evaluation always improves;
    a NaN never does). After ``patience`` consecutive evaluations without improvement it
    calls :meth:`FastTrainer.request_stop` at that epoch's end: ``fit`` writes
    ``last.pt`` (when ``checkpoint_dir`` is set) and returns. ``patience=1`` stops at the
    first evaluation that does not improve. Epochs without an evaluation
    (``fit(eval_every=k)``) neither count nor reset the count.

    The metric is ``"eval_"`` + a key of :meth:`FastTrainer.evaluate`'s result
    (``"eval_loss"``, ``"eval_token_accuracy"``, ...): a name holding ``"loss"`` is best
    low, anything else best high (:func:`hlbd_fast.evaluation.metric_direction`). It is
    read from ``record.eval`` in :meth:`on_epoch_end`, so a strategy listed before this
    one may add metrics of its own there.

    The best value, its epoch and the count go into checkpoints: a resumed run goes on
    counting. When it stops, :meth:`report` gives a :class:`StopReport` (``epoch``: the
    1-based epoch it stopped after, the metric, the best value and its epoch).

    Raises (at an epoch's end):
        ValueError: the epoch has no evaluation, none was ever seen, and ``fit`` was given
            no ``eval_data`` (or training runs through ``train_epoch``); or ``metric`` is
            not among the evaluation's metrics (the message lists them).

    Example::

        import torch
        from hlbd_fast import FastTrainer
        from hlbd_fast.models import Seq2SeqTransformer
        from hlbd_fast.strategies.stopping import EarlyStopping

        src, tgt = torch.randint(1, 50, (64, 10)), torch.randint(1, 50, (64, 10))  # token ids; 0 pads
        model = Seq2SeqTransformer(vocab_size=50, d_model=32, n_heads=2, d_ff=64, n_encoder_layers=1, n_decoder_layers=1)

        held_out = torch.randint(1, 50, (16, 10)), torch.randint(1, 50, (16, 10))
        trainer = FastTrainer(model, strategies=[EarlyStopping("eval_loss", patience=2)], progress=False, lr=1e-2)
        history = trainer.fit((src, tgt), epochs=50, eval_data=held_out)  # stops once it overfits
        stop = trainer.strategies[0]
        print(stop.report())  # StopReport(epoch=..., metric='eval_loss', best=..., best_epoch=...), or None

    Args:
        metric: ``"eval_"`` + an evaluation metric.
        patience: evaluations without improvement that stop the run (>= 1).
        min_delta: the margin (>= 0) by which an evaluation must beat the best to count.
    """

    def __init__(self, metric: str = "eval_loss", patience: int = 3, min_delta: float = 0.0) -> None:
        if not isinstance(metric, str) or not metric.startswith("eval_") or metric == "eval_":
            raise ValueError(f"EarlyStopping(metric={metric!r}): metric must be 'eval_' + an evaluation metric, e.g. 'eval_loss' or 'eval_token_accuracy'")
        self.metric = metric
        self.patience = check_positive_int("patience", patience, "EarlyStopping")
        self.min_delta = check_number("min_delta", min_delta, "EarlyStopping", low=0.0, low_inclusive=True, hint=", e.g. 0.0")
        self._best: float | None = None
        self._best_epoch: int | None = None
        self._wait = 0  # evaluations in a row without improvement
        self._evaluations = 0  # evaluations seen (over resumes)
        self._evaluation_planned: bool | None = None  # whether the current fit was given eval_data (None: unknown)
        self._stopped: StopReport | None = None  # where it stopped the run, once it did

    @property
    def direction(self) -> str:
        """``"min"`` or ``"max"``: which way the metric improves."""
        from ..evaluation import metric_direction  # here: evaluation imports the strategies package

        return metric_direction(self.metric)

    @property
    def best(self) -> float | None:
        """The best value seen so far (``None`` before the first evaluation)."""
        return self._best

    @property
    def wait(self) -> int:
        """Evaluations in a row that did not improve on :attr:`best`."""
        return self._wait

    def run_scope(self, trainer: "FastTrainer") -> ContextManager[Any]:
        """Note whether this ``fit`` evaluates (its ``eval_data``), to refuse a run that never will."""
        self._evaluation_planned = trainer.evaluates  # fit knows its eval_data before entering the run scopes
        return super().run_scope(trainer)

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta``."""
        if math.isnan(value):
            return False
        if self._best is None:
            return True
        if self.direction == "min":
            return value < self._best - self.min_delta
        return value > self._best + self.min_delta

    def on_epoch_end(self, trainer: "FastTrainer", record: "EpochRecord") -> None:
        if record.eval is None:
            self._check_evaluated()
            return
        value = self._read(record.eval)
        self._evaluations += 1
        if self.improves(value):
            self._best, self._best_epoch, self._wait = value, record.epoch, 0
            return
        self._wait += 1
        if self._wait >= self.patience:
            self._stopped = StopReport(record.epoch, self.metric, self._best, self._best_epoch)
            trainer.request_stop()

    def report(self) -> "StopReport | None":
        """Where it stopped the run (``None``: it did not)."""
        return self._stopped

    def _read(self, metrics: dict[str, float]) -> float:
        key = self.metric.removeprefix("eval_")
        if key not in metrics:
            available = ", ".join(repr("eval_" + k) for k in metrics)
            raise ValueError(f"EarlyStopping(metric={self.metric!r}): the evaluation has no such metric; it has {available}")
        return float(metrics[key])

    def _check_evaluated(self) -> None:
        if self._evaluations == 0 and self._evaluation_planned is False:
            raise ValueError(
                f"EarlyStopping(metric={self.metric!r}) needs evaluations: pass fit(..., eval_data=(src, tgt)) "
                "(train_epoch never evaluates), or drop EarlyStopping"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self._best, "best_epoch": self._best_epoch, "wait": self._wait, "evaluations": self._evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._best = None if state["best"] is None else float(state["best"])
        self._best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])
        self._wait = int(state["wait"])
        self._evaluations = int(state["evaluations"])
