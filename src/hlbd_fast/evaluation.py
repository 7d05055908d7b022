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
from torch.utils.data import DataLoader, IterableDataset

from ._validation import check_positive_int, is_token_pair, token_loss_sum, token_pair
from .batches import DataSource, move
from .checkpoint import rng_state, set_rng_state, write_trainer_checkpoint
from .history import Best
from .packing import packed_sizes
from .strategies.padding import row_lengths

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import FastTrainer

__all__ = ["evaluate", "EvalPlan", "METRICS", "FIT_METRICS", "metric_direction", "BEST_NAME", "check_eval_data"]

#: File name of the best checkpoint written beside ``last.pt`` by ``fit(keep_best=...)``.
BEST_NAME = "best.pt"
#: Metrics ``fit(keep_best=...)`` can follow.
_KEEPABLE = ("eval_loss", "eval_token_accuracy")

#: The metrics :func:`evaluate` returns (``exact_match`` only with ``generate=True``).
METRICS: tuple[str, ...] = ("loss", "token_accuracy", "exact_match", "tokens", "samples")
#: The metrics of the evaluations ``fit(eval_data=...)`` makes (they do not generate).
FIT_METRICS: tuple[str, ...] = ("loss", "token_accuracy", "tokens", "samples")


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
    host_src, host_tgt = src.cpu(), tgt.cpu()
    # per row, as Python numbers read once: the lengths TrimPadding cuts to, the sizes Unpad packs (no read-back per batch)
    src_len, tgt_len = row_lengths(host_src, trainer.pad_id).tolist(), row_lengths(host_tgt, trainer.pad_id).tolist()
    src_packed, tgt_packed = (x.tolist() for x in packed_sizes(host_src, host_tgt, trainer.pad_id))
    src, tgt = move(src, trainer.device), move(tgt, trainer.device)
    size = source.batch_size
    for i in range(0, src.shape[0], size):
        s, t, rows = src[i : i + size], tgt[i : i + size], slice(i, i + size)
        packed = (sum(src_packed[rows]), sum(tgt_packed[rows]))
        trainer.known_lengths.remember(s, t, max(src_len[rows]), max(tgt_len[rows]), packed)
        yield s, t


def _rows(batch: Any) -> int:
    """Samples in a batch: a pair's rows, a dict's first tensor's rows."""
    if isinstance(batch, dict):
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        return int(first.shape[0]) if first is not None else 0
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    return 0


def _special_ids(tgt: torch.Tensor, pad_id: int, bos_id: int | None, eos_id: int | None) -> tuple[int, int | None]:
    """BOS and EOS to generate with: as given, else read from the targets (one read of four numbers).

    BOS: the id every target starts with (they must agree: the model decodes from one id).
    EOS: the id every target ends with (its last non-pad id), when they all agree; else
    ``None`` (the model's own default: such targets have no common end token).
    """
    if bos_id is not None and eos_id is not None:
        return bos_id, eos_id
    body = tgt[:, 1:]
    real = body.ne(pad_id)
    last = body.gather(1, (real * torch.arange(1, body.shape[1] + 1, device=body.device)).argmax(dim=1, keepdim=True))[:, 0]
    has = real.any(dim=1)
    big = torch.iinfo(torch.int64).max
    ends = torch.stack([torch.where(has, last, big).min(), torch.where(has, last, -1).max()])
    b_lo, b_hi, e_lo, e_hi = torch.cat([torch.stack([tgt[:, 0].min(), tgt[:, 0].max()]), ends]).tolist()
    if bos_id is None:
        if b_lo != b_hi:
            raise ValueError(
                f"evaluate(generate=True): the targets start with different ids ({b_lo} to {b_hi}), so the id to decode from "
                "is unknown; pass bos_id=... (targets are BOS text EOS PAD..., as hlbd_fast.data.encode_pairs makes them)"
            )
        bos_id = int(b_lo)
    if eos_id is None and e_lo == e_hi:
        eos_id = int(e_lo)
    return bos_id, eos_id


def _exact_matches(model: nn.Module, src: torch.Tensor, tgt: torch.Tensor, pad_id: int, bos_id: int | None, eos_id: int | None) -> torch.Tensor:
    """How many rows' greedy output equals the target up to and including its end token (0-d tensor)."""
    target = tgt[:, 1:]
    kwargs: dict[str, Any] = {}
    params = inspect.signature(model.generate).parameters
    if "max_new_tokens" in params:
        limit = getattr(model, "max_length", None)
        kwargs["max_new_tokens"] = target.shape[1] if limit is None else min(target.shape[1], int(limit) - 1)
    bos, eos = _special_ids(tgt, pad_id, bos_id, eos_id)
    for name, given, value in (("bos_id", bos_id, bos), ("eos_id", eos_id, eos)):
        if name in params and value is not None:
            kwargs[name] = value
        elif given is not None and name not in params:
            raise ValueError(f"evaluate(generate=True, {name}={given}): {type(model).__name__}.generate takes no {name}; leave it out")
    out = model.generate(src, **kwargs)
    width = max(out.shape[1], target.shape[1])
    a = torch.nn.functional.pad(out.to(target.device), (0, width - out.shape[1]), value=pad_id)
    b = torch.nn.functional.pad(target, (0, width - target.shape[1]), value=pad_id)
    return a.eq(b).all(dim=1).sum()


def evaluate(
    trainer: "FastTrainer",
    data: Any,
    batch_size: int | None = None,
    generate: bool = False,
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    what: str = "data",
) -> dict[str, float]:
    """Mean token loss, token accuracy (and exact match) of the trainer's model on ``data``.

    Args:
        trainer: the trainer whose model, device, pad id and precision are used.
        data: what :meth:`FastTrainer.fit` takes; read in order, not shuffled.
        batch_size: rows per forward pass; default the trainer's ``batch_size``.
        generate: also decode every source greedily with ``model.generate(src, bos_id=...,
            eos_id=...)`` and report ``"exact_match"``, the share of samples whose output
            equals the target up to its end token (slower: one forward per generated token,
            with host syncs).
        bos_id: the id decoding starts from; default the id every target starts with.
        eos_id: the end token; default the id every target of a batch ends with (its last
            non-pad id), or, when they do not agree, the model's own default.
        what: the argument name errors give ``data`` (``fit`` says ``eval_data``).

    Returns:
        ``{"loss", "token_accuracy", "tokens", "samples"}`` (+ ``"exact_match"``): the summed
        cross-entropy over non-pad target tokens divided by their count, the share of those
        positions whose argmax logit is the target, the token and sample counts.

    Raises:
        ValueError: ``generate=True`` for a model without a ``generate`` method; ``data``
            has no target token to score (empty, exhausted, or all padding).
    """
    if generate and not callable(getattr(trainer.model, "generate", None)):
        raise ValueError(
            f"evaluate(generate=True): {type(trainer.model).__name__} has no generate(src) method to decode with; "
            "use generate=False for loss and token accuracy"
        )
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
        if value is not None:
            check_positive_int(name, value, "evaluate", minimum=0)
    source = _source(trainer, data, batch_size, what)
    precision = trainer.roles.precision
    sums = torch.zeros(5, dtype=torch.float64, device=trainer.device)  # loss, tokens, correct, exact, samples
    with evaluation_mode(trainer) as model:
        for batch in _eval_batches(trainer, source):
            with precision.forward_context(trainer):
                logits, targets = trainer.forward_logits(model, batch)  # the training forward's seam
            real = targets.ne(trainer.pad_id)
            correct = (logits.argmax(dim=-1).eq(targets) & real).sum()
            exact = correct.new_zeros(())
            if generate:
                exact = _exact_matches(model, *token_pair(batch, "evaluate(generate=True)"), trainer.pad_id, bos_id, eos_id)
            parts = [token_loss_sum(logits.float(), targets, trainer.pad_id), real.sum(), correct, exact]
            sums[:4] += torch.stack([x.to(torch.float64) for x in parts])
            sums[4] += _rows(batch)
        trainer.known_lengths.forget()
        loss_sum, tokens, correct, exact, samples = sums.tolist()  # the one host sync of an evaluation
    if tokens == 0:
        raise ValueError(_no_tokens(what, samples))
    metrics = {
        "loss": loss_sum / tokens,
        "token_accuracy": correct / tokens,
        "tokens": tokens,
        "samples": samples,
    }
    if generate:
        metrics["exact_match"] = exact / max(samples, 1.0)
    return metrics


def _no_tokens(what: str, samples: float) -> str:
    if samples:
        return (
            f"{what} gave {samples:g} samples whose targets are all padding: there is no token to score, so loss and "
            f"accuracy are undefined. Pass samples with targets (BOS text EOS PAD...)"
        )
    return (
        f"{what} gave no samples this time: there is nothing to evaluate (a loss of 0.0 would be no result). "
        f"A single-pass iterable (an IterableDataset whose __iter__ cannot start over, a generator) is exhausted "
        f"after its first pass: pass {what} as (src, tgt) tensors, a map-style Dataset, or an IterableDataset "
        "whose __iter__ starts over each time"
    )


def _length(data: Any) -> int | None:
    """Samples in ``data`` when it says (a pair's rows, a Dataset's or a DataLoader's dataset's len)."""
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return int(data[0].shape[0]) if data[0].dim() > 0 else None
    try:
        return len(data)
    except TypeError:
        return None


def _source(trainer: "FastTrainer", data: Any, batch_size: int | None, what: str) -> DataSource:
    """``data`` as a source to evaluate, errors naming ``what``; empty data is refused as nothing to evaluate."""
    if _length(data) == 0:
        raise ValueError(f"{what} is empty: there is nothing to evaluate on; pass held-out (src, tgt) pairs, or leave {what} out")
    try:
        return trainer.make_source(data, batch_size, shuffle=False)
    except (TypeError, ValueError) as e:
        if type(e) not in (TypeError, ValueError) or what == "data":
            raise
        msg = str(e)
        raise type(e)(what + msg[4:] if msg.startswith("data") else f"{what}: {msg}") from None


def check_eval_data(trainer: "FastTrainer", data: Any, what: str = "eval_data") -> None:
    """Check evaluation data before any training step: its form, and the form and ids of its first batch.

    Tensors are checked whole (:meth:`FastTrainer.make_source`). A map-style Dataset or a
    DataLoader over one gives its first batch, collated as evaluation collates it, which must
    be what the trainer's forward takes (:meth:`FastTrainer.count_tokens` reads its form)
    with ids inside the vocabulary; the RNG is left as it was. An iterable dataset is not
    read ahead (reading would consume it), but one whose ``iter()`` returns the same
    iterator every time is refused: it would be exhausted after the first evaluation.
    """
    source = _source(trainer, data, None, what)
    if source.tensors is not None:
        return
    dataset = source.dataset if source.dataset is not None else source.loader.dataset  # type: ignore[union-attr]
    if isinstance(dataset, IterableDataset):
        if iter(dataset) is iter(dataset):
            raise ValueError(
                f"{what} is a single-pass iterable ({type(dataset).__name__}.__iter__ returns the same iterator each time): "
                f"it would be exhausted after the first evaluation. Pass {what} as (src, tgt) tensors, a map-style "
                "Dataset, or an IterableDataset whose __iter__ starts over each time"
            )
        return
    _check_first_batch(trainer, source, what)


def _check_first_batch(trainer: "FastTrainer", source: DataSource, what: str) -> None:
    rng = rng_state()  # a DataLoader draws its base seed (and a shuffling one its order) from torch's RNG
    try:
        loader = source.loader if source.loader is not None else DataLoader(source.dataset, batch_size=source.batch_size)
        batch = next(iter(loader), None)
    finally:
        set_rng_state(rng)
    if batch is None:
        raise ValueError(_no_tokens(what, 0))
    if is_token_pair(batch):
        trainer.validate_tensors(batch[0], batch[1], where=f"{what} (its first batch)")
    try:
        trainer.count_tokens(trainer.to_device(batch))  # the form the forward seam takes (a subclass's own format too)
    except (TypeError, ValueError) as e:
        if type(e) not in (TypeError, ValueError):
            raise
        raise type(e)(f"{what} (its first batch): {e}") from None


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
            check_eval_data(trainer, data)  # bad evaluation data fails now, not after an epoch
        return cls(data, every, epochs, keep_best)

    def run(self, trainer: "FastTrainer", epoch: int) -> dict[str, float] | None:
        """The metrics after 1-based ``epoch``, when it is due."""
        if self.data is None or (epoch % self.every and epoch != self.epochs):
            return None
        t0 = time.perf_counter()
        metrics = evaluate(trainer, self.data, what="eval_data")
        trainer.history.eval_seconds += time.perf_counter() - t0  # not in any epoch's seconds
        return metrics

    def keep_if_best(self, trainer: "FastTrainer", record: Any) -> None:
        """Write ``best.pt`` (the evaluated weights: EMA's when it is on) when ``record`` improved the metric.

        The record to beat is the history's best only when it follows the same metric and
        its ``best.pt`` is the one in this ``checkpoint_dir``; otherwise this evaluation
        starts a new record. A NaN is never best, nor an evaluation that scored no token.
        """
        if self.keep_best is None or not record.eval or trainer.checkpoint_path is None or not record.eval.get("tokens", 1):
            return  # an evaluation of no token is no result
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
