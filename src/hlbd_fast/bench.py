"""``hlbd-fast bench``: the speed-up plan's table, every row measured side by side.

On the bundled HLBD data (600 pairs) with the reference model (vocab 5000, d_model 256,
3+3 layers, 8 heads, d_ff 1024, dropout 0.1, max length 64), in one process, every row
starts from the same initial weights (a deep copy of one initial state) and sees the
samples in the same order (the same trainer seed):

* ``baseline``: the original HLBD loop (:func:`hlbd_fast.presets.baseline`: micro-batch 4 x
  GradientAccumulation(8), Adam 5e-5, the loss read back every micro-batch);
* ``+<speed-up>``: baseline plus that one speed-up (a baseline strategy filling the same
  role is replaced: ``+deferred sync`` drops the per-micro-batch read);
* ``quick``, ``extreme``, ``fastest``: the presets of those names; ``fastest fp32``: ``fastest``
  without its ``MixedPrecision``; ``fastest+compile``: with ``Compile``; ``careful loop``: batch
  32 trimmed, Adam, the loss read every step (a hand-written loop's work).

A row whose strategy is missing or fails is reported with its error; the others run.

Each row has one trainer for all its epochs (the bench calls ``fit`` once per epoch on it),
so what a single ``fit`` keeps — DataLoader worker processes, preloaded data, compiled
code, captured graphs — is kept between the row's epochs too. When a row finishes, what it
holds is freed (its CUDA graphs released, its worker processes stopped, its trainer dropped).

Columns: seconds per epoch (median of the epochs after the first, which pays one-off
costs), one-off compile/capture seconds (the strategies' reports), speed-up over baseline and
what it rests on (``ratio of``; see :func:`compare_rows`: interleaved, the median of the
per-round ratios over the rounds both rows completed, after the first; sequential, the
ratio of seconds per epoch), final loss and its relative difference to baseline's at the
same epoch, peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process's
resident set sampled every 50 ms, which includes what the process already held; the
peak during the row, measured in sequential order only: interleaved, every row's trainer
stays alive), and loss read-backs per optimizer step (counted while the row trains; each
is one host-device sync; other syncs are what ``hlbd-fast doctor`` counts). Each row
keeps its own random stream (dropout): interleaved or not, a row computes what it
computes alone.

Order: on CPU the rows are interleaved by default, in **rounds** (a round is one epoch
of every row that has epochs left; all trainers alive), because a shared CPU's speed
drifts by tens of percent over minutes: run one after the other, the same configuration
measured 21.6 and 30.6 s/epoch minutes apart in one run on this project's 2-core
machine. Interleaved, a drift slows every row alike and the speed-ups stay side by side.
CUDA rows run one after the other (``interleave=False``), each with its own peak memory.

Time budget: interleaved, it ends whole rounds only: a round starts only when the time
spent so far plus the last round's duration fits in the budget (the first round always
runs), so every row has run the same rounds. Sequential, no row starts an epoch after the
budget is spent (the first row always runs whole).

Defaults: 50 epochs per row on CUDA; on CPU 2 epochs per row, the rows in
:data:`CPU_DEFAULT_ROWS`, and a budget of :data:`CPU_TIME_BUDGET_S` seconds.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import functools
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import nn

from ._io import atomic_write, check_writable_dir, check_writable_file
from .checkpoint import rng_state, set_rng_state
from .cli import resolve_device
from .history import EpochRecord, History, reports_dict
from .presets import Preset, baseline, extreme, fastest, quick
from .strategies import (
    Compile,
    DataLoaderWorkers,
    DeferredLossSync,
    DevicePreload,
    FastDropout,
    FusedAdamW,
    GradientAccumulation,
    GradientCheckpointing,
    MixedPrecision,
    Strategy,
    TrimPadding,
    Unpad,
)
from .trainer import FastTrainer

__all__ = [
    "ROWS",
    "CPU_DEFAULT_ROWS",
    "CPU_TIME_BUDGET_S",
    "resolve_rows",
    "reference_data",
    "machine_info",
    "BenchError",
    "RowRecipe",
    "RowSpec",
    "RowResult",
    "compare_rows",
    "run_bench",
    "format_table",
    "main",
]

log = logging.getLogger("hlbd_fast")


class BenchError(ValueError):
    """A bad argument to :func:`run_bench` or ``hlbd-fast bench``; the message says the fix."""


# ---------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class RowSpec:
    """A row as built for one device: the preset it trains with, plus what it says about itself."""

    preset: Preset  # strategies, micro-batch size, loss normalisation, lr
    note: str = ""  # shown in the JSON and the table (e.g. which strategy replaced which)


@dataclass(frozen=True)
class RowRecipe:
    """What a row runs: a preset built for the device, less some strategy classes, plus some new strategies.

    Calling it with a device builds the row's :class:`RowSpec`, with fresh strategy instances
    each time (a trainer owns its strategies).
    """

    name: str  # the row's name in tables, in the JSON and for --rows
    preset: Callable[[torch.device], Preset]  # builds the preset the row starts from (e.g. presets.baseline)
    add: tuple[Callable[[], Strategy], ...] = ()  # build the strategies the row adds after the preset's own
    replace_role: bool = False  # an added strategy replaces the preset's one filling the same role (noted "replaces ...")
    drop: tuple[type[Strategy], ...] = ()  # strategy classes left out of the preset (noted "without ...")
    batch_size: int | None = None  # micro-batch size; None: the preset's
    preset_name: str | None = None  # the built preset's name; None: the preset's own
    note: str = ""  # what the row says about itself besides what it replaced or left out

    def __call__(self, device: torch.device) -> RowSpec:
        base = self.preset(device)
        added = tuple(build() for build in self.add)
        dropped = [s for s in base.strategies if isinstance(s, self.drop)]
        roles = {s.role for s in added if s.role is not None} if self.replace_role else set()
        replaced = [s for s in base.strategies if s.role in roles]
        kept = tuple(s for s in base.strategies if all(s is not x for x in (*dropped, *replaced)))
        preset = dataclasses.replace(base, name=self.preset_name or base.name, strategies=(*kept, *added), batch_size=self.batch_size or base.batch_size)
        parts = (self.note, _listed("replaces", replaced), _listed("without", dropped))
        return RowSpec(preset, "; ".join(p for p in parts if p))


def _listed(verb: str, strategies: Sequence[Strategy]) -> str:
    """``"replaces A(), B()"``; ``""`` when there are none."""
    return f"{verb} {', '.join(repr(s) for s in strategies)}" if strategies else ""


def _plus(name: str, strategy: Callable[[], Strategy], batch_size: int | None = None) -> RowRecipe:
    """Baseline plus one strategy; a baseline strategy filling the same role is replaced by it."""
    return RowRecipe(name, baseline, add=(strategy,), replace_role=True, batch_size=batch_size)


def _careful_loop(device: torch.device) -> Preset:
    """What a careful user writes without this library: batch 32, each batch cut to its longest row, Adam, loss read every step."""
    return Preset("careful loop", (TrimPadding(multiple_of=1), DeferredLossSync(every=1)), 32)


_RECIPES: tuple[RowRecipe, ...] = (
    RowRecipe("baseline", baseline),
    _plus("+mixed precision", functools.partial(MixedPrecision, "auto")),
    _plus("+bigger batch", functools.partial(GradientAccumulation, 2), batch_size=16),
    _plus("+batch 32", functools.partial(GradientAccumulation, 1), batch_size=32),
    _plus("+workers", DataLoaderWorkers),
    _plus("+compile", Compile),
    _plus("+fused adamw", FusedAdamW),
    _plus("+deferred sync", DeferredLossSync),
    _plus("+device preload", DevicePreload),
    _plus("+grad checkpointing", GradientCheckpointing),
    _plus("+trim padding", TrimPadding),
    _plus("+fast dropout", FastDropout),
    _plus("+unpad", Unpad),
    RowRecipe("careful loop", _careful_loop, note="batch 32, each batch trimmed to its longest row, Adam, loss read every step: a hand-written loop's work"),
    RowRecipe("quick", quick),
    RowRecipe("extreme", extreme),
    RowRecipe("fastest", fastest),
    # the CPU fastest without bf16 autocast: exact up to rounding
    RowRecipe("fastest fp32", fastest, drop=(MixedPrecision,), preset_name="fastest fp32"),
    # the compiled model draws its own dropout masks, and Unpad's shapes change every batch: neither combines with Compile
    RowRecipe("fastest+compile", fastest, add=(functools.partial(Compile, dynamic=True),), drop=(FastDropout, Unpad), preset_name="fastest+"),
)

#: Every row by name: a :class:`RowRecipe`, which takes the device and returns a :class:`RowSpec`.
ROWS: dict[str, RowRecipe] = {recipe.name: recipe for recipe in _RECIPES}

#: Rows run by default on a CPU device. fp32 rows come first: the rows with bf16
#: autocast (``fastest``, ``quick``, ``+mixed precision``) can be far slower on a CPU
#: without native bf16 and would spend the time budget. Compiling with a C++ toolchain,
#: worker processes and device preloading are left out; name them with --rows.
CPU_DEFAULT_ROWS: tuple[str, ...] = (
    "baseline",
    "careful loop",
    "+trim padding",
    "+unpad",
    "+fast dropout",
    "+batch 32",
    "+bigger batch",
    "+deferred sync",
    "+fused adamw",
    "fastest",
    "quick",
    "+mixed precision",
)

#: On CPU, the default time budget in seconds: no round (interleaved) or epoch (sequential)
#: starts that would not fit, so the default run ends in about 10 minutes; ``--budget 0``
#: runs every epoch.
CPU_TIME_BUDGET_S = 480.0

#: What a table of rows may hold: a name -> a builder taking the device and returning a RowSpec (or a Preset).
RowTable = Mapping[str, Callable[[torch.device], "RowSpec | Preset"]]


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def resolve_rows(names: Sequence[str] | str | None, device: torch.device, rows: Mapping[str, Any] | None = None) -> list[str]:
    """Row names from user spelling (``"compile"``, ``"+compile"``, ``"bigger-batch"``...); default per device."""
    table = ROWS if rows is None else rows
    if names is None:
        return list(table) if device.type == "cuda" else [n for n in CPU_DEFAULT_ROWS if n in table]
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    by_key = {_key(n): n for n in table}
    out = []
    for n in names:
        hit = by_key.get(_key(n))
        if hit is None:
            raise BenchError(f"--rows: unknown row {n.strip()!r}; choose from: {', '.join(table)}")
        if hit not in out:
            out.append(hit)
    if not out:
        raise BenchError("--rows is empty; name at least one row, e.g. --rows baseline,+deferred-sync")
    return out


def _spec(table: RowTable, name: str, device: torch.device) -> RowSpec:
    spec = table[name](device)
    return RowSpec(spec) if isinstance(spec, Preset) else spec


# ---------------------------------------------------------------------------- results
@dataclass
class RowResult:
    """What a row measured: one entry of the report's ``rows`` (see :meth:`to_dict`).

    The figures are filled when the row's training ends (``None`` when it did not train);
    the comparisons with the ``baseline`` row by :func:`compare_rows`.
    """

    name: str  # the row's name, as in ROWS
    epochs: int  # epochs planned; those trained when the time budget cut the row short
    error: str | None = None  # why the row has no figures (it failed, or the time budget skipped it); None: it trained
    note: str = ""  # what the row says about itself (replaced or left-out strategies, a budget cut)
    warnings: list[str] = field(default_factory=list)  # the first 5 distinct warnings raised while it built and trained
    wall_s: float = 0.0  # wall seconds spent building and training it, evaluation aside
    s_per_epoch: float | None = None  # median seconds of the epochs after the first (the only epoch when 1)
    epoch_seconds: list[float] | None = None  # wall seconds of each epoch
    epoch_rounds: list[int] | None = None  # interleaved: the round each epoch ran in; None: sequential
    compile_s: float | None = None  # one-off compile and graph-capture seconds (from the run's info)
    final_loss: float | None = None  # training loss of the last epoch
    losses: list[float] | None = None  # training loss of each epoch
    peak_mem_mb: float | None = None  # peak memory during the row (sequential order only)
    mem_before_mb: float | None = None  # memory held when the row's first epoch started (sequential order only)
    syncs_per_step: float | None = None  # loss read-backs (host syncs) per optimizer step
    micro_batch: int | None = None  # the preset's micro-batch size
    accumulation: int | None = None  # micro-batches per optimizer step
    strategies: list[str] | None = None  # repr of each strategy of the row's preset
    info: dict[str, Any] | None = None  # the strategies' reports (FastTrainer.reports, as dicts): compile seconds, graphs...
    eval_token_accuracy: float | None = None  # the trained model's token accuracy on the training data, not timed
    speedup: float | None = None  # baseline's epoch seconds over the row's (see compare_rows)
    speedup_rounds: int | None = None  # interleaved: how many rounds the speed-up rests on
    speedup_epochs: int | None = None  # sequential: how many epochs the thinner s/epoch figure rests on
    loss_rel_diff: float | None = None  # |loss - baseline's| / baseline's, at the last epoch both trained
    paired_rounds: list[int] | None = None  # interleaved: the rounds both the row and the baseline completed
    speedup_per_round: list[float | None] | None = None  # interleaved: the speed-up in each of those rounds
    loss_compared_at_epoch: int | None = None  # the epoch at which loss_rel_diff compares the two losses

    #: The keys of a row without figures, in the order the report has always had them (after the first six fields).
    _UNTRAINED: ClassVar[tuple[str, ...]] = (
        "s_per_epoch",
        "speedup",
        "speedup_rounds",
        "speedup_epochs",
        "final_loss",
        "loss_rel_diff",
        "compile_s",
        "peak_mem_mb",
        "syncs_per_step",
        "losses",
    )
    #: Keys written only once compare_rows has set them.
    _WHEN_COMPARED: ClassVar[tuple[str, ...]] = ("paired_rounds", "speedup_per_round", "loss_compared_at_epoch")

    @property
    def trained(self) -> bool:
        """Whether the row has figures (it trained at least one epoch)."""
        return self.losses is not None

    def to_dict(self) -> dict[str, Any]:
        """The row's JSON entry: a row that trained has every field but the comparisons not made; one that
        did not has its name, epochs, error, note, warnings, wall_s and the main columns (``None``)."""
        names = [f.name for f in dataclasses.fields(self)]
        keys = [k for k in names if k not in self._WHEN_COMPARED] if self.trained else [*names[:6], *self._UNTRAINED]
        keys += [k for k in self._WHEN_COMPARED if getattr(self, k) is not None]
        return {k: getattr(self, k) for k in keys}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> "RowResult":
        """A row of a report (:meth:`to_dict`'s output, or a ``bench.json`` entry); missing keys take their defaults."""
        return cls(**{f.name: row[f.name] for f in dataclasses.fields(cls) if f.name in row})


def _one_off_seconds(info: Mapping[str, Any]) -> float | None:
    """Compile and graph-capture seconds from a row's strategy reports (``info``), when it has any."""
    parts = (info.get("Compile", {}).get("compile_seconds"), info.get("CUDAGraphStep", {}).get("capture_seconds"))
    found = [float(x) for x in parts if isinstance(x, (int, float))]
    return sum(found) if found else None


# ---------------------------------------------------------------------------- measuring
class _RssSampler:
    """Peak resident set of this process, sampled every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def current(self) -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> "_RssSampler":
        first = self.current()
        if first is None:
            return self
        self.peak = first

        def loop() -> None:
            while not self._stop.wait(self.interval):
                now = self.current()
                if now is not None and now > self.peak:
                    self.peak = now

        self._thread = threading.Thread(target=loop, daemon=True, name="hlbd-fast-rss")
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        now = self.current()
        if now is not None:
            self.peak = max(self.peak, now)


class _EpochLog(Strategy):
    """Logs one line per epoch (after the epoch's own loss read: no extra sync)."""

    def __init__(self, row: str, epochs: int) -> None:
        self._row = row
        self._epochs = epochs

    def on_epoch_end(self, trainer: FastTrainer, record: EpochRecord) -> None:
        log.info("  %s: epoch %d/%d  loss %.4f  %.2f s", self._row, record.epoch, self._epochs, record.loss, record.seconds)


def _peak_memory(device: torch.device, fn: Callable[[], None]) -> tuple[int, int]:
    """Run ``fn``; return (bytes held when it started, peak bytes while it ran)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        return start, torch.cuda.max_memory_allocated(device)
    with _RssSampler() as rss:
        start = rss.peak  # the resident set when fn started
        fn()
    return start, rss.peak


class _Budget:
    """The bench's time budget in seconds from its start; ``None``: no limit."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def spent(self) -> bool:
        """Whether the budget is used up (sequential order: no epoch starts then)."""
        return self.seconds is not None and self.elapsed() > self.seconds

    def allows(self, next_s: float) -> bool:
        """Whether work expected to take ``next_s`` seconds ends within the budget (a round, interleaved)."""
        return self.seconds is None or self.elapsed() + next_s <= self.seconds


class _Row:
    """One row while the bench runs: its trainer, what it has measured so far, its warnings.

    Life: :meth:`begin` builds the trainer, :meth:`run_epoch` trains one more epoch on it
    (one ``fit`` per epoch on the same trainer), :meth:`finish` takes the :class:`RowResult`
    and frees what the row holds.
    """

    skipped_error = "skipped: the time budget was spent"

    def __init__(
        self,
        name: str,
        build: Callable[[], RowSpec],
        epochs: int,
        trainer_class: type[FastTrainer] = FastTrainer,
        trainer_kwargs: Mapping[str, Any] | None = None,
        verbose: bool = True,
    ) -> None:
        self.name = name
        self._build = build
        self.trainer_class = trainer_class  # the trainer each row builds (tune: the user's subclass)
        self.trainer_kwargs = dict(trainer_kwargs or {})  # more FastTrainer arguments (pad_id, max_grad_norm...)
        self.verbose = verbose  # one log line per epoch and per row; False: none
        self.spec: RowSpec | None = None
        self.epochs = epochs
        self.trainer: FastTrainer | None = None
        self.history: History | None = None
        self.error: str | None = None
        self.skipped_after: int | None = None  # epochs done when the time budget ran out
        self.peak = 0  # bytes, the peak during the row's epochs (sequential order only)
        self.before = 0
        self.wall_s = 0.0
        self.warnings: list[str] = []
        self.rng: tuple[torch.Tensor, list[torch.Tensor] | None] | None = None  # the row's own RNG stream
        self.rounds: list[int] = []  # interleaved: the round each epoch ran in
        self.result: RowResult | None = None  # set by finish()

    @property
    def done(self) -> int:
        """Epochs trained so far."""
        return len(self.history.records) if self.history is not None else 0

    @property
    def active(self) -> bool:
        """Built, not failed, and epochs left to train."""
        return self.error is None and self.trainer is not None and self.done < self.epochs

    def _guarded(self, fn: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - a failing row is reported, the others still run
                self.error = f"{type(e).__name__}: {e}".splitlines()[0]
                self._drop_trainer()
                self._log("  %s failed: %s", self.name, self.error)
        for w in caught:
            msg = f"{w.category.__name__}: {w.message}".splitlines()[0]
            if msg not in self.warnings:
                self.warnings.append(msg)
        self.wall_s += time.perf_counter() - t0

    def begin(self, position: str, initial: nn.Module, device: torch.device, seed: int) -> None:
        """Build the row's trainer from a copy of ``initial`` (``position``: "[i/n]" for the log)."""
        self._log("%s %s: %d epochs ...", position, self.name, self.epochs)

        def build() -> None:
            self.spec = self._build()
            self.trainer = self.trainer_class.from_preset(
                copy.deepcopy(initial),
                self.spec.preset,
                **{**self.trainer_kwargs, "strategies": (_EpochLog(self.name, self.epochs),) if self.verbose else ()},
                device=device,
                seed=seed,
                progress=False,
            )
            self.history = self.trainer.history
            self.rng = rng_state()  # as the trainer's seed left it

        self._guarded(build)

    def run_epoch(self, data: tuple[torch.Tensor, torch.Tensor], device: torch.device, measure_memory: bool, round_no: int | None = None) -> None:
        """Train one more epoch (one ``fit`` on the row's trainer); ``measure_memory``: record its peak memory."""
        trainer = self.trainer
        assert trainer is not None

        def fit() -> None:
            self.history = trainer.fit(data, epochs=trainer.epoch + 1)

        def epoch() -> None:
            # each row continues its own random stream (dropout, DataLoader seeds), as if it ran alone
            if self.rng is not None:
                set_rng_state(self.rng)
            if measure_memory:
                start, peak = _peak_memory(device, fit)
                self.before = start if self.done == 1 else self.before
                self.peak = max(self.peak, peak)
            else:
                fit()
            self.rng = rng_state()
            if round_no is not None:
                self.rounds.append(round_no)

        self._guarded(epoch)

    def stop_for_budget(self) -> None:
        """Mark the row as cut short (or skipped) by the time budget."""
        if self.skipped_after is None:
            self.skipped_after = self.done
            self._log("  %s: %s", self.name, self.skipped_error if self.done == 0 else f"stopped after {self.done} epoch(s): the time budget was spent")

    def finish(self, device: torch.device, data: Any = None) -> RowResult:
        """Take the row's result (kept in :attr:`result`; with ``data``, its token accuracy), then free what it holds."""
        if self.error is None and self.done:
            assert self.history is not None
            self._log("  %s: %.2f s/epoch, final loss %.4f (%.0f s)", self.name, self.history.s_per_epoch(), self.history.losses[-1], self.wall_s)
        accuracy = self._token_accuracy(data)
        self.result = self._result(accuracy)
        self.release(device)
        return self.result

    def _log(self, message: str, *args: Any) -> None:
        if self.verbose:
            log.info(message, *args)

    def _token_accuracy(self, data: Any) -> float | None:
        """The trained model's token accuracy on ``data`` (not timed; after the row's last epoch)."""
        if data is None or self.trainer is None or self.error is not None or not self.done:
            return None
        try:
            return self.trainer.evaluate(data)["token_accuracy"]
        except Exception as e:  # noqa: BLE001 - the row's figures stand without it
            self._log("  %s: evaluation failed: %s", self.name, e)
            return None

    def _result(self, accuracy: float | None) -> RowResult:
        """The row's result (before :func:`compare_rows` adds the comparisons)."""
        note = self.spec.note if self.spec is not None else ""
        error = self.error
        if error is None and self.skipped_after is not None and self.done == 0:
            error = self.skipped_error
        if error is not None or self.trainer is None or self.history is None or self.spec is None:
            return RowResult(self.name, self.epochs, error, note, self.warnings[:5], self.wall_s)
        epochs = self.epochs
        if self.skipped_after is not None:
            epochs = self.done
            note = "; ".join(x for x in (note, f"stopped after {self.done} epoch(s): time budget spent") if x)
        return self._measured(self.trainer, self.history, self.spec.preset, epochs, note, accuracy)

    def _measured(self, trainer: FastTrainer, history: History, preset: Preset, epochs: int, note: str, accuracy: float | None) -> RowResult:
        """The result of a row that trained: its figures from the trainer and its history."""
        steps = sum(r.optimizer_steps for r in history.records)
        info = reports_dict(trainer.reports())
        return RowResult(
            name=self.name,
            epochs=epochs,
            error=None,
            note=note,
            warnings=self.warnings[:5],
            wall_s=self.wall_s,
            s_per_epoch=history.s_per_epoch(),
            epoch_seconds=history.seconds,
            epoch_rounds=list(self.rounds) or None,
            compile_s=_one_off_seconds(info),
            final_loss=history.losses[-1],
            losses=history.losses,
            peak_mem_mb=self.peak / 2**20 if self.peak else None,
            mem_before_mb=self.before / 2**20 if self.before else None,  # held when the row's first epoch started
            syncs_per_step=trainer.loss_reads / steps if steps else None,  # each read is one host sync
            micro_batch=preset.batch_size,
            accumulation=trainer.accumulation,
            strategies=[repr(s) for s in preset.strategies],
            info=info,
            eval_token_accuracy=accuracy,
        )

    def _drop_trainer(self) -> None:
        if self.trainer is not None:
            self.trainer.close()  # its captured graphs, its worker processes
        self.trainer = None

    def release(self, device: torch.device) -> None:
        """Free what the row holds once its result is taken: graphs, worker processes, the trainer, the strategies."""
        self._drop_trainer()
        self.spec = None  # its strategies may hold the model (Compile) or device copies of the data (DevicePreload)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def reference_data(max_pairs: int | None = None) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
    """The bundled HLBD pairs encoded like the original loop (vocab 5000, length 64); returns (data, vocab)."""
    from .data import CharTokenizer, encode_pairs, load_hlbd

    pairs = load_hlbd()
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    tokenizer = CharTokenizer.from_pairs(load_hlbd(), vocab_size=5000)
    return encode_pairs(pairs, tokenizer, max_length=64), tokenizer.vocab_size


# ---------------------------------------------------------------------------- running
@dataclass(frozen=True)
class _Plan:
    """A bench run's checked arguments (nothing created yet): which rows, how many epochs, where, in which order."""

    device: torch.device  # where every row trains
    names: tuple[str, ...]  # the rows to run, by their ROWS name, in order
    epochs: int  # epochs per row
    row_epochs: dict[str, int]  # epochs of particular rows, by their ROWS name
    interleave: bool  # rounds of one epoch of every row (else one row after the other)


def _plan(
    rows: Sequence[str] | str | None,
    epochs: int | None,
    device: str | torch.device | None,
    row_epochs: Mapping[str, int] | None,
    table: RowTable,
    interleave: bool | None,
) -> _Plan:
    """Check the arguments of a run (a :class:`BenchError` names the bad one) and fill in the defaults."""
    dev = _device(device)
    names = resolve_rows(rows, dev, table)
    if epochs is None:
        epochs = 50 if dev.type == "cuda" else 2
    epochs = _check_epochs(epochs, "--epochs")
    per_row = {resolve_rows([k], dev, table)[0]: _check_epochs(v, f"row_epochs[{k!r}]") for k, v in (row_epochs or {}).items()}
    return _Plan(dev, tuple(names), epochs, per_row, dev.type == "cpu" if interleave is None else bool(interleave))


def run_bench(
    rows: Sequence[str] | str | None = None,
    epochs: int | None = None,
    device: str | torch.device | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    model_factory: Callable[[], nn.Module] | None = None,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    row_epochs: dict[str, int] | None = None,
    seed: int = 0,
    time_budget_s: float | None = None,
    row_table: RowTable | None = None,
    interleave: bool | None = None,
) -> dict[str, Any]:
    """Measure the rows and return ``{"machine", "config", "rows"}`` (also written to ``out/bench.json``).

    Args:
        rows: row names (see :data:`ROWS`; spelling is loose); default every row on
            CUDA, :data:`CPU_DEFAULT_ROWS` on CPU.
        epochs: epochs per row; default 50 on CUDA, 2 on CPU.
        device: ``"cpu"``/``"cuda"``; default CUDA when available.
        out: folder for ``bench.json`` (and ``bench.png`` with matplotlib); created once every other
            argument is checked, and checked writable before any training.
        model_factory: builds the initial model (called once, under ``torch.manual_seed(seed)``);
            default the reference :class:`~hlbd_fast.models.Seq2SeqTransformer`.
        data: ``(src, tgt)`` tensors; default the bundled HLBD pairs.
        row_epochs: epochs for particular rows (e.g. a shorter baseline).
        seed: initial weights and sample order.
        time_budget_s: interleaved, a round starts only if the seconds spent plus the last
            round's fit (the first round always runs); sequential, no epoch starts after
            it (the first row always runs). Rows cut short or skipped say so.
        row_table: the rows to pick from (default :data:`ROWS`): name -> builder taking the
            device and returning a :class:`RowSpec` or a :class:`~hlbd_fast.presets.Preset`.
        interleave: run the rows in rounds of one epoch each (default on CPU, where the
            speed drifts); ``False``: one row after the other (default on CUDA).

    Each row's :class:`RowResult` is in the report as :meth:`RowResult.to_dict`.

    Raises:
        BenchError: a bad argument (unknown row, bad epochs, ``out`` not writable).
    """
    table = ROWS if row_table is None else row_table
    plan = _plan(rows, epochs, device, row_epochs, table, interleave)
    out_dir = _check_out(out)
    data, initial = _inputs(data, model_factory, seed)
    config = _config(plan, data, initial, seed, time_budget_s)
    machine = machine_info(plan.device)
    results = _measure(plan, table, data, initial, seed, time_budget_s)
    compare_rows(results, paired=plan.interleave)
    report = {"machine": machine, "config": config, "rows": [r.to_dict() for r in results]}
    if out_dir is not None:
        _write(out_dir, report)
    return report


def _measure(
    plan: _Plan, table: RowTable, data: tuple[torch.Tensor, torch.Tensor], initial: nn.Module, seed: int, time_budget_s: float | None
) -> list[RowResult]:
    """Every row of ``plan`` trained in its order; their results, in the plan's order."""
    dev = plan.device
    rows = [_Row(name, functools.partial(_spec, table, name, dev), plan.row_epochs.get(name, plan.epochs)) for name in plan.names]
    run_rows = _run_interleaved if plan.interleave else _run_sequential
    run_rows(rows, data, dev, _Budget(time_budget_s), initial, seed)
    return [row.result if row.result is not None else row.finish(dev, data) for row in rows]


def _check_epochs(epochs: Any, what: str) -> int:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:  # a command-line flag: its own wording
        raise BenchError(f"{what} {epochs!r} must be an integer >= 1")
    return epochs


def _check_out(out: str | os.PathLike[str] | None) -> Path | None:
    """The output folder, created and probed writable before any work; ``None`` when not asked for."""
    if out is None:
        return None
    try:
        return check_writable_dir(out, "--out")
    except ValueError as e:
        raise BenchError(str(e)) from None


def _inputs(
    data: tuple[torch.Tensor, torch.Tensor] | None, model_factory: Callable[[], nn.Module] | None, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], nn.Module]:
    """The data (default: the bundled HLBD pairs) and the initial model on the host, built under ``seed``."""
    if data is None:
        data, vocab = reference_data()
    else:
        vocab = int(max(int(data[0].max()), int(data[1].max())) + 1)
    torch.manual_seed(seed)
    if model_factory is None:
        from .models import Seq2SeqTransformer

        initial = Seq2SeqTransformer(vocab_size=max(vocab, 5000))
    else:
        initial = model_factory()
    return data, copy.deepcopy(initial).cpu()


def _config(plan: _Plan, data: tuple[torch.Tensor, torch.Tensor], initial: nn.Module, seed: int, budget: float | None) -> dict[str, Any]:
    """The report's ``config``: what was run, and what each column means."""
    interleave, dev = plan.interleave, plan.device
    return {
        "epochs": plan.epochs,
        "row_epochs": plan.row_epochs,
        "rows": list(plan.names),
        "pairs": int(data[0].shape[0]),
        "src_shape": list(data[0].shape),
        "tgt_shape": list(data[1].shape),
        "model": type(initial).__name__,
        "model_config": _model_config(initial),
        "parameters": sum(p.numel() for p in initial.parameters()),
        "seed": seed,
        "time_budget_s": budget,
        "order": "interleaved: rounds of one epoch of every row" if interleave else "sequential: one row after the other",
        "s_per_epoch": "median wall seconds of the epochs after the first (the only epoch when 1)",
        "speedup": "median over the rounds both rows completed, after the first (the only round when 1), of the baseline's "
        "epoch seconds over the row's in the same round; 'ratio of' counts those rounds"
        if interleave
        else "baseline s/epoch over the row's; 'ratio of' counts the epochs the thinner of the two s/epoch figures rests on",
        "peak_mem_mb": "not measured in interleaved order (every row's trainer stays alive); use --order sequential"
        if interleave
        else "CUDA: torch.cuda.max_memory_allocated, reset per row"
        if dev.type == "cuda"
        else "CPU: peak resident set of the process sampled every 50 ms during the row",
        "syncs_per_step": "loss read-backs per optimizer step, counted (one host-device sync each)",
    }


def _run_interleaved(
    rows: list[_Row],
    data: tuple[torch.Tensor, torch.Tensor],
    dev: torch.device,
    budget: _Budget,
    initial: nn.Module,
    seed: int,
    evaluate: bool = True,
    on_round: Callable[[int], None] | None = None,
) -> None:
    """Round after round, one epoch of every row with epochs left; the budget ends whole rounds only.

    ``evaluate``: each row's token accuracy on ``data`` when it finishes (not timed);
    ``on_round``: called with the round's number after each round (a progress bar).
    """
    eval_data = data if evaluate else None
    for i, row in enumerate(rows, 1):
        row.begin(f"[{i}/{len(rows)}]", initial, dev, seed)
    round_no, last_round_s = 0, 0.0
    while any(row.active for row in rows):
        if round_no and not budget.allows(last_round_s):
            if rows[0].verbose:
                log.info("time budget: another round (about %.1f s) would end after %.0f s; stopping after round %d", last_round_s, budget.seconds, round_no)
            break
        round_no += 1
        t0 = time.perf_counter()
        for row in rows:
            if row.active:
                row.run_epoch(data, dev, measure_memory=False, round_no=round_no)
                if not row.active:
                    row.finish(dev, eval_data)  # done (or failed): free its graphs, workers and trainer now
        last_round_s = time.perf_counter() - t0
        if on_round is not None:
            on_round(round_no)
    for row in rows:
        if row.active:
            row.stop_for_budget()
        if row.result is None:
            row.finish(dev, eval_data)


def _run_sequential(rows: list[_Row], data: tuple[torch.Tensor, torch.Tensor], dev: torch.device, budget: _Budget, initial: nn.Module, seed: int) -> None:
    """One row after the other, each with its peak memory; after the first row, no epoch starts once the budget is spent."""
    for i, row in enumerate(rows, 1):
        if i > 1 and budget.spent():
            row.stop_for_budget()
            row.finish(dev, data)
            continue
        row.begin(f"[{i}/{len(rows)}]", initial, dev, seed)
        while row.active:
            if i > 1 and budget.spent():
                row.stop_for_budget()
                break
            row.run_epoch(data, dev, measure_memory=True)
        row.finish(dev, data)


def _model_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "__dataclass_fields__"):
        return dataclasses.asdict(cfg)
    return {}


def compare_rows(rows: Sequence[RowResult], paired: bool = False, base: str = "baseline") -> None:
    """Fill the comparisons of every row with the ``base`` row (default ``baseline``): its speed-up, what that rests on, its loss difference.

    ``paired`` (interleaved runs): the speed-up is the median of the per-round ratios
    (baseline's epoch seconds over the row's in the same round) over the rounds both rows
    completed, leaving out the first of them when there are more (it pays one-off costs);
    ``speedup_rounds`` says how many rounds it rests on. Rounds are the rows'
    ``epoch_rounds`` (epoch ``i`` ran in round ``i`` when absent). Otherwise (sequential)
    the ratio of the ``s_per_epoch`` figures, and ``speedup_epochs`` is the number of
    epochs the thinner of the two figures rests on. Rows that did not train, and every row
    when there is no trained baseline, are left as they are.
    """
    reference = next((r for r in rows if r.name == base and r.error is None), None)
    if reference is None:
        return
    for r in rows:
        if r.error is not None:
            continue
        if paired:
            r.paired_rounds, r.speedup_per_round, r.speedup, r.speedup_rounds = _paired_speedup(reference, r)
        else:
            r.speedup, r.speedup_epochs = _sequential_speedup(reference, r)
        if reference.losses and r.losses:
            r.loss_compared_at_epoch, r.loss_rel_diff = _loss_diff(reference.losses, r.losses)


def _by_round(row: RowResult) -> dict[int, float]:
    """Epoch seconds of a row by the round they ran in."""
    seconds = row.epoch_seconds or []
    rounds = row.epoch_rounds or range(1, len(seconds) + 1)
    return dict(zip(rounds, seconds))


def _paired_speedup(base: RowResult, r: RowResult) -> tuple[list[int], list[float | None], float | None, int]:
    """(the rounds both completed, the ratio in each, the median ratio, how many rounds that median rests on)."""
    b, x = _by_round(base), _by_round(r)
    common = sorted(set(b) & set(x))
    used = [k for k in (common[1:] or common) if x[k] > 0]
    per_round = [b[k] / x[k] if x[k] > 0 else None for k in common]
    return common, per_round, statistics.median(b[k] / x[k] for k in used) if used else None, len(used)


def _sequential_speedup(base: RowResult, r: RowResult) -> tuple[float | None, int | None]:
    """(the ratio of the s/epoch figures, the epochs the thinner of the two rests on)."""
    speedup = base.s_per_epoch / r.s_per_epoch if r.s_per_epoch and base.s_per_epoch is not None else None
    counts = [len(row.epoch_seconds or []) for row in (base, r)]
    return speedup, min(max(n - 1, 1) for n in counts) if speedup is not None and all(counts) else None


def _loss_diff(base: list[float], losses: list[float]) -> tuple[int, float | None]:
    """(the last epoch both trained, the relative difference of the two losses there)."""
    k = min(len(base), len(losses))
    b = base[k - 1]
    return k, abs(losses[k - 1] - b) / abs(b) if b else None


def _device(name: str | torch.device | None) -> torch.device:
    try:
        return resolve_device(name)
    except ValueError as e:
        raise BenchError(str(e)) from None


# ---------------------------------------------------------------------------- output
def _fmt(v: Any, spec: str, none: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def format_table(report: dict[str, Any]) -> str:
    """The markdown table of a :func:`run_bench` report (or of a ``bench.json`` read back)."""
    m, c = report["machine"], report["config"]
    where = m["gpu"] or m["cpu"]
    lines = [
        f"hlbd_fast bench: {c['pairs']} pairs, {c['model']} ({c['parameters'] / 1e6:.1f}M parameters), "
        f"{c['epochs']} epochs per row, {m['device']} ({where}), torch {m['torch']}, {m['torch_threads']} threads",
        "",
        "| row | epochs | s/epoch | one-off s | speedup | ratio of | final loss | loss diff | eval token acc | peak MB | syncs/step | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [_table_line(RowResult.from_dict(r), c["epochs"]) for r in report["rows"]]
    lines.append("")
    speedup = f"speedup: {c['speedup']}; " if c.get("speedup") else ""
    lines.append(
        f"s/epoch: {c['s_per_epoch']}; {speedup}peak MB: {c['peak_mem_mb']}; syncs/step: {c['syncs_per_step']}; order: {c.get('order', 'sequential')}."
    )
    return "\n".join(lines)


def _table_line(r: RowResult, epochs: int) -> str:
    """One row of the table: its figures, or why it has none."""
    if r.error is not None:
        what = r.error if r.error.startswith(("skipped", "timed out")) else f"failed: {r.error}"
        return f"| {r.name} | {r.epochs} | - | - | - | - | - | - | - | - | - | {what[:160]} |"
    note = [r.note] if r.note else []
    if r.loss_compared_at_epoch and r.loss_compared_at_epoch != len(r.losses or []):
        note.append(f"loss compared at epoch {r.loss_compared_at_epoch}")
    if r.epochs != epochs:
        note.append(f"{r.epochs} epochs: s/epoch measured, {epochs}-epoch time extrapolated")
    if r.warnings:
        note.append(f"{len(r.warnings)} warning(s)")
    return (
        f"| {r.name} | {r.epochs} | {_fmt(r.s_per_epoch, '.2f')} | {_fmt(r.compile_s, '.1f')} | "
        f"{_fmt(r.speedup, '.2f')}{'x' if r.speedup is not None else ''} | {_ratio_basis(r)} | "
        f"{_fmt(r.final_loss, '.4f')} | {_fmt(r.loss_rel_diff, '.2%')} | {_fmt(r.eval_token_accuracy, '.1%')} | "
        f"{_fmt(r.peak_mem_mb, '.0f')} | {_fmt(r.syncs_per_step, '.3g')} | {'; '.join(note)} |"
    )


def _ratio_basis(r: RowResult) -> str:
    """What a row's speed-up rests on: ``"3 rounds"`` (interleaved), ``"1 epoch"`` (sequential), or ``"-"``."""
    if r.speedup is None:
        return "-"
    for n, unit in ((r.speedup_rounds, "round"), (r.speedup_epochs, "epoch")):
        if n is not None:
            return f"{n} {unit}{'' if n == 1 else 's'}"
    return "-"


def _write(out: Path, report: dict[str, Any]) -> None:
    """``bench.json`` (written atomically) and, with matplotlib, ``bench.png``."""
    text = json.dumps(report, indent=2, ensure_ascii=False, default=str)
    atomic_write(out / "bench.json", lambda f: f.write(text.encode("utf-8")))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("wrote %s (install hlbd-fast[plot] for bench.png)", out / "bench.json")
        return
    _plot(plt, [r for r in map(RowResult.from_dict, report["rows"]) if r.error is None], out / "bench.png")
    log.info("wrote %s and %s", out / "bench.json", out / "bench.png")


def _plot(plt: Any, ok: list[RowResult], path: Path) -> None:
    """The rows' losses by epoch beside their speed-ups, as a PNG at ``path``."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in ok:
        losses = r.losses or []
        a.plot(range(1, len(losses) + 1), losses, marker=".", label=r.name)
    a.set_xlabel("epoch")
    a.set_ylabel("training loss")
    a.legend(fontsize=7)
    b.barh([r.name for r in ok], [r.speedup or 0.0 for r in ok])
    b.axvline(1.0, color="k", lw=0.8)
    b.set_xlabel("speed-up over baseline (s/epoch)")
    b.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _tiny_model() -> nn.Module:
    from .models import Seq2SeqTransformer

    return Seq2SeqTransformer(vocab_size=5000, d_model=32, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=64)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``hlbd-fast bench`` to ``p``."""
    p.add_argument("--rows", default=None, help=f"comma-separated rows (default: all on CUDA; on CPU: {', '.join(CPU_DEFAULT_ROWS)}). All: {', '.join(ROWS)}")
    p.add_argument("--epochs", type=int, default=None, help="epochs per row (default: 50 on CUDA, 2 on CPU)")
    p.add_argument("--baseline-epochs", type=int, default=None, help="epochs of the baseline row only (its s/epoch still compares)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default="bench_results", help="folder for bench.json and bench.png (default: bench_results)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds the run may take, about (default: {CPU_TIME_BUDGET_S:.0f} on CPU, none on CUDA; 0: none): "
        "interleaved, no round starts that would end later (the first always runs); sequential, no "
        "epoch starts after it (the first row always runs)",
    )
    p.add_argument(
        "--order",
        choices=("auto", "interleaved", "sequential"),
        default="auto",
        help="interleaved: rounds of one epoch of every row, so that a drifting machine speed slows all rows "
        "alike; sequential: one row after the other (default: interleaved on CPU, sequential on CUDA)",
    )
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # a small model and 64 pairs: smoke tests


def _parser() -> argparse.ArgumentParser:
    """The parser of ``hlbd-fast bench`` on its own (:func:`main`)."""
    p = argparse.ArgumentParser(prog="hlbd-fast bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return p


def _budget(seconds: float | None, device: torch.device) -> float | None:
    """The time budget: ``--budget``, else :data:`CPU_TIME_BUDGET_S` on CPU; 0 or less: none."""
    if seconds is None and device.type == "cpu":
        seconds = CPU_TIME_BUDGET_S
    return seconds if seconds is not None and seconds > 0 else None


def _check_out_files(out: str | os.PathLike[str]) -> None:
    """``--out`` and the files written in it (``bench.json``, ``bench.png``) can be written: else a BenchError.

    Creates the folder: the last check, once every other argument is known to be good.
    """
    folder = _check_out(out)
    assert folder is not None
    try:
        for name in ("bench.json", "bench.png"):
            check_writable_file(folder / name, "--out file")
    except ValueError as e:
        raise BenchError(str(e)) from None


def _check_arguments(args: argparse.Namespace) -> _Plan:
    """Every option but ``--out``, checked without creating or training anything; a BenchError names the bad one."""
    if args.baseline_epochs is not None:
        _check_epochs(args.baseline_epochs, "--baseline-epochs")
    if args.threads is not None and args.threads < 1:
        raise BenchError(f"--threads {args.threads} must be >= 1")
    return _plan(args.rows, args.epochs, args.device, _row_epochs(args), ROWS, None if args.order == "auto" else args.order == "interleaved")


def _row_epochs(args: argparse.Namespace) -> dict[str, int] | None:
    return {"baseline": args.baseline_epochs} if args.baseline_epochs is not None else None


def run(args: argparse.Namespace) -> int:
    """Run ``hlbd-fast bench`` with the options of :func:`add_arguments`; returns the exit status.

    A bad argument (an unknown row, an ``--out`` folder that cannot be written...) is one
    line on stderr and exit status 2, before any training; the ``--out`` folder is created
    only once every other argument is good.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        plan = _check_arguments(args)
        _check_out_files(args.out)  # before any work (the --tiny data included)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        report = run_bench(
            rows=list(plan.names),
            epochs=plan.epochs,
            device=plan.device,
            out=args.out,
            model_factory=_tiny_model if args.tiny else None,
            data=reference_data(64)[0] if args.tiny else None,
            row_epochs=_row_epochs(args),
            seed=args.seed,
            time_budget_s=_budget(args.budget, plan.device),
            interleave=plan.interleave,
        )
    except BenchError as e:
        print(f"hlbd-fast bench: error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hlbd-fast bench`` on its own and ``benchmarks/seed_table.py``; returns the exit status (see :func:`run`)."""
    return run(_parser().parse_args(argv))
