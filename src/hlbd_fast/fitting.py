"""What ``fit`` does around the loop: its inputs checked before any step, its checkpoint files, resume.

:meth:`FastTrainer.fit <hlbd_fast.trainer.FastTrainer.fit>` calls :func:`begin` (every
argument, the training data and one batch of the evaluation data checked; ``checkpoint_dir``
opened; ``last.pt`` loaded when resuming, and checked against the data), runs its epochs,
and after each finished one calls :func:`after_epoch` (``best.pt`` first, then ``last.pt``,
so ``last.pt`` carries the best record that ``best.pt`` holds). A mid-epoch stop writes
:func:`write_mid_epoch`; a mid-epoch resume replays the epoch's start with
:func:`resume_epoch`. :meth:`FastTrainer.save`, ``load`` and ``load_state_dict`` call
:func:`save`, :func:`load` and :func:`apply`.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ._io import check_checkpoint_files, check_writable_dir
from ._validation import check_bool, check_positive_int
from .batches import DataSource
from .checkpoint import (
    CHECKPOINT_NAME,
    apply_trainer_state,
    check_resume,
    mid_epoch_state,
    read_checkpoint,
    set_rng_state,
    write_trainer_checkpoint,
)
from .evaluation import BEST_NAME, EvalPlan
from .history import EpochRecord

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import FastTrainer

__all__ = ["begin", "after_epoch", "save", "load", "apply", "write_mid_epoch", "resume_epoch"]


# ---------------------------------------------------------------------------- before the first step
def begin(
    trainer: "FastTrainer",
    data: Any,
    epochs: int,
    batch_size: int | None,
    shuffle: bool,
    *,
    checkpoint_dir: str | os.PathLike[str] | None,
    checkpoint_every: int,
    resume: bool,
    eval_data: Any,
    eval_every: int,
    keep_best: str | None,
) -> tuple[DataSource, EvalPlan]:
    """Check everything ``fit`` was given, then open its checkpoints (loading ``last.pt`` when resuming)."""
    check_positive_int("epochs", epochs)
    check_positive_int("checkpoint_every", checkpoint_every)
    check_bool("resume", resume)
    source = trainer.make_source(data, batch_size, shuffle)
    plan = EvalPlan.make(trainer, eval_data, eval_every, keep_best, checkpoint_dir, epochs)
    if checkpoint_dir is not None:
        trainer.checkpoint_path = _checkpoint_path(checkpoint_dir)
    elif resume:
        raise ValueError("resume=True needs checkpoint_dir=... to find last.pt in")
    if resume and trainer.checkpoint_path is not None and trainer.checkpoint_path.exists():
        load(trainer, trainer.checkpoint_path)
    if trainer._resume is not None:  # a mid-epoch checkpoint, loaded now or by load() before
        check_resume(trainer._resume, source, trainer.roles.distribution)
    return source, plan


def _checkpoint_path(checkpoint_dir: str | os.PathLike[str]) -> Path:
    """``checkpoint_dir/last.pt``, its directory writable and neither file name taken by a directory."""
    path = check_writable_dir(checkpoint_dir, "checkpoint_dir") / CHECKPOINT_NAME
    check_checkpoint_files(path.parent, (CHECKPOINT_NAME, BEST_NAME))
    return path


# ---------------------------------------------------------------------------- after an epoch
def after_epoch(trainer: "FastTrainer", plan: EvalPlan, record: EpochRecord, epochs: int, every: int, stopping: bool) -> None:
    """``best.pt`` when the epoch improved the kept metric, then ``last.pt`` when one is due.

    In this order ``last.pt`` holds the best record of the ``best.pt`` beside it: a resume
    compares with the true best and never overwrites it with a worse epoch.
    """
    if trainer.checkpoint_path is None:
        return
    plan.keep_if_best(trainer, record)
    if trainer.epoch % every == 0 or trainer.epoch == epochs or stopping:
        save(trainer, trainer.checkpoint_path)


# ---------------------------------------------------------------------------- files
def save(trainer: "FastTrainer", path: Path) -> None:
    """Write the trainer's state at an epoch boundary (one process writes)."""
    if trainer.roles.distribution.is_main:
        write_trainer_checkpoint(trainer, path, None)


def write_mid_epoch(trainer: "FastTrainer", path: Path, epoch_state: dict[str, Any]) -> None:
    """Write where a stop left the epoch; the figures were read (and found finite) just before."""
    mid = mid_epoch_state(trainer, epoch_state)
    if trainer.roles.distribution.is_main:
        write_trainer_checkpoint(trainer, path, mid)


def load(trainer: "FastTrainer", path: Path) -> None:
    """Read, check and apply a checkpoint file."""
    apply(trainer, read_checkpoint(path), path)


def apply(trainer: "FastTrainer", state: dict[str, Any], path: Path | None) -> None:
    """Check ``state`` whole, apply it, and keep its mid-epoch part for the next epoch to resume from."""
    mid = apply_trainer_state(trainer, state, path)
    trainer._resume = None if mid is None else {"rng": state["rng"], **mid}


# ---------------------------------------------------------------------------- a mid-epoch resume
def resume_epoch(trainer: "FastTrainer", batches: Iterator[Any], resume: dict[str, Any]) -> dict[str, Any]:
    """Replay the interrupted epoch's start: same batch order and RNG stream, its batches done skipped, its figures back.

    Returns the epoch's state (``micro``: the micro-batches already trained).
    """
    skip = int(resume["micro_batch_in_epoch"])
    set_rng_state(resume["epoch_start_rng"])  # same batch order, same RNG stream as the interrupted run
    for _ in itertools.islice(batches, skip):
        pass  # re-fetching draws what the interrupted run drew
    set_rng_state(resume["rng"])
    trainer.meter.load_state_dict(resume["meter"])
    return {"start_rng": resume["epoch_start_rng"], "micro": skip, "steps": int(resume.get("steps_in_epoch", 0))}
