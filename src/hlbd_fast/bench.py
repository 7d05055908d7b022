"""``hlbd-fast bench``: the speed-up plan's table, every row measured side by side.

On the bundled HLBD data (600 pairs) with the reference model (vocab 5000, d_model 256,
3+3 layers, 8 heads, d_ff 1024, dropout 0.1, max length 64), in one process, every row
starts from the same initial weights (a deep copy of one initial state) and sees the
samples in the same order (the same trainer seed):

* ``baseline``: the original HLBD loop (:func:`hlbd_fast.presets.baseline`: micro-batch 4 x
  GradientAccumulation(8), Adam 5e-5, the loss read back every micro-batch);
* ``+<speed-up>``: baseline plus that one speed-up (a baseline strategy owning the same
  exclusive hook is replaced: ``+deferred sync`` drops the per-micro-batch read);
* ``quick``, ``extreme``, ``fastest``: the presets of those names.

A row whose strategy is missing or fails is reported with its error; the others run.

Columns: seconds per epoch (median of the epochs after the first, which pays one-off
costs), one-off compile/capture seconds (``history.info``), speed-up over baseline
(interleaved: the median over rounds after the first of the baseline's epoch seconds
over the row's in the same round; sequential: the ratio of seconds per epoch),
final loss and its relative difference to baseline's at the same epoch, peak memory
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process's resident set sampled
every 50 ms, which includes what the process already held; the peak during the row,
measured in sequential order only: interleaved, every row's trainer stays alive), and
loss read-backs per
optimizer step (counted while the row trains; each is one host-device sync; other
syncs are what ``hlbd-fast doctor`` counts). Each row keeps its own random stream
(dropout): interleaved or not, a row computes what it computes alone.

Order: on CPU the rows are interleaved by default (every row's epoch ``e`` runs before
any row's epoch ``e+1``, all trainers alive), because a shared CPU's speed drifts by tens
of percent over minutes: run one after the other, the same configuration measured 21.6
and 30.6 s/epoch minutes apart in one run on this project's 2-core machine. Interleaved, a drift
slows every row alike and the speed-ups stay side by side. CUDA rows run one after the
other (``interleave=False``), each with its own peak memory.

Defaults: 50 epochs per row on CUDA; on CPU 2 epochs per row, the rows in
:data:`CPU_DEFAULT_ROWS`, and no epoch starts after :data:`CPU_TIME_BUDGET_S` seconds.
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
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .cli import resolve_device
from torch import nn

from .presets import Preset
from .strategies.base import Strategy
from .trainer import FastTrainer

__all__ = ["ROWS", "CPU_DEFAULT_ROWS", "CPU_TIME_BUDGET_S", "resolve_rows", "reference_data", "machine_info", "BenchError", "RowSpec", "compare_rows", "run_bench", "format_table", "main"]

log = logging.getLogger("hlbd_fast")


class BenchError(ValueError):
    """A bad argument to :func:`run_bench` or ``hlbd-fast bench``; the message says the fix."""


@dataclass(frozen=True)
class RowSpec:
    """How a row trains: a preset plus what it says about itself."""

    preset: Preset  # strategies, micro-batch size, loss normalisation, lr
    note: str = ""  # shown in the JSON (e.g. which strategy replaced which)


# ---------------------------------------------------------------------------- rows
def _baseline(device: torch.device) -> Preset:
    from .presets import baseline

    return baseline(device=device)


def _plus(strategy: Callable[[torch.device], Strategy], batch_size: int | None = None) -> Callable[[torch.device], RowSpec]:
    """Baseline plus one strategy; baseline strategies owning the same exclusive hooks are dropped."""

    def build(device: torch.device) -> RowSpec:
        base = _baseline(device)
        new = strategy(device)
        taken = new.owned_hooks()
        kept = [s for s in base.strategies if not (s.owned_hooks() & taken)]
        dropped = [repr(s) for s in base.strategies if s.owned_hooks() & taken]
        preset = Preset(
            name=base.name,
            strategies=(*kept, new),
            batch_size=batch_size or base.batch_size,
            loss_normalization=base.loss_normalization,
            lr=base.lr,
        )
        return RowSpec(preset, f"replaces {', '.join(dropped)}" if dropped else "")

    return build


def _strategy(module: str, name: str, *args: Any, **kwargs: Any) -> Callable[[torch.device], Strategy]:
    """A builder importing ``hlbd_fast.strategies.<module>.<name>`` when the row runs."""

    def build(device: torch.device) -> Strategy:
        import importlib

        mod = importlib.import_module(f"hlbd_fast.strategies.{module}")
        return getattr(mod, name)(*args, **kwargs)

    return build


def _named_preset(name: str) -> Callable[[torch.device], RowSpec]:
    def build(device: torch.device) -> RowSpec:
        from .presets import get_preset

        return RowSpec(get_preset(name, device=device))

    return build


def _plus_preset(name: str, strategy: Callable[[torch.device], Strategy], without: tuple[str, ...] = ()) -> Callable[[torch.device], RowSpec]:
    """A named preset plus one strategy (for example ``fastest`` plus ``Compile``), less the ``without`` classes."""

    def build(device: torch.device) -> RowSpec:
        from .presets import get_preset

        preset = get_preset(name, device=device)
        kept = tuple(s for s in preset.strategies if type(s).__name__ not in without)
        dropped = [repr(s) for s in preset.strategies if type(s).__name__ in without]
        spec = dataclasses.replace(preset, name=f"{name}+", strategies=(*kept, strategy(device)))
        return RowSpec(spec, f"without {', '.join(dropped)}" if dropped else "")

    return build


def _accumulation(steps: int) -> Callable[[torch.device], Strategy]:
    def build(device: torch.device) -> Strategy:
        from .strategies.accumulation import GradientAccumulation

        return GradientAccumulation(steps)

    return build


#: Every row by name: a builder taking the device and returning a :class:`RowSpec`.
ROWS: dict[str, Callable[[torch.device], RowSpec]] = {
    "baseline": lambda device: RowSpec(_baseline(device)),
    "+mixed precision": _plus(_strategy("precision", "MixedPrecision", "auto")),
    "+bigger batch": _plus(_accumulation(2), batch_size=16),
    "+batch 32": _plus(_accumulation(1), batch_size=32),
    "+workers": _plus(_strategy("data", "DataLoaderWorkers")),
    "+compile": _plus(_strategy("compile", "Compile")),
    "+fused adamw": _plus(_strategy("optim", "FusedAdamW")),
    "+deferred sync": _plus(_strategy("sync", "DeferredLossSync")),
    "+gpu preload": _plus(_strategy("data", "GPUPreload")),
    "+grad checkpointing": _plus(_strategy("checkpointing", "GradientCheckpointing")),
    "+trim padding": _plus(_strategy("padding", "TrimPadding")),
    "+fast dropout": _plus(_strategy("dropout", "FastDropout")),
    "quick": _named_preset("quick"),
    "extreme": _named_preset("extreme"),
    "fastest": _named_preset("fastest"),
    # the compiled model draws its own dropout masks: FastDropout does not combine with Compile
    "fastest+compile": _plus_preset("fastest", _strategy("compile", "Compile", dynamic=True), without=("FastDropout",)),
}

#: Rows run by default on a CPU device. fp32 rows come first: the rows with bf16
#: autocast (``fastest``, ``quick``, ``+mixed precision``) can be far slower on a CPU
#: without native bf16 and would spend the time budget. Compiling with a C++ toolchain,
#: worker processes and GPU preloading are left out; name them with --rows.
CPU_DEFAULT_ROWS: tuple[str, ...] = (
    "baseline",
    "+trim padding",
    "+fast dropout",
    "+batch 32",
    "+bigger batch",
    "+deferred sync",
    "+fused adamw",
    "fastest",
    "quick",
    "+mixed precision",
)

#: On CPU, rows that would start after this many seconds are skipped (reported as such),
#: so the default run ends in about 10 minutes; ``--budget 0`` runs every row.
CPU_TIME_BUDGET_S = 480.0


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def resolve_rows(names: Sequence[str] | str | None, device: torch.device, rows: dict[str, Any] | None = None) -> list[str]:
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

    def on_epoch_end(self, trainer: FastTrainer, record: Any) -> None:
        log.info("  %s: epoch %d/%d  loss %.4f  %.2f s", self._row, record.epoch, self._epochs, record.loss, record.seconds)



def _rng_state(device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _spec(table: dict[str, Callable[[torch.device], Any]], name: str, device: torch.device) -> RowSpec:
    spec = table[name](device)
    return RowSpec(spec) if isinstance(spec, Preset) else spec


class _Row:
    """One row while the bench runs: its trainer, what it has measured so far, its warnings."""

    def __init__(self, name: str, build: Callable[[], RowSpec], epochs: int) -> None:
        self.name = name
        self._build = build
        self.spec: RowSpec | None = None
        self.epochs = epochs
        self.trainer: FastTrainer | None = None
        self.history: Any = None
        self.error: str | None = None
        self.skipped_after: int | None = None  # epochs done when the time budget ran out
        self.peak = 0  # bytes, the peak during the row's epochs (sequential order only)
        self.before = 0
        self.wall_s = 0.0
        self.warnings: list[str] = []
        self.rng: tuple[torch.Tensor, list[torch.Tensor] | None] | None = None  # the row's own RNG stream

    @property
    def done(self) -> int:
        return len(self.history.records) if self.history is not None else 0

    def _guarded(self, fn: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - a failing row is reported, the others still run
                self.error = f"{type(e).__name__}: {e}".splitlines()[0]
                self.trainer = None
                log.info("  %s failed: %s", self.name, self.error)
        for w in caught:
            msg = f"{w.category.__name__}: {w.message}".splitlines()[0]
            if msg not in self.warnings:
                self.warnings.append(msg)
        self.wall_s += time.perf_counter() - t0

    def start(self, initial: nn.Module, device: torch.device, seed: int) -> None:
        def build() -> None:
            self.spec = self._build()
            preset = self.spec.preset
            self.trainer = FastTrainer(
                copy.deepcopy(initial),
                strategies=(*preset.strategies, _EpochLog(self.name, self.epochs)),
                batch_size=preset.batch_size,
                loss_normalization=preset.loss_normalization,
                lr=preset.lr,
                device=device,
                seed=seed,
                progress=False,
            )
            self.rng = _rng_state(device)  # as the trainer's seed left it

        self._guarded(build)

    def run_epoch(self, data: tuple[torch.Tensor, torch.Tensor], device: torch.device, measure_memory: bool) -> None:
        """Train one more epoch; ``measure_memory``: record the peak memory during it."""
        trainer = self.trainer
        assert trainer is not None

        def epoch() -> None:
            # each row continues its own random stream (dropout, DataLoader seeds), as if it ran alone
            if self.rng is not None:
                _set_rng_state(self.rng)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                start = torch.cuda.memory_allocated(device)
                self.history = trainer.fit(data, epochs=self.done + 1)
                peak = torch.cuda.max_memory_allocated(device)
            else:
                with _RssSampler() as rss:
                    start = rss.peak  # the resident set when the epoch started
                    self.history = trainer.fit(data, epochs=self.done + 1)
                peak = rss.peak
            self.rng = _rng_state(device)
            if self.done == 1:
                self.before = start
            if measure_memory:
                self.peak = max(self.peak, peak)

        self._guarded(epoch)

    def result(self) -> dict[str, Any]:
        row: dict[str, Any] = {"name": self.name, "epochs": self.epochs, "error": self.error,
                               "note": self.spec.note if self.spec is not None else ""}
        if self.error is None and self.skipped_after is not None and self.done == 0:
            row["error"] = self.skipped_error
        row["warnings"] = self.warnings[:5]
        row["wall_s"] = self.wall_s
        if row["error"] is not None or self.trainer is None or self.history is None or self.spec is None:
            return row
        history, trainer, preset = self.history, self.trainer, self.spec.preset
        steps = sum(r.optimizer_steps for r in history.records)
        if self.skipped_after is not None:
            row["epochs"] = self.done
            row["note"] = "; ".join(x for x in (row["note"], f"stopped after {self.done} epoch(s): time budget spent") if x)
        row.update({
            "s_per_epoch": history.s_per_epoch(),
            "epoch_seconds": history.seconds,
            "compile_s": _one_off_seconds(history.info),
            "final_loss": history.losses[-1],
            "losses": history.losses,
            "peak_mem_mb": self.peak / 2**20 if self.peak else None,
            "mem_before_mb": self.before / 2**20 if self.before else None,  # held when the row's first epoch started
            "syncs_per_step": trainer.loss_reads / steps if steps else None,  # each read is one host sync
            "micro_batch": preset.batch_size,
            "accumulation": trainer.accumulation,
            "strategies": [repr(s) for s in preset.strategies],
            "info": dict(history.info),
        })
        return row

    skipped_error = "skipped: the time budget was spent"

    def release(self, device: torch.device) -> None:
        """Drop the trainer (its model and optimizer) once the row's result is taken."""
        self.trainer = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _one_off_seconds(info: dict[str, Any]) -> float | None:
    found = [float(info[k]) for k in ("compile_seconds", "capture_seconds") if isinstance(info.get(k), (int, float))]
    return sum(found) if found else None


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
    row_table: dict[str, Callable[[torch.device], RowSpec]] | None = None,
    interleave: bool | None = None,
) -> dict[str, Any]:
    """Measure the rows and return ``{"machine", "config", "rows"}`` (also written to ``out/bench.json``).

    Args:
        rows: row names (see :data:`ROWS`; spelling is loose); default every row on
            CUDA, :data:`CPU_DEFAULT_ROWS` on CPU.
        epochs: epochs per row; default 50 on CUDA, 2 on CPU.
        device: ``"cpu"``/``"cuda"``; default CUDA when available.
        out: folder for ``bench.json`` (and ``bench.png`` when matplotlib is installed).
        model_factory: builds the initial model (called once, under ``torch.manual_seed(seed)``);
            default the reference :class:`~hlbd_fast.models.Seq2SeqTransformer`.
        data: ``(src, tgt)`` tensors; default the bundled HLBD pairs.
        row_epochs: epochs for particular rows (e.g. a shorter baseline); its seconds
            per epoch still compare, its loss is compared at the shorter length.
        seed: initial weights and sample order.
        time_budget_s: no row starts an epoch after this many seconds; rows skipped or
            cut short are reported as such (the first row always runs).
        row_table: the rows to pick from (default :data:`ROWS`).
        interleave: run every row's epoch ``e`` before any row's epoch ``e+1`` (all
            trainers stay alive), so that a machine whose speed drifts (a shared CPU)
            slows every row alike and the ratios stay side by side; default on CPU.
            ``False`` runs the rows one after the other (default on CUDA).
    """
    dev = _device(device)
    table = ROWS if row_table is None else row_table
    names = resolve_rows(rows, dev, table)
    if epochs is None:
        epochs = 50 if dev.type == "cuda" else 2
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise BenchError(f"--epochs {epochs!r} must be an integer >= 1")
    per_row = {resolve_rows([k], dev, table)[0]: v for k, v in (row_epochs or {}).items()}
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
    initial_state = copy.deepcopy(initial).cpu()
    config = {
        "epochs": epochs,
        "row_epochs": per_row,
        "rows": names,
        "pairs": int(data[0].shape[0]),
        "src_shape": list(data[0].shape),
        "tgt_shape": list(data[1].shape),
        "model": type(initial).__name__,
        "model_config": _model_config(initial),
        "parameters": sum(p.numel() for p in initial.parameters()),
        "seed": seed,
        "s_per_epoch": "median wall seconds of the epochs after the first (the only epoch when 1)",
        "peak_mem_mb": "CUDA: torch.cuda.max_memory_allocated, reset per row" if dev.type == "cuda"
        else "CPU: peak resident set of the process sampled every 50 ms during the row",
        "syncs_per_step": "loss read-backs per optimizer step, counted (one host-device sync each)",
    }
    machine = machine_info(dev)
    interleave = dev.type == "cpu" if interleave is None else bool(interleave)
    config["order"] = (
        "interleaved: every row's epoch e runs before any row's epoch e+1" if interleave else "sequential: one row after the other"
    )
    if interleave:
        config["peak_mem_mb"] = "not measured in interleaved order (every row's trainer stays alive); use --order sequential"
    rows_ = [_Row(name, functools.partial(_spec, table, name, dev), per_row.get(name, epochs)) for name in names]
    started = time.perf_counter()

    def out_of_time(row: _Row) -> bool:
        if time_budget_s is None or row is rows_[0] or time.perf_counter() - started <= time_budget_s:
            return False
        if row.skipped_after is None:
            row.skipped_after = row.done
            log.info("  %s: %s", row.name, "skipped: the time budget was spent" if row.done == 0 else
                     f"stopped after {row.done} epoch(s): the time budget was spent")
        return True

    def begin(i: int, row: _Row) -> None:
        log.info("[%d/%d] %s: %d epochs ...", i, len(rows_), row.name, row.epochs)
        if row.error is None:
            row.start(initial_state, dev, seed)

    def finish(row: _Row) -> None:
        if row.error is None and row.history is not None:
            log.info("  %s: %.2f s/epoch, final loss %.4f (%.0f s)", row.name, row.history.s_per_epoch(),
                     row.history.losses[-1], row.wall_s)

    results: list[dict[str, Any]] = []
    if interleave:
        for i, row in enumerate(rows_, 1):
            if not out_of_time(row):
                begin(i, row)
        for e in range(max(r.epochs for r in rows_)):
            for row in rows_:
                if row.error is None and row.trainer is not None and row.done == e < row.epochs and not out_of_time(row):
                    row.run_epoch(data, dev, measure_memory=False)
        for row in rows_:
            finish(row)
            results.append(row.result())
            row.release(dev)
    else:
        for i, row in enumerate(rows_, 1):
            if out_of_time(row):
                results.append(row.result())
                continue
            begin(i, row)
            while row.error is None and row.trainer is not None and row.done < row.epochs:
                row.run_epoch(data, dev, measure_memory=True)
            finish(row)
            results.append(row.result())
            row.release(dev)
    compare_rows(results, paired=interleave)
    report = {"machine": machine, "config": config, "rows": results}
    if out is not None:
        _write(Path(out), report)
    return report


def _model_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(cfg)
    return {}


def compare_rows(rows: list[dict[str, Any]], paired: bool = False) -> None:
    """Fill ``speedup`` and ``loss_rel_diff`` of every row against the ``baseline`` row (in place).

    ``paired`` (interleaved runs): the speed-up is the median, over the epochs after the
    first that both rows ran, of the baseline's epoch seconds over the row's in the same
    round; otherwise the ratio of the ``s_per_epoch`` figures.
    """
    base = next((r for r in rows if r["name"] == "baseline" and r["error"] is None), None)
    for r in rows:
        for k in ("s_per_epoch", "speedup", "final_loss", "loss_rel_diff", "compile_s", "peak_mem_mb", "syncs_per_step", "losses"):
            r.setdefault(k, None)
        if r["error"] is not None or base is None:
            continue
        r["speedup"] = base["s_per_epoch"] / r["s_per_epoch"] if r["s_per_epoch"] else None
        pairs = list(zip(base.get("epoch_seconds") or [], r.get("epoch_seconds") or []))
        if paired and len(pairs) >= 1:
            later = pairs[1:] or pairs
            ratios = sorted(b / x for b, x in later if x > 0)
            if ratios:
                mid = len(ratios) // 2
                r["speedup"] = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
                r["speedup_per_epoch"] = [b / x if x > 0 else None for b, x in pairs]
        k = min(len(base["losses"]), len(r["losses"]))
        b = base["losses"][k - 1]
        r["loss_compared_at_epoch"] = k
        r["loss_rel_diff"] = abs(r["losses"][k - 1] - b) / abs(b) if b else None


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
    """The markdown table of a :func:`run_bench` report."""
    m, c = report["machine"], report["config"]
    where = m["gpu"] or m["cpu"]
    lines = [
        f"hlbd_fast bench: {c['pairs']} pairs, {c['model']} ({c['parameters'] / 1e6:.1f}M parameters), "
        f"{c['epochs']} epochs per row, {m['device']} ({where}), torch {m['torch']}, {m['torch_threads']} threads",
        "",
        "| row | epochs | s/epoch | one-off s | speedup | final loss | loss diff | peak MB | syncs/step | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        if r["error"] is not None:
            what = r["error"] if r["error"].startswith(("skipped", "timed out")) else f"failed: {r['error']}"
            lines.append(f"| {r['name']} | {r['epochs']} | - | - | - | - | - | - | - | {what[:160]} |")
            continue
        note = []
        if r.get("loss_compared_at_epoch") and r["loss_compared_at_epoch"] != len(r["losses"]):
            note.append(f"loss compared at epoch {r['loss_compared_at_epoch']}")
        if r["epochs"] != c["epochs"]:
            note.append(f"{r['epochs']} epochs: s/epoch measured, {c['epochs']}-epoch time extrapolated")
        if r.get("warnings"):
            note.append(f"{len(r['warnings'])} warning(s)")
        lines.append(
            f"| {r['name']} | {r['epochs']} | {_fmt(r['s_per_epoch'], '.2f')} | {_fmt(r['compile_s'], '.1f')} | "
            f"{_fmt(r['speedup'], '.2f')}{'x' if r['speedup'] is not None else ''} | {_fmt(r['final_loss'], '.4f')} | {_fmt(r['loss_rel_diff'], '.2%')} | "
            f"{_fmt(r['peak_mem_mb'], '.0f')} | {_fmt(r['syncs_per_step'], '.3g')} | {'; '.join(note)} |"
        )
    lines.append("")
    lines.append(f"s/epoch: {c['s_per_epoch']}; peak MB: {c['peak_mem_mb']}; syncs/step: {c['syncs_per_step']}; "
                 f"order: {c.get('order', 'sequential')}.")
    return "\n".join(lines)


def _write(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False, default=str)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("wrote %s (install hlbd-fast[plot] for bench.png)", out / "bench.json")
        return
    ok = [r for r in report["rows"] if r["error"] is None]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in ok:
        a.plot(range(1, len(r["losses"]) + 1), r["losses"], marker=".", label=r["name"])
    a.set_xlabel("epoch")
    a.set_ylabel("training loss")
    a.legend(fontsize=7)
    b.barh([r["name"] for r in ok], [r["speedup"] or 0.0 for r in ok])
    b.axvline(1.0, color="k", lw=0.8)
    b.set_xlabel("speed-up over baseline (s/epoch)")
    b.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=120)
    plt.close(fig)
    log.info("wrote %s and %s", out / "bench.json", out / "bench.png")


def _tiny_model() -> nn.Module:
    from .models import Seq2SeqTransformer

    return Seq2SeqTransformer(vocab_size=5000, d_model=32, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=64)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hlbd-fast bench`` and ``benchmarks/seed_table.py``; returns the exit status."""
    p = argparse.ArgumentParser(prog="hlbd-fast bench", description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=None, help=f"comma-separated rows (default: all on CUDA; on CPU: {', '.join(CPU_DEFAULT_ROWS)}). All: {', '.join(ROWS)}")
    p.add_argument("--epochs", type=int, default=None, help="epochs per row (default: 50 on CUDA, 2 on CPU)")
    p.add_argument("--baseline-epochs", type=int, default=None, help="epochs of the baseline row only (its s/epoch still compares)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default="bench_results", help="folder for bench.json and bench.png (default: bench_results)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds after which no new row starts (default: {CPU_TIME_BUDGET_S:.0f} on CPU, none on CUDA; 0: none)")
    p.add_argument("--order", choices=("auto", "interleaved", "sequential"), default="auto",
                   help="interleaved: every row's epoch e before any row's epoch e+1, so that a drifting machine speed "
                        "slows all rows alike; sequential: one row after the other (default: interleaved on CPU, "
                        "sequential on CUDA)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # a small model and 64 pairs: smoke tests
    args = p.parse_args(argv)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise BenchError(f"--threads {args.threads} must be >= 1")
            torch.set_num_threads(args.threads)
        budget = args.budget
        if budget is None and _device(args.device).type == "cpu":
            budget = CPU_TIME_BUDGET_S
        if budget is not None and budget <= 0:
            budget = None
        report = run_bench(
            rows=args.rows,
            epochs=args.epochs,
            device=args.device,
            out=args.out,
            model_factory=_tiny_model if args.tiny else None,
            data=reference_data(64)[0] if args.tiny else None,
            row_epochs={"baseline": args.baseline_epochs} if args.baseline_epochs else None,
            seed=args.seed,
            time_budget_s=budget,
            interleave=None if args.order == "auto" else args.order == "interleaved",
        )
    except BenchError as e:
        print(f"hlbd-fast bench: error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    return 0
