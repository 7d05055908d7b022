"""EarlyStopping: stop ``fit`` when an evaluation metric stops improving."""

from __future__ import annotations

import difflib
import math
import warnings
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
    counting, and a run it stopped stays stopped: a ``fit`` that resumes it (or a second
    ``fit`` of the same trainer) trains nothing more and warns so; raise ``patience`` to
    train on. When it stops, :meth:`report` gives a :class:`StopReport` (``epoch``: the
    1-based epoch it stopped after, the metric, the best value and its epoch).

    Raises:
        ValueError: before the first step of a ``fit`` with ``eval_data``, when ``metric``
            is not one of its evaluation's metrics (``eval_loss``, ``eval_token_accuracy``,
            ``eval_tokens``, ``eval_samples``) and no strategy listed before this one could
            add it, or when it is a near miss of one of them (a typo); at an epoch's end,
            when the epoch has no evaluation, none was ever seen, and ``fit`` was given no
            ``eval_data`` (or training runs through ``train_epoch``), or when ``metric`` is
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
        """Before the run's first step: check the metric, note whether ``fit`` evaluates, keep a stopped run stopped."""
        self._evaluation_planned = trainer.evaluates  # fit knows its eval_data before entering the run scopes
        if trainer.evaluates:
            self._check_metric(trainer)
            if self._wait >= self.patience:
                self._stay_stopped(trainer)
        return super().run_scope(trainer)

    def _check_metric(self, trainer: "FastTrainer") -> None:
        """Refuse a metric the run's evaluations will not have, before any step trains."""
        from ..evaluation import FIT_METRICS  # here: evaluation imports the strategies package

        key = self.metric.removeprefix("eval_")
        if key in FIT_METRICS:
            return
        before = trainer.strategies[: next(i for i, s in enumerate(trainer.strategies) if s is self)]
        may_add = any(type(s).on_epoch_end is not Strategy.on_epoch_end for s in before)  # a strategy listed before may add metrics
        near = difflib.get_close_matches(key, FIT_METRICS, n=1, cutoff=0.8)
        if may_add and not near:
            return
        hint = f"did you mean 'eval_{near[0]}'? " if near else ""
        available = ", ".join(repr("eval_" + k) for k in FIT_METRICS)
        raise ValueError(f"EarlyStopping(metric={self.metric!r}): fit's evaluation has no such metric; {hint}it has {available}")

    def _stay_stopped(self, trainer: "FastTrainer") -> None:
        """A run this strategy stopped (its state says so) trains no more epochs when resumed."""
        self._stopped = StopReport(trainer.epoch, self.metric, self._best, self._best_epoch)
        warnings.warn(
            f"EarlyStopping(metric={self.metric!r}) stopped this run after epoch {trainer.epoch} ({self._wait} evaluations "
            f"without improvement, patience {self.patience}; best {self._best} at epoch {self._best_epoch}): fit trains "
            "nothing more. To train on, build the trainer with a larger patience (or without EarlyStopping)",
            stacklevel=4,
        )
        trainer.request_stop()

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
