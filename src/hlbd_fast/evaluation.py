"""Evaluation: what the model learned, measured on the device with one read-back.

:func:`evaluate` is :meth:`FastTrainer.evaluate`. It runs the weights the trainer holds
(the averaged ones inside :class:`~hlbd_fast.strategies.EMA`'s scope) in eval mode,
without gradients, under the trainer's precision, and leaves the model's mode, its
weights and every random generator exactly as it found them, so a fit that evaluates
trains the very weights of one that does not.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from ._validation import check_positive_int, token_loss_sum, token_pair
from .batches import DataSource, move
from .checkpoint import rng_state, set_rng_state, write_trainer_checkpoint
from .history import Best
from .strategies.padding import row_lengths

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import FastTrainer

__all__ = ["evaluate", "EvalPlan", "METRICS", "metric_direction", "BEST_NAME"]

#: File name of the best checkpoint written beside ``last.pt`` by ``fit(keep_best=...)``.
BEST_NAME = "best.pt"
#: Metrics ``fit(keep_best=...)`` can follow.
_KEEPABLE = ("eval_loss", "eval_token_accuracy")

#: The metrics :func:`evaluate` returns (``exact_match`` only with ``generate=True``).
METRICS: tuple[str, ...] = ("loss", "token_accuracy", "exact_match", "tokens", "samples")


def metric_direction(name: str) -> str:
    """``"min"`` for a loss, ``"max"`` for an accuracy or a match rate."""
    return "min" if "loss" in name else "max"


@contextlib.contextmanager
def evaluation_mode(trainer: "FastTrainer") -> Iterator[nn.Module]:
    """The model in eval mode without gradients, inside every strategy's eval scope; all restored after."""
    model = trainer.model
    rng, was_training = rng_state(), model.training
    try:
        with contextlib.ExitStack() as stack:
            for s in trainer.strategies:
                stack.enter_context(s.eval_scope(trainer))
            model.eval()
            with torch.no_grad():
                yield model
    finally:
        model.train(was_training)
        set_rng_state(rng)  # generation may sample; nothing evaluation draws reaches training


log = logging.getLogger("hlbd_fast")


def _eval_batches(trainer: "FastTrainer", source: DataSource) -> Iterator[Any]:
    """The data in order, on the device, prepared as training prepares it where results are kept.

    Tensors move once and are sliced there (no copy per batch), their lengths known on the
    host (``trainer.known_lengths``: trimming them needs no sync). Every strategy that
    ``prepares_eval_batches`` (trimming, proven on the model) prepares each batch.
    """
    for batch in _device_batches(trainer, source):
        for s in trainer.strategies:
            if s.prepares_eval_batches:
                batch = s.prepare_batch(trainer, batch)
        yield batch


def _device_batches(trainer: "FastTrainer", source: DataSource) -> Iterator[Any]:
    if source.tensors is None:  # every process reads all of it: no sharding, no stand-ins
        loader = source.loader if source.loader is not None else DataLoader(source.dataset, batch_size=source.batch_size)
        for batch in loader:
            yield trainer.to_device(batch)
        return
    src, tgt = source.tensors
    src_len, tgt_len = row_lengths(src.cpu(), trainer.pad_id), row_lengths(tgt.cpu(), trainer.pad_id)
    src, tgt = move(src, trainer.device), move(tgt, trainer.device)
    size = source.batch_size
    for i in range(0, src.shape[0], size):
        s, t = src[i : i + size], tgt[i : i + size]
        trainer.known_lengths.remember(s, t, int(src_len[i : i + size].max()), int(tgt_len[i : i + size].max()))
        yield s, t


def _rows(batch: Any) -> int:
    """Samples in a batch: a pair's rows, a dict's first tensor's rows."""
    if isinstance(batch, dict):
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        return int(first.shape[0]) if first is not None else 0
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    return 0


def _exact_matches(model: nn.Module, src: torch.Tensor, tgt: torch.Tensor, pad_id: int) -> torch.Tensor:
    """How many rows' greedy output equals the target up to and including its end token (0-d tensor)."""
    target = tgt[:, 1:]
    kwargs: dict[str, Any] = {}
    params = inspect.signature(model.generate).parameters
    if "max_new_tokens" in params:
        limit = getattr(model, "max_length", None)
        kwargs["max_new_tokens"] = target.shape[1] if limit is None else min(target.shape[1], int(limit) - 1)
    out = model.generate(src, **kwargs)
    width = max(out.shape[1], target.shape[1])
    a = torch.nn.functional.pad(out.to(target.device), (0, width - out.shape[1]), value=pad_id)
    b = torch.nn.functional.pad(target, (0, width - target.shape[1]), value=pad_id)
    return a.eq(b).all(dim=1).sum()


def evaluate(trainer: "FastTrainer", data: Any, batch_size: int | None = None, generate: bool = False) -> dict[str, float]:
    """Mean token loss, token accuracy (and exact match) of the trainer's model on ``data``.

    Args:
        trainer: the trainer whose model, device, pad id and precision are used.
        data: what :meth:`FastTrainer.fit` takes; read in order, not shuffled.
        batch_size: rows per forward pass; default the trainer's ``batch_size``.
        generate: also decode every source greedily with ``model.generate(src)`` and report
            ``"exact_match"``, the share of samples whose output equals the target up to its
            end token (slower: one forward per generated token, with host syncs).

    Returns:
        ``{"loss", "token_accuracy", "tokens", "samples"}`` (+ ``"exact_match"``): the summed
        cross-entropy over non-pad target tokens divided by their count, the share of those
        positions whose argmax logit is the target, the token and sample counts.

    Raises:
        ValueError: ``generate=True`` for a model without a ``generate`` method.
    """
    if generate and not callable(getattr(trainer.model, "generate", None)):
        raise ValueError(
            f"evaluate(generate=True): {type(trainer.model).__name__} has no generate(src) method to decode with; "
            "use generate=False for loss and token accuracy"
        )
    source = trainer.make_source(data, batch_size, shuffle=False)
    precision = trainer.roles.precision
    sums = torch.zeros(5, dtype=torch.float64, device=trainer.device)  # loss, tokens, correct, exact, samples
    with evaluation_mode(trainer) as model:
        for batch in _eval_batches(trainer, source):
            with precision.forward_context(trainer):
                logits, targets = trainer.forward_logits(model, batch)  # the training forward's seam
            real = targets.ne(trainer.pad_id)
            correct = (logits.argmax(dim=-1).eq(targets) & real).sum()
            exact = _exact_matches(model, *token_pair(batch, "evaluate(generate=True)"), trainer.pad_id) if generate else correct.new_zeros(())
            parts = [token_loss_sum(logits.float(), targets, trainer.pad_id), real.sum(), correct, exact]
            sums[:4] += torch.stack([x.to(torch.float64) for x in parts])
            sums[4] += _rows(batch)
        trainer.known_lengths.forget()
        loss_sum, tokens, correct, exact, samples = sums.tolist()  # the one host sync of an evaluation
    metrics = {
        "loss": loss_sum / max(tokens, 1.0),
        "token_accuracy": correct / max(tokens, 1.0),
        "tokens": tokens,
        "samples": samples,
    }
    if generate:
        metrics["exact_match"] = exact / max(samples, 1.0)
    return metrics


@dataclass
class EvalPlan:
    """What ``fit`` evaluates and keeps: its ``eval_data``, ``eval_every`` and ``keep_best``."""

    data: Any  # evaluated after every ``every`` epochs and after the last; None: no evaluation
    every: int
    epochs: int  # the fit's total epochs (the last is always evaluated)
    keep_best: str | None  # "eval_loss" or "eval_token_accuracy"

    @classmethod
    def make(cls, trainer: "FastTrainer", data: Any, every: int, keep_best: str | None, checkpoint_dir: Any, epochs: int) -> "EvalPlan":
        """Check ``fit``'s evaluation arguments together, before any work."""
        check_positive_int("eval_every", every)
        if keep_best is not None:
            if keep_best not in _KEEPABLE:
                raise ValueError(f"keep_best={keep_best!r} is not one of {_KEEPABLE}")
            if data is None:
                raise ValueError(f"keep_best={keep_best!r} needs eval_data=... to evaluate on")
            if checkpoint_dir is None:
                raise ValueError(f"keep_best={keep_best!r} needs checkpoint_dir=... to write {BEST_NAME} in")
        if data is not None:
            trainer.make_source(data, None, shuffle=False)  # bad evaluation data fails now, not after an epoch
        return cls(data, every, epochs, keep_best)

    def run(self, trainer: "FastTrainer", epoch: int) -> dict[str, float] | None:
        """The metrics after 1-based ``epoch``, when it is due."""
        if self.data is None or (epoch % self.every and epoch != self.epochs):
            return None
        t0 = time.perf_counter()
        metrics = evaluate(trainer, self.data)
        trainer.history.eval_seconds += time.perf_counter() - t0  # not in any epoch's seconds
        return metrics

    def keep_if_best(self, trainer: "FastTrainer", record: Any) -> None:
        """Write ``best.pt`` (the evaluated weights: EMA's when it is on) when ``record`` improved the metric.

        The record to beat is the history's best only when it follows the same metric and
        its ``best.pt`` is the one in this ``checkpoint_dir``; otherwise this evaluation
        starts a new record. A NaN is never best.
        """
        if self.keep_best is None or not record.eval or trainer.checkpoint_path is None:
            return
        name = self.keep_best.removeprefix("eval_")
        value = float(record.eval[name])
        path = str(trainer.checkpoint_path.with_name(BEST_NAME))
        if not _improves(trainer.history.best, self.keep_best, path, value):
            return
        written = path if trainer.roles.distribution.is_main else None
        trainer.history.best = Best(self.keep_best, value, record.epoch, written)
        if written is not None:
            with contextlib.ExitStack() as stack:
                for s in trainer.strategies:
                    stack.enter_context(s.eval_scope(trainer))
                write_trainer_checkpoint(trainer, trainer.checkpoint_path.with_name(BEST_NAME), None)
            log.info("%s %.4f at epoch %d: %s written", self.keep_best, value, record.epoch, BEST_NAME)


def _improves(best: Best | None, metric: str, path: str, value: float) -> bool:
    """Whether ``value`` of ``metric`` beats ``best`` (a best of another metric, or of another best.pt, is no record)."""
    if math.isnan(value):
        return False
    if best is None or best.metric != metric or (best.path is not None and best.path != path):
        return True
    return value < best.value if metric_direction(metric) == "min" else value > best.value
