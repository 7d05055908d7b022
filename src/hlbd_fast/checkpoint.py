"""Checkpoints: what a trainer's state is, how it is written and read, and how it is applied.

* Written atomically (:func:`hlbd_fast._io.atomic_write`) with a SHA-256 of the payload,
  verified on read: a damaged file is an error, never silently different weights.
* Never written with non-finite weights.
* Applied only after everything in it was checked against the trainer (model class and
  configuration, model shapes, optimizer class and groups, scheduler class, accumulation,
  loss normalisation, stateful strategies); should applying still fail, the trainer is put
  back as it was.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import logging
import os
import random
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ._io import atomic_write
from .history import History
from .meter import NonFiniteError

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import FastTrainer

__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointError",
    "write_checkpoint",
    "read_checkpoint",
    "load_weights",
    "rng_state",
    "set_rng_state",
    "trainer_state",
    "apply_trainer_state",
    "mid_epoch_state",
    "write_trainer_checkpoint",
    "check_resume",
    "check_model_config",
    "check_model_state",
]

log = logging.getLogger("hlbd_fast")

#: File name of the rolling checkpoint written in ``checkpoint_dir``.
CHECKPOINT_NAME = "last.pt"
# The best checkpoint beside it (``evaluation.BEST_NAME``; not imported: evaluation imports this module).
_BEST_NAME = "best.pt"
_FORMAT = "hlbd_fast.checkpoint/2"  # an envelope: payload bytes and their SHA-256
_OLD_FORMAT = "hlbd_fast.checkpoint/1"  # 0.1: the state itself, no checksum (still read)


class CheckpointError(ValueError):
    """A checkpoint cannot be read (missing, damaged, foreign) or does not fit this trainer."""


# ---------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Every random generator a run draws from: torch (CPU and initialised CUDA), Python, NumPy."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(py[1]) + [py[0]],
        "python_gauss": py[2],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[-1], tuple(py[:-1]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- files
def write_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``path`` atomically, with a SHA-256 of its serialised bytes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    envelope = {
        "format": _FORMAT,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
    }
    return atomic_write(path, lambda f: torch.save(envelope, f))


def _torch_load(source: Any, path: Path, what: str) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is a damaged or foreign file
        raise CheckpointError(f"checkpoint {path} could not be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {what}") from None


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`write_checkpoint` (or by hlbd_fast 0.1).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a directory (the message names the checkpoint files in it).
        CheckpointError: not a hlbd_fast checkpoint, or its bytes do not match their checksum.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(_directory_message(path))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    outer = _torch_load(path, path, "it is not a hlbd_fast checkpoint, or it is damaged")
    fmt = outer.get("format") if isinstance(outer, dict) else None
    if fmt == _OLD_FORMAT:
        log.info("checkpoint %s was written by hlbd_fast 0.1: it carries no checksum", path)
        return outer
    if fmt != _FORMAT or not isinstance(outer.get("payload"), torch.Tensor):
        raise CheckpointError(f"{path} is not a hlbd_fast checkpoint (format {fmt!r})")
    payload = outer["payload"].numpy().tobytes()
    if hashlib.sha256(payload).hexdigest() != outer.get("sha256"):
        raise CheckpointError(
            f"checkpoint {path} is damaged: its bytes do not match the SHA-256 stored when it was written; "
            "restore it from a copy or train again from an earlier checkpoint"
        )
    state = _torch_load(io.BytesIO(payload), path, "its payload is damaged")
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} holds no model state")
    return state


def _directory_message(path: Path) -> str:
    names = (_BEST_NAME, CHECKPOINT_NAME)
    present = [n for n in names if (path / n).is_file()]
    others: list[str] = []
    if not present:
        with contextlib.suppress(OSError):  # an unreadable directory: say what can be said
            others = sorted(p.name for p in path.glob("*.pt") if p.is_file())
    if present:
        there = f"it holds {' and '.join(present)}"
    elif others:
        there = f"it holds neither, but {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}"
    else:
        there = f"it holds neither: fit(checkpoint_dir={str(path)!r}) writes {CHECKPOINT_NAME} there"
    return f"checkpoint {path} is a directory, not a checkpoint file; pass a file in it, {path / _BEST_NAME} or {path / CHECKPOINT_NAME} ({there})"


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Load only the model weights of a checkpoint into ``model`` (inference; no trainer needed).

    Returns the model configuration stored with the checkpoint (``model.config`` as a dict,
    when the model had a dataclass ``config``), or ``None``. Touches no RNG state.

    Raises:
        FileNotFoundError, IsADirectoryError, CheckpointError: as :func:`read_checkpoint`;
            CheckpointError also when the checkpoint was saved from another model class or
            configuration, or its weights do not fit ``model`` (the message names the
            differences). Nothing is loaded then.
    """
    path = Path(path)
    state = read_checkpoint(path)
    soft = check_model_config(model, state, f"checkpoint {path}")
    check_model_state(model, state["model"], path)
    model.load_state_dict(state["model"])
    _warn_soft_config(soft, f"checkpoint {path}", "this model", stacklevel=2)
    return state.get("model_config")


# ---------------------------------------------------------------------------- the trainer's state
def trainer_state(trainer: "FastTrainer", mid_epoch: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a run needs to continue exactly: weights, optimizer, strategies, counters, RNG, history."""
    return {
        "format": _OLD_FORMAT,  # the inner state keeps 0.1's layout, extended
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "optimizer_class": type(trainer.optimizer).__name__,
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        "scheduler_class": type(trainer.scheduler).__name__ if trainer.scheduler is not None else None,
        "strategies": [{"type": type(s).__name__, "state": s.state_dict()} for s in trainer.strategies],
        "epoch": trainer.epoch,
        "global_step": trainer.global_step,
        "seed": trainer.seed,
        "loss_normalization": trainer.loss_normalization,
        "accumulation": trainer.accumulation,
        "rng": rng_state(),
        "history": trainer.history.to_dict(),
        "model_config": _model_config(trainer.model),
        "model_class": type(trainer.model).__name__,
        "mid_epoch": mid_epoch,
    }


def mid_epoch_state(trainer: "FastTrainer", epoch_state: dict[str, Any]) -> dict[str, Any]:
    """Where a run stopped inside an epoch: enough to continue it exactly (same batches, same RNG draws)."""
    return {
        "micro_batch_in_epoch": epoch_state["micro"],
        "steps_in_epoch": epoch_state["steps"],
        "meter": trainer.meter.state_dict(),
        "epoch_start_rng": epoch_state["start_rng"],
        "rng": epoch_state.get("stop_rng") or rng_state(),  # taken before the loop looked at the next batch
        "batch_size": epoch_state["batch_size"],
        "world_size": trainer.roles.distribution.world_size,
    }


def write_trainer_checkpoint(trainer: "FastTrainer", path: Path, mid_epoch: dict[str, Any] | None) -> None:
    """Write the trainer's state to ``path``; refused (and nothing written) when a weight is NaN or inf."""
    finite = torch.stack([p.detach().isfinite().all() for p in trainer.model.parameters()]).all()
    if not bool(finite):  # host sync: once per checkpoint, which reads every weight anyway
        raise NonFiniteError(
            f"the model's weights hold NaN or inf at epoch {trainer.epoch + 1}, step {trainer.global_step}; "
            f"no checkpoint was written to {path} (the previous one is untouched)",
            epoch=trainer.epoch + 1,
            step=trainer.global_step,
        )
    write_checkpoint(trainer_state(trainer, mid_epoch), path)
    log.info("checkpoint written to %s (epoch %d, step %d)", path, trainer.epoch, trainer.global_step)


def check_resume(resume: dict[str, Any], source: Any, distribution: Any) -> None:
    """Refuse to continue a mid-epoch checkpoint with other batching than it stopped with."""
    saved_bs, saved_world = resume.get("batch_size"), resume.get("world_size")
    if saved_bs is not None and source.loader is None and saved_bs != source.batch_size:
        raise ValueError(
            f"the checkpoint stopped mid-epoch with batch_size={saved_bs}; this fit uses batch_size={source.batch_size}, "
            "which would skip or repeat samples. Resume with the same batch_size (or from an epoch checkpoint)"
        )
    if saved_world is not None and saved_world != distribution.world_size:
        raise ValueError(
            f"the checkpoint stopped mid-epoch with {saved_world} processes; this run has {distribution.world_size}. Resume with the same number of processes"
        )
    n = source.num_batches(distribution)
    if source.loader is None and n is not None and resume["micro_batch_in_epoch"] > n:
        raise ValueError("the checkpoint stopped mid-epoch further in than this data has batches; resume with the same data and batch_size")


def _model_config(model: nn.Module) -> dict[str, Any] | None:
    """``model.config`` as a dict, when it is a dataclass instance (what checkpoints store); else ``None``."""
    cfg = getattr(model, "config", None)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type) else None


def _differs(a: Any, b: Any) -> bool:
    try:
        return bool(a != b)
    except Exception:  # noqa: BLE001 - values without a plain truth value (tensors, arrays)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return a.shape != b.shape or not torch.equal(a, b)
        return repr(a) != repr(b)


def _is_soft(key: str) -> bool:
    """A setting that changes training, not what the weights compute: a difference is said, not refused."""
    return "dropout" in key


def check_model_config(model: nn.Module, state: dict[str, Any], where: str = "the state") -> list[str]:
    """Refuse a checkpoint saved from another model class or configuration than ``model``'s.

    Compared only when ``model`` has a dataclass ``config`` (as :class:`~hlbd_fast.models.Seq2SeqTransformer`):
    its class name with the stored ``model_class`` and its fields with the stored ``model_config``,
    each when the checkpoint holds it (older checkpoints may not: they load as before). Weights of
    the same shapes can compute something else under another ``n_heads`` or ``pad_id``.

    Returns:
        the differences of dropout settings (``"dropout: checkpoint 0.1, model 0.0"``): they change
        training, not what the weights compute, so they are for the caller to warn about.

    Raises:
        CheckpointError: naming each difference (``n_heads: checkpoint 2, model 4``) and the fix.
    """
    mine = _model_config(model)
    if mine is None:
        return []  # a plain nn.Module: nothing to compare but the weights
    problems: list[str] = []
    saved_cls, my_cls = state.get("model_class"), type(model).__name__
    if saved_cls is not None and saved_cls != my_cls:
        problems.append(f"model class: checkpoint {saved_cls}, model {my_cls}")
    saved = state.get("model_config")
    soft: list[str] = []
    if isinstance(saved, dict):
        for key, value in mine.items():
            if key in saved and _differs(saved[key], value):
                (soft if _is_soft(key) else problems).append(f"{key}: checkpoint {saved[key]!r}, model {value!r}")
    if problems:
        raise CheckpointError(
            f"{where} was saved from a model built otherwise ({'; '.join(problems)}); its weights would compute "
            "something else here. Build the model as it was saved (its settings: "
            "hlbd_fast.checkpoint.read_checkpoint(path)['model_config'])"
        )
    return soft


def _warn_soft_config(soft: list[str], where: str, here: str, stacklevel: int) -> None:
    if soft:
        warnings.warn(
            f"{where} was trained with other dropout settings than {here} has ({'; '.join(soft)}); {here} keeps its own",
            stacklevel=stacklevel + 1,
        )


def check_model_state(model: nn.Module, saved: dict[str, Any], path: Path | None) -> None:
    """Raise :class:`CheckpointError` naming missing, unexpected or reshaped weights."""
    mine = model.state_dict()
    where = f"checkpoint {path}" if path else "the state"
    problems = [f"missing {k}" for k in mine if k not in saved]
    problems += [f"unexpected {k}" for k in saved if k not in mine]
    problems += [
        f"{k}: {tuple(saved[k].shape)} saved, {tuple(v.shape)} here"
        for k, v in mine.items()
        if k in saved and isinstance(v, torch.Tensor) and isinstance(saved[k], torch.Tensor) and saved[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{where} does not fit this model ({shown}); build the model as it was when it was saved")


def _check_optimizer(trainer: "FastTrainer", state: dict[str, Any], where: str) -> None:
    saved_cls = state.get("optimizer_class")
    mine = type(trainer.optimizer).__name__
    if saved_cls is not None and saved_cls != mine:
        raise CheckpointError(
            f"{where} was written with optimizer {saved_cls}; this trainer uses {mine}. Build the trainer with the same "
            "optimizer (strategies such as FusedAdamW choose it), or load only the weights with load_weights()"
        )
    saved_groups = state["optimizer"].get("param_groups", [])
    sizes = [len(g["params"]) for g in saved_groups]
    here = [len(g["params"]) for g in trainer.optimizer.param_groups]
    if sizes != here:
        raise CheckpointError(f"{where}: the optimizer had parameter groups of sizes {sizes}; this one has {here}")


def _strategy_states(trainer: "FastTrainer", state: dict[str, Any], where: str) -> list[tuple[Any, dict[str, Any]]]:
    """Pair saved strategy states with this trainer's strategies (by type and position among that type)."""
    mine: dict[str, list[Any]] = {}
    for s in trainer.strategies:
        mine.setdefault(type(s).__name__, []).append(s)
    seen: dict[str, int] = {}
    pairs = []
    for entry in state["strategies"]:
        k = seen[entry["type"]] = seen.get(entry["type"], -1) + 1
        if not entry["state"]:
            continue  # a strategy without state (a logger, a sync policy) may be added or dropped
        candidates = mine.get(entry["type"], [])
        if k >= len(candidates):
            saved = [e["type"] for e in state["strategies"]]
            raise CheckpointError(
                f"{where} holds the state of strategy {entry['type']} but this trainer has none "
                f"(saved with {saved}, now {[type(s).__name__ for s in trainer.strategies]}); "
                "build the trainer with the same strategies"
            )
        pairs.append((candidates[k], entry["state"]))
    return pairs


def _check_structure(trainer: "FastTrainer", state: dict[str, Any], where: str) -> None:
    for key, mine, what in (
        ("accumulation", trainer.accumulation, "GradientAccumulation steps"),
        ("loss_normalization", trainer.loss_normalization, "loss_normalization"),
    ):
        saved = state.get(key)
        if saved is not None and saved != mine:
            raise CheckpointError(
                f"{where} was trained with {what} {saved!r}; this trainer has {mine!r}. Resume with the same setting "
                "(a different one trains something else from here on)"
            )


def _check_scheduler(trainer: "FastTrainer", state: dict[str, Any], where: str) -> None:
    saved = state.get("scheduler")
    if saved is not None and trainer.scheduler is None:
        raise CheckpointError(
            f"{where} was trained with a learning-rate scheduler; this trainer has none. Build it with the same "
            "scheduler= (without it the lr would jump back to the optimizer's base value)"
        )
    saved_cls = state.get("scheduler_class")  # absent from checkpoints written before it was stored
    mine = type(trainer.scheduler).__name__ if trainer.scheduler is not None else None
    if saved is not None and saved_cls is not None and mine is not None and saved_cls != mine:
        raise CheckpointError(
            f"{where} was trained with scheduler {saved_cls}; this trainer uses {mine}, whose state it cannot take. "
            f"Build the trainer with the same scheduler= (a {saved_cls}), or load only the weights with load_weights()"
        )
    if saved is None and trainer.scheduler is not None and int(state.get("global_step", 0)) > 0:
        warnings.warn(f"{where} holds no scheduler state: this trainer's schedule starts at its step 0 from here", stacklevel=4)


#: Optimizer group keys that say how the step runs, not what it computes: a resume keeps the trainer's own.
_HOW_IT_RUNS = ("params", "capturable", "fused", "foreach")


def _restored_hyperparameters(trainer: "FastTrainer", state: dict[str, Any]) -> list[str]:
    """The optimizer settings the checkpoint brings back that differ from this trainer's."""
    changed = []
    for i, (saved, mine) in enumerate(zip(state["optimizer"].get("param_groups", []), trainer.optimizer.param_groups)):
        scheduled = "initial_lr" in saved and "initial_lr" in mine  # a schedule moves lr: its base is initial_lr
        for k, v in saved.items():
            # capturable/fused/foreach: how the step runs (graph capture sets capturable), not what it computes
            if k in _HOW_IT_RUNS or k not in mine or isinstance(v, torch.Tensor) or isinstance(mine[k], torch.Tensor):
                continue
            if k == "lr" and scheduled:
                continue
            if v != mine[k]:
                changed.append(f"{k}={v!r} (the trainer was built with {mine[k]!r})" + (f" in group {i}" if i else ""))
    return changed


def apply_trainer_state(trainer: "FastTrainer", state: dict[str, Any], path: Path | None = None) -> dict[str, Any] | None:
    """Check ``state`` against ``trainer`` whole, then apply it; return its mid-epoch part (or ``None``).

    Nothing is applied unless everything fits; should applying fail anyway, the trainer
    is restored to what it was and the error raised as :class:`CheckpointError`.
    """
    where = f"checkpoint {path}" if path else "the state"
    soft = check_model_config(trainer.model, state, where)
    check_model_state(trainer.model, state["model"], path)
    _check_optimizer(trainer, state, where)
    _check_structure(trainer, state, where)
    _check_scheduler(trainer, state, where)
    pairs = _strategy_states(trainer, state, where)
    changed = _restored_hyperparameters(trainer, state)
    before = copy.deepcopy(trainer_state(trainer))  # to put back should applying fail half-way
    strategies_before = {id(s): copy.deepcopy(s.state_dict()) for s, _ in pairs}
    touched: list[Any] = []
    try:
        _apply(trainer, state, pairs, touched)
    except Exception as e:
        _apply(trainer, before, [], [])
        for s in touched:
            with contextlib.suppress(Exception):  # best effort: the strategy's own error is the one to report
                s.load_state_dict(strategies_before[id(s)])
        raise CheckpointError(f"{where} could not be applied ({type(e).__name__}: {e}); the trainer is unchanged") from e
    if changed:
        warnings.warn(f"{where} restores the optimizer's {', '.join(changed)}", stacklevel=3)
    _warn_soft_config(soft, where, "this trainer's model", stacklevel=3)
    return state.get("mid_epoch")


def _apply(trainer: "FastTrainer", state: dict[str, Any], pairs: list[tuple[Any, dict[str, Any]]], touched: list[Any]) -> None:
    """Apply ``state``; ``touched`` collects the strategies whose state was (being) loaded."""
    trainer.model.load_state_dict(state["model"])
    own = [{k: g[k] for k in _HOW_IT_RUNS[1:] if k in g} for g in trainer.optimizer.param_groups]
    trainer.optimizer.load_state_dict(state["optimizer"])
    for group, keep in zip(trainer.optimizer.param_groups, own):
        group.update(keep)  # a graph run's capturable=True must not follow the checkpoint into an eager trainer
    if trainer.scheduler is not None and state.get("scheduler") is not None:
        trainer.scheduler.load_state_dict(state["scheduler"])
    for strategy, st in pairs:
        touched.append(strategy)
        strategy.load_state_dict(st)
    trainer.epoch = int(state["epoch"])
    trainer.global_step = int(state["global_step"])
    trainer.seed = int(state["seed"])
    trainer.lr = float(trainer.optimizer.param_groups[0]["lr"])
    trainer.history = History.from_dict(state["history"])
    trainer.meter.set_step(trainer.global_step)
    set_rng_state(state["rng"])
