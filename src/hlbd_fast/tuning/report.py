"""What :func:`~hlbd_fast.tune.tune` found: :class:`TuneRow` per configuration, :class:`TuneReport` for the run."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from .._io import atomic_write
from ..presets import Preset
from ..strategies import Strategy

__all__ = ["VERDICTS", "PLAIN", "TuneRow", "TuneReport", "as_code"]

#: The verdicts of a row, from the closest to the plain loop to refused.
VERDICTS: tuple[str, ...] = ("exact", "rounding", "precision", "random stream", "refused")

PLAIN = "plain loop"  # the reference row's name


# ---------------------------------------------------------------------------- results
@dataclass
class TuneRow:
    """One configuration :func:`tune` looked at: what it is, what its proof measured, how fast it ran."""

    name: str  # "plain loop", a candidate's name, or names joined with " + "
    stage: str  # "alone" or "combined"
    strategies: list[str]  # each strategy as the Python call that builds it
    verdict: str  # one of VERDICTS, or "not tried"
    reason: str = ""  # why refused or not tried; what a verdict rests on
    loss_diff: float | None = None  # largest |running loss - plain's| / |plain's| over the proof's steps
    weight_diff: float | None = None  # ||weights - plain's|| / ||plain's|| after the proof (all parameters together)
    speedup: float | None = None  # plain loop's round seconds over the row's (median, after the first round)
    rounds: int | None = None  # how many rounds the speed-up rests on
    s_per_round: float | None = None  # median seconds of the row's rounds after the first
    steps: int | None = None  # optimizer steps its proof compared (more than proof_steps past a declared warm-up)

    @property
    def accepted(self) -> bool:
        """Whether its numbers are within tolerance (it may be chosen)."""
        return self.verdict in VERDICTS[:-1]


@dataclass
class TuneReport:
    """What :func:`tune` measured and chose. ``str()`` is the table and the chosen code; :attr:`preset` the choice."""

    model: str  # the model's class name
    device: str  # where it trained
    batch_size: int  # micro-batch size of every row
    lr: float  # learning rate of every row
    rows: list[TuneRow]  # every configuration looked at, the plain loop first
    chosen: str  # the chosen row's name (the plain loop when nothing was faster)
    budget_s: float  # the budget given
    spent_s: float  # wall seconds spent
    tolerances: dict[str, float]  # rounding_tol and precision_tol
    proof_steps: int  # optimizer steps each proof compares
    steps_per_round: int  # optimizer steps of every row per round
    machine: dict[str, Any] = field(default_factory=dict)  # what it was measured on
    #: fresh-instance builders of the chosen strategies (not in the JSON)
    _builders: tuple[Callable[[], Strategy], ...] = field(default=(), repr=False)

    @property
    def best(self) -> TuneRow:
        """The chosen row."""
        return next(r for r in self.rows if r.name == self.chosen)

    @property
    def preset(self) -> Preset:
        """The chosen configuration as a :class:`Preset` with fresh strategy instances (each access builds new ones)."""
        return Preset("tuned", tuple(build() for build in self._builders), self.batch_size, lr=self.lr, description=f"tuned: {self.chosen}")

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        d["rows"] = [dataclasses.asdict(r) for r in self.rows]
        d["code"] = self.code()
        return d

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as JSON to ``path`` (atomically)."""
        text = json.dumps(self.to_dict(), indent=2, default=str)
        atomic_write(path, lambda f: f.write(text.encode("utf-8")))

    def code(self) -> str:
        """The chosen configuration as Python code."""
        strategies = self.best.strategies
        names = sorted({s.split("(", 1)[0] for s in strategies})
        imports = "from hlbd_fast import FastTrainer, Preset" + (f"\nfrom hlbd_fast.strategies import {', '.join(names)}" if names else "")
        listed = "".join(f"\n        {s}," for s in strategies) + "\n    " if strategies else ""
        note = "" if strategies else "  # nothing was faster than the plain loop within tolerance"
        return (
            f"{imports}\n\npreset = Preset(\n    'tuned',\n    ({listed}),{note}\n    batch_size={self.batch_size},\n    lr={self.lr!r},\n)\n"
            "trainer = FastTrainer.from_preset(model, preset)"
        )

    def __str__(self) -> str:
        return _render(self)


def as_code(strategy: Strategy) -> str:
    """``strategy`` as the Python call that builds it: its class and the constructor arguments that differ from their defaults."""
    args = []
    for name, p in inspect.signature(type(strategy).__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or not hasattr(strategy, name):
            continue
        value = getattr(strategy, name)
        if not _literal(value):
            continue  # an object the strategy resolved from its argument (e.g. CUDAGraphStep's backend), not what it was given
        if p.default is p.empty or value != p.default:
            args.append(f"{name}={value!r}" if p.default is not p.empty or args else repr(value))
    return f"{type(strategy).__name__}({', '.join(args)})"


def _literal(value: Any) -> bool:
    """Whether ``repr(value)`` reads back as the same value (numbers, strings, None and tuples or lists of them)."""
    if isinstance(value, (tuple, list)):
        return all(_literal(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _render(r: TuneReport) -> str:
    """The table, the choice and its code."""
    lines = [
        f"tune: {r.model} on {r.device}, micro-batch {r.batch_size}, lr {r.lr:g}; {r.spent_s:.0f} s of a {r.budget_s:.0f} s budget",
        f"proofs: {r.proof_steps} optimizer steps (more past a declared warm-up) from the same weights on the same batches as the plain loop, dropout off; "
        f"timing: {r.steps_per_round} steps per round, interleaved; a combined row adds one strategy to the row above it",
        "",
        f"{'configuration':<20} {'stage':<9} {'verdict':<14} {'steps':>5} {'loss diff':>9} {'weight diff':>11} {'speed-up':>8} {'rounds':>6}  reason",
    ]
    previous = ""
    for row in r.rows:
        shown = row.name
        if row.stage == "combined" and previous and row.name.startswith(previous + " + "):
            shown = "+ " + row.name[len(previous) + 3 :]
        if row.stage == "combined" and row.accepted:
            previous = row.name
        speed = "-" if row.speedup is None else f"{row.speedup:.2f}x"
        lines.append(
            f"{shown:<20} {row.stage:<9} {row.verdict:<14} {_fmt(row.steps, 'd'):>5} {_fmt(row.loss_diff, '9.1e'):>9} {_fmt(row.weight_diff, '11.1e'):>11} "
            f"{speed:>8} {_fmt(row.rounds, 'd'):>6}  {row.reason}"
        )
    best = r.best
    faster = "" if best.speedup is None else f", {best.speedup:.2f}x the plain loop over {best.rounds} rounds"
    lines += ["", f"chosen: {r.chosen} ({best.verdict}{faster})", "", r.code()]
    return "\n".join(lines)
