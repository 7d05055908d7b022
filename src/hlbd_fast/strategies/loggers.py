"""Loggers: write what the loop already read back, with no host sync of their own.

Both log from two hooks whose figures are already on the host: :meth:`Strategy.on_loss_read`
(each read-back of the running loss; how often is the ``readback`` role's choice, e.g.
``DeferredLossSync(every=50)``) and :meth:`Strategy.on_epoch_end` (the finished
:class:`~hlbd_fast.history.EpochRecord`). A read-back that repeats the one before at the
same step (the read closing an epoch, or a stopped one, right after its last step's read)
brings nothing new and is not logged again, so a stopped and resumed run logs what an
uninterrupted one does. Files are opened in :meth:`Strategy.run_scope` and closed when it
exits, on every path (an error, Ctrl-C, a stop). Under several processes only the main
one writes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ContextManager, Iterator

from .._io import atomic_write, check_writable_dir, check_writable_file
from .base import Strategy

if TYPE_CHECKING:  # pragma: no cover
    from ..history import EpochRecord
    from ..meter import Figures
    from ..trainer import FastTrainer

__all__ = ["CSVLogger", "TensorBoardLogger"]

#: The CSV columns every file starts with; ``eval_<metric>`` columns follow.
CSV_COLUMNS: tuple[str, ...] = ("kind", "epoch", "step", "loss", "tokens", "lr", "seconds", "tokens_per_second")


def _eval_columns() -> tuple[str, ...]:
    from ..evaluation import METRICS  # here: evaluation imports the strategies package

    return tuple(f"eval_{m}" for m in METRICS)


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]], bool]:
    """The header and complete rows of an existing CSV file (empty when there is none).

    The third item says whether a last line cut short (by a kill during a write: no line
    end) was left out.
    """
    if not path.is_file():
        return [], [], False
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        text = f.read()
    cut = bool(text) and not text.endswith("\n")
    if cut:
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    return list(reader.fieldnames or []), list(reader), cut


def _write_rows(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """Replace ``path`` atomically with ``columns`` and ``rows``."""
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, restval="", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)

    def write(f: IO[bytes]) -> None:
        f.write(text.getvalue().encode("utf-8"))

    atomic_write(path, write)


class _Logger(Strategy):
    """A logger writes on the main process only, for the length of each run (opened and closed by ``run_scope``)."""

    _last_read: tuple[int, float, float] | None = None  # (step, loss, tokens) of the last read logged

    def run_scope(self, trainer: "FastTrainer") -> ContextManager[Any]:
        """Open for the run (main process only); closed on every exit path."""
        self._last_read = None
        if not trainer.roles.distribution.is_main:
            return contextlib.nullcontext()
        return self._open(trainer.global_step)

    def _new_read(self, trainer: "FastTrainer", figures: "Figures") -> bool:
        """Whether a read brings figures not logged yet (a repeat at the same step brings nothing)."""
        key = (trainer.global_step, float(figures.loss), float(figures.tokens))
        new, self._last_read = key != self._last_read, key
        return new

    def _open(self, step: int) -> ContextManager[Any]:  # pragma: no cover - every logger defines it
        raise NotImplementedError


class CSVLogger(_Logger):
    """Write one CSV row per loss read-back and one per epoch, with no host sync of its own.

    Columns: ``kind, epoch, step, loss, tokens, lr, seconds, tokens_per_second``, then
    ``eval_<metric>`` for every metric :meth:`FastTrainer.evaluate` can return
    (:data:`hlbd_fast.evaluation.METRICS`), so the header is complete from the first line;
    a metric outside that list (added to ``record.eval`` by another strategy) adds a
    column by rewriting the file atomically once.

    * ``kind="read"``: each read-back of the running figures (``on_loss_read``) that is
      not a repeat of the one before at the same step: the 1-based epoch in progress, the
      optimizer steps so far over the run, the epoch's running mean loss and its tokens so
      far. The epoch's final read is one of them (or repeats the last step's read).
    * ``kind="epoch"``: each finished epoch: the ``EpochRecord``'s loss, tokens, lr,
      seconds, tokens per second and evaluation metrics (empty when it did not evaluate).

    Values are written with ``repr`` precision: they read back equal to ``trainer.history``.
    Rows are flushed at every epoch end and the file is closed when ``fit`` (or
    ``train_epoch``) returns or raises: what was logged before an error is in the file.

    A run starting from step 0 truncates the file. A run that continues a trainer (a
    resumed checkpoint, a second ``fit`` or ``train_epoch`` call) appends to it, after
    dropping rows logged past the trainer's step (those of an interrupted run that the
    checkpoint does not hold) and a last line cut short by a kill, so a resumed run's file
    reads as one run.

    Example::

        import torch
        from hlbd_fast import FastTrainer
        from hlbd_fast.models import Seq2SeqTransformer
        from hlbd_fast.strategies import DeferredLossSync
        from hlbd_fast.strategies.loggers import CSVLogger

        src, tgt = torch.randint(1, 50, (64, 10)), torch.randint(1, 50, (64, 10))  # token ids; 0 pads
        model = Seq2SeqTransformer(vocab_size=50, d_model=32, n_heads=2, d_ff=64, n_encoder_layers=1, n_decoder_layers=1)

        logger = CSVLogger("runs/log.csv")
        trainer = FastTrainer(model, strategies=[DeferredLossSync(every=2), logger], progress=False)
        trainer.fit((src, tgt), epochs=2, eval_data=(src[:16], tgt[:16]))  # runs/log.csv: 4 rows

    Args:
        path: the CSV file (its directory is created).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"CSVLogger(path={path!r}): path must be a file path (str or pathlib.Path)")
        self.path = check_writable_file(path, "CSVLogger path")
        self._columns: list[str] = [*CSV_COLUMNS, *_eval_columns()]
        self._file: IO[str] | None = None
        self._writer: csv.DictWriter[str] | None = None

    @contextlib.contextmanager
    def _open(self, step: int) -> Iterator[None]:
        self._prepare(step)
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, self._columns, restval="")
        try:
            yield
        finally:
            self._file.close()
            self._file = self._writer = None

    def _prepare(self, step: int) -> None:
        """A new file with the header (step 0), or the existing one cut back to ``step`` with every column."""
        header, rows, cut = _read_rows(self.path) if step > 0 else ([], [], False)
        kept = [r for r in rows if _step(r) <= step]
        for name in header:
            if name not in self._columns:
                self._columns.append(name)
        if not header or cut or len(kept) < len(rows) or header != self._columns:
            _write_rows(self.path, self._columns, kept)

    def on_loss_read(self, trainer: "FastTrainer", figures: "Figures") -> None:
        if self._new_read(trainer, figures):
            self._write({"kind": "read", "epoch": trainer.epoch + 1, "step": trainer.global_step, "loss": figures.loss, "tokens": int(figures.tokens)})

    def on_epoch_end(self, trainer: "FastTrainer", record: "EpochRecord") -> None:
        row: dict[str, Any] = {
            "kind": "epoch",
            "epoch": record.epoch,
            "step": trainer.global_step,
            "loss": record.loss,
            "tokens": record.tokens,
            "lr": "" if record.lr is None else record.lr,
            "seconds": record.seconds,
            "tokens_per_second": record.tokens_per_second,
        }
        row.update({f"eval_{k}": v for k, v in (record.eval or {}).items()})
        self._write(row)
        if self._file is not None:
            self._file.flush()

    def _write(self, row: dict[str, Any]) -> None:
        if self._writer is None or self._file is None:
            return  # not the main process, or outside a run
        new = [k for k in row if k not in self._columns]
        if new:  # a metric nobody announced: rewrite the file once with the wider header
            self._file.flush()
            self._columns.extend(new)
            _write_rows(self.path, self._columns, _read_rows(self.path)[1])
            self._file.close()
            self._file = open(self.path, "a", newline="", encoding="utf-8")
            self._writer = csv.DictWriter(self._file, self._columns, restval="")
        self._writer.writerow(row)


def _step(row: dict[str, str]) -> int:
    try:
        return int(row.get("step") or 0)
    except ValueError:
        return 0


def _summary_writer() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or an ImportError naming the extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(
            "TensorBoardLogger needs the tensorboard package, which is not installed: pip install hlbd-fast[tensorboard] (or pip install tensorboard)"
        ) from e
    return SummaryWriter


class TensorBoardLogger(_Logger):
    """Write TensorBoard scalars from what the loop already read back (no host sync of its own).

    Scalars, all at the run's optimizer step (``trainer.global_step``) so every plot
    shares one x axis: ``train/loss`` at each read-back of the running loss (the epoch's
    running mean; how often: the ``readback`` role, e.g. ``DeferredLossSync(every=50)``;
    a repeat of the read before at the same step is not written again),
    and at each epoch's end ``epoch/loss``, ``epoch/lr``, ``epoch/tokens_per_second`` and
    ``eval/<metric>`` for each evaluation metric. Flushed at every epoch end; the writer
    is opened for each run and closed when it returns or raises. A run that continues a
    trainer (a resumed checkpoint) purges events logged past its step by an interrupted
    run (``SummaryWriter(purge_step=...)``). Only the main process writes.

    Needs the optional ``tensorboard`` package (``pip install hlbd-fast[tensorboard]``).

    Example::

        import torch
        from hlbd_fast import FastTrainer
        from hlbd_fast.models import Seq2SeqTransformer
        from hlbd_fast.strategies.loggers import TensorBoardLogger

        src, tgt = torch.randint(1, 50, (64, 10)), torch.randint(1, 50, (64, 10))  # token ids; 0 pads
        model = Seq2SeqTransformer(vocab_size=50, d_model=32, n_heads=2, d_ff=64, n_encoder_layers=1, n_decoder_layers=1)

        trainer = FastTrainer(model, strategies=[TensorBoardLogger("runs/exp1")], progress=False)
        trainer.fit((src, tgt), epochs=2, eval_data=(src[:16], tgt[:16]))  # then: tensorboard --logdir runs

    Args:
        log_dir: the directory the event files go to (created).

    Raises:
        ImportError: tensorboard is not installed (the message names the extra).
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        if not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"TensorBoardLogger(log_dir={log_dir!r}): log_dir must be a directory path (str or pathlib.Path)")
        self._writer_class = _summary_writer()
        self.log_dir = check_writable_dir(log_dir, "TensorBoardLogger log_dir")
        self._writer: Any = None

    @contextlib.contextmanager
    def _open(self, step: int) -> Iterator[None]:
        self._writer = self._writer_class(str(self.log_dir), purge_step=step + 1 if step > 0 else None)
        try:
            yield
        finally:
            self._writer.close()
            self._writer = None

    def on_loss_read(self, trainer: "FastTrainer", figures: "Figures") -> None:
        if self._new_read(trainer, figures) and self._writer is not None:
            self._writer.add_scalar("train/loss", figures.loss, trainer.global_step)

    def on_epoch_end(self, trainer: "FastTrainer", record: "EpochRecord") -> None:
        if self._writer is None:
            return
        step = trainer.global_step
        self._writer.add_scalar("epoch/loss", record.loss, step)
        if record.lr is not None:
            self._writer.add_scalar("epoch/lr", record.lr, step)
        self._writer.add_scalar("epoch/tokens_per_second", record.tokens_per_second, step)
        for name, value in (record.eval or {}).items():
            self._writer.add_scalar(f"eval/{name}", value, step)
        self._writer.flush()
