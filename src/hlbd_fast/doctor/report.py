"""The doctor's results (:class:`Diagnosis` and its parts) and their text report (``str(diagnosis)``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

_PHASES = ("data", "forward", "backward", "optimizer", "loss read-back", "other")


class DoctorError(ValueError):
    """A bad argument to :func:`diagnose` or ``hlbd-fast doctor``; the message says the fix."""


# ---------------------------------------------------------------------------- results
@dataclass
class ModuleTime:
    """One module's forward time per optimizer step (timed pass)."""

    name: str  # qualified name in the model ("" for the root)
    cls: str  # class name, e.g. "MultiHeadAttention"
    self_s: float  # seconds per step inside its forward, minus the modules it called
    total_s: float  # seconds per step inside its forward, children included
    calls: float  # forward calls per step
    share: float  # self_s / the timed pass's step time
    max_child_calls: float = 0.0  # most calls per step of one module it calls (loops show here)
    child: str = ""  # the label of that module

    @property
    def label(self) -> str:
        """``"qualified.name (Class)"``, ``"(root) (Class)"`` for the model itself."""
        return f"{self.name or '(root)'} ({self.cls})"


@dataclass
class ClassTime:
    """All modules of one class together (the timed pass), per optimizer step."""

    cls: str  # class name
    modules: int  # how many modules of this class ran
    self_s: float  # their self seconds per step, summed
    total_s: float  # their total seconds per step, summed (nested instances count twice)
    share: float  # self_s / the timed pass's step time


class SyncSource(NamedTuple):
    """Where host-device syncs come from: ``(module, op, per_step)``."""

    module: str  # module label "name (Class)", or a phase in brackets, e.g. "(optimizer step)"
    op: str  # the operator, e.g. "aten::_local_scalar_dense"
    per_step: float  # syncs per optimizer step


@dataclass
class OpTime:
    """One operator's self time per optimizer step (profiler pass)."""

    name: str  # e.g. "aten::addmm"
    host_s: float  # self host (CPU) seconds per step
    device_s: float | None  # self device seconds per step (None on CPU)
    calls: float  # calls per step


@dataclass
class Recommendation:
    """A suggestion and the measured share of the step it addresses (an upper bound on the gain)."""

    text: str  # plain words, naming the code or strategy and the measured numbers
    share: float  # fraction of the step time this is about; recommendations are sorted by it
    strategies: list[str] = field(default_factory=list)  # hlbd_fast strategies that address it


@dataclass
class Diagnosis:
    """What :func:`diagnose` measured. ``str()`` is the report, :meth:`to_dict` the data.

    Times are seconds per optimizer step; shares are fractions of a step.
    """

    model: str  # the model's class name
    device: str  # where it trained
    steps: int  # steps of the clean and timed passes
    batch_size: int  # micro-batch size
    accumulation: int  # micro-batches per optimizer step
    strategies: list[str]  # repr of each strategy used
    step_s: float  # wall seconds per step, clean pass (nothing added)
    timed_step_s: float  # wall seconds per step of the timed pass (the shares' denominator)
    phases: dict[str, float]  # seconds per step: data, forward, backward, optimizer, loss read-back, other
    device_s: float | None  # device busy seconds per step (CUDA kernels); None on CPU
    top_modules: list[ModuleTime]  # by self time, largest first; empty when the model is compiled
    top_classes: list[ClassTime]  # the same, summed per module class
    syncs_per_step: float | None  # host-device syncs per step; None when not measurable
    sync_sources: list[SyncSource]  # largest first
    sync_locations: dict[str, str]  # "module | op" -> the lines of code that asked most often
    top_ops: list[OpTime]  # profiler operators by self time, largest first
    padding: dict[str, float]  # "pad_fraction", "trimmable_fraction" (of src+tgt positions)
    graph_breaks: int | None  # torch.compile graph breaks (None: nothing was compiled)
    graph_break_reasons: list[tuple[str, int]]  # (reason, count)
    recommendations: list[Recommendation]  # largest share first
    notes: list[str]  # caveats of this measurement
    #: the strategies' reports by strategy (``{"CUDAGraphStep": {"graphs", "fallback", ...}, ...}``)
    run_info: dict[str, Any] = field(default_factory=dict)
    #: the padding's proofs and price on a copy of the model (see :mod:`.pricing`): columns_cut, trim_refused,
    #: unpad_refused, unpad_capable, padded_s, trimmed_s, ratio; empty when there was nothing to cut or it was cut already
    padding_price: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The diagnosis as JSON-ready data (module labels included)."""
        d = asdict(self)
        d["top_modules"] = [dict(asdict(m), label=m.label) for m in self.top_modules]
        d["sync_sources"] = [s._asdict() for s in self.sync_sources]
        d["graph_break_reasons"] = [list(r) for r in self.graph_break_reasons]
        return d

    def __str__(self) -> str:
        return _render(self)


# ---------------------------------------------------------------------------- report
def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _ms(s: float | None) -> str:
    return "n/a" if s is None or (isinstance(s, float) and math.isnan(s)) else f"{s * 1e3:.2f}"


def _render(d: Diagnosis) -> str:
    """The report: header, phases, modules, syncs, operators, padding and compilation, recommendations, notes."""
    out: list[str] = []
    for part in (_render_header, _render_phases, _render_modules, _render_syncs, _render_ops, _render_findings, _render_advice):
        out.extend(part(d))
    return "\n".join(out)


def _render_header(d: Diagnosis) -> list[str]:
    strategies = ", ".join(d.strategies) or "none (the plain fp32 loop)"
    dev_line = (
        "n/a on CPU (everything runs on the host)"
        if d.device_s is None
        else (f"{_ms(d.device_s)} ms busy per step ({pct(d.device_s / d.step_s) if d.step_s > 0 else '?'} of the wall time)")
    )
    return [
        f"hlbd_fast doctor: {d.model} on {d.device}; {d.steps} steps of {d.accumulation} x {d.batch_size} samples",
        f"strategies: {strategies}",
        f"step time: {_ms(d.step_s)} ms (clean pass); device time: {dev_line}",
        "",
    ]


def _render_phases(d: Diagnosis) -> list[str]:
    out = [f"Where a step's time goes (timed pass: {_ms(d.timed_step_s)} ms per step)", f"  {'phase':<16}{'ms/step':>10}{'share':>8}"]
    for k in _PHASES:
        v = d.phases.get(k, 0.0)
        out.append(f"  {k:<16}{_ms(v):>10}{pct(v / d.timed_step_s) if d.timed_step_s > 0 else '?':>8}")
    out.append("")
    return out


def _render_modules(d: Diagnosis) -> list[str]:
    if not d.top_modules:
        return []
    out = ["Modules by self time (forward; a module's own code, the modules it calls excluded)"]
    width = max(40, min(70, max(len(m.label) for m in d.top_modules[:10]) + 2))
    out.append(f"  {'#':>2}  {'module':<{width}}{'self ms':>9}{'share':>7}{'calls':>7}{'total ms':>10}")
    for i, m in enumerate(d.top_modules[:10], 1):
        out.append(f"  {i:>2}  {m.label:<{width}}{_ms(m.self_s):>9}{pct(m.share):>7}{m.calls:>7.0f}{_ms(m.total_s):>10}")
    out += ["", "The same by module class", f"  {'class':<32}{'modules':>8}{'self ms':>9}{'share':>7}"]
    for c in d.top_classes[:8]:
        out.append(f"  {c.cls:<32}{c.modules:>8}{_ms(c.self_s):>9}{pct(c.share):>7}")
    out.append("")
    return out


def _render_syncs(d: Diagnosis) -> list[str]:
    if d.syncs_per_step is None:
        return ["Host syncs: not measurable here (see notes)", ""]
    out = [f"Host syncs: {d.syncs_per_step:g} per step" + ("" if d.sync_sources else " (none found)")]
    if d.sync_sources:
        width = max(30, min(60, max(len(s.module) for s in d.sync_sources[:10]) + 2))
        out.append(f"  {'where':<{width}}{'op':<40}{'per step':>9}  lines of code")
        for s in d.sync_sources[:10]:
            loc = d.sync_locations.get(f"{s.module} | {s.op}", "")
            out.append(f"  {s.module:<{width}}{s.op:<40}{s.per_step:>9g}  {loc}")
    out.append("")
    return out


def _render_ops(d: Diagnosis) -> list[str]:
    if not d.top_ops:
        return []
    dev = d.device_s is not None
    out = ["Busiest operators (profiler, self time per step)"]
    out.append(f"  {'op':<48}{'host ms':>9}" + (f"{'device ms':>11}" if dev else "") + f"{'calls':>7}")
    for o in d.top_ops[:8]:
        out.append(f"  {o.name[:47]:<48}{_ms(o.host_s):>9}" + (f"{_ms(o.device_s):>11}" if dev else "") + f"{o.calls:>7.0f}")
    out.append("")
    return out


def _render_findings(d: Diagnosis) -> list[str]:
    out = []
    if d.padding:
        out.append(
            f"Padding: {pct(d.padding['pad_fraction'])} of batch positions are padding; "
            f"{pct(d.padding['trimmable_fraction'])} are in columns that are padding in every row of their batch"
        )
    if d.graph_breaks is not None:
        out.append(f"torch.compile graph breaks: {d.graph_breaks}")
        for reason, count in d.graph_break_reasons[:5]:
            out.append(f"  {count} x {reason}")
    out.append("")
    return out


def _render_advice(d: Diagnosis) -> list[str]:
    out = ["Recommendations (largest measured share of the step first)"]
    if not d.recommendations:
        out.append("  none: no phase, module or sync stands out")
    for i, r in enumerate(d.recommendations, 1):
        out.append(f"  {i}. [{pct(r.share)}] {r.text}")
    if d.notes:
        out += ["", "Notes"]
        out.extend(f"  - {n}" for n in d.notes)
    return out
