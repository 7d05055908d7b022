"""Where a training step's time goes, measured on *your* model.

:func:`diagnose` trains a copy of a model for a few steps with :class:`FastTrainer` and
measures, in separate passes so that one measurement does not distort the next:

1. **warm-up** (``warmup`` steps): one-off costs (allocator, compilation, CUDA graph
   capture) and the padding of the batches. A step role that captures each step shape
   (:class:`~hlbd_fast.strategies.CUDAGraphStep`: a shape is captured after
   ``warmup_steps`` eager runs of it, and TrimPadding buckets make several shapes) is
   then warmed up by whole epochs until an epoch runs on captured graphs only (at most
   ``warmup_steps + 2`` epochs), so that no capture happens in a measured pass.
2. **clean pass** (``steps`` steps): the honest wall time of a step, nothing added.
3. **timed pass** (``steps`` steps): the split of a step into data, forward (the
   model's forward), backward (the loss and its backward), optimizer (clip + step +
   zero_grad), loss read-back and other; and every module's *self* time: the time
   inside its ``forward`` minus the time of the modules it called, so containers and
   the root do not hide the culprit. On CUDA this pass synchronises the device at every
   boundary (a diagnostic may: otherwise host timestamps say nothing about queued GPU
   work), so its shares are those of a serialised step; the step time reported comes
   from the clean pass. When a step role replaces the step (CUDAGraphStep), nothing of
   the doctor runs inside it — no forward hook, no timestamp, no sync: a sync inside a
   step being captured would make the capture fail — and the step is timed whole, from
   :meth:`~hlbd_fast.strategies.Strategy.on_step_start` to ``on_step_end``.
4. **sync pass** (up to 5 steps): every host-device synchronisation (``.item()``,
   ``float()``/``bool()`` of a tensor, ``.tolist()``, ``.cpu()``, boolean-mask
   indexing, ``nonzero``...), attributed to the innermost module running, with the
   line of code that asked for it. On CUDA the device itself reports them
   (``torch.cuda.set_sync_debug_mode("warn")``); on CPU there is no device to wait
   for, so the operations that would wait on a GPU are counted instead.
5. **profiler pass** (up to 5 steps): ``torch.profiler``'s busiest operators, and on
   CUDA the device's busy time per step against the wall time (host-bound or not).

The doctor watches the plain :class:`FastTrainer` through its public seams only: a
private strategy (the probe, listed first) marks the step's boundaries with the
strategy hooks, forward hooks on the module the loop calls time the forward, and the
trainer's ``loss_read_seconds`` times the read-backs.

It then writes recommendations ordered by the share of the step they address, each
based on the numbers above. ``str(diagnosis)`` is the report; ``diagnosis.to_dict()``
is the same as JSON-ready data. From the shell: ``hlbd-fast doctor``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import json
import logging
import math
import os
import sys
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence

import torch
from torch import nn

from ._validation import check_positive_int, infer_vocab_size
from .strategies.base import StepRunner, Strategy
from .strategies.precision import cpu_has_native_bf16
from .strategies.unpad import unpad_mode
from .trainer import FastTrainer

if TYPE_CHECKING:  # pragma: no cover
    from .meter import Figures

__all__ = [
    "Diagnosis",
    "DoctorError",
    "ClassTime",
    "ModuleTime",
    "OpTime",
    "Recommendation",
    "SyncSource",
    "diagnose",
    "main",
]

log = logging.getLogger("hlbd_fast")

_MAX_DETAIL_STEPS = 5  # steps of the sync and profiler passes (they slow a step down)
_PHASES = ("data", "forward", "backward", "optimizer", "loss read-back", "other")
_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)

# Operators that make the host wait for the device on a GPU: a value is read back, or
# the size of the result depends on the values. On CPU nothing waits, so these are
# what the sync pass counts there.
_SYNC_OPS: dict[str, str] = {
    "_local_scalar_dense": ".item() / float() / int() / bool() of a tensor",
    "nonzero": "nonzero / argwhere / where(cond): output size depends on values",
    "masked_select": "masked_select: output size depends on values",
    "unique": "unique: output size depends on values",
    "_unique": "unique: output size depends on values",
    "_unique2": "unique: output size depends on values",
    "unique_consecutive": "unique_consecutive: output size depends on values",
    "unique_dim": "unique: output size depends on values",
    "repeat_interleave": "repeat_interleave without output_size",
    "equal": "torch.equal: returns a Python bool",
    "bincount": "bincount: output size depends on the largest value",
}
_BOOL_INDEX_OPS = ("index", "index_put", "index_put_", "_index_put_impl_")
_MATMUL_OPS = (
    "aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_flash_attention_forward",
    "aten::_flash_attention_backward", "aten::_efficient_attention_forward", "aten::_efficient_attention_backward",
    "aten::mkldnn_linear", "aten::_mkldnn_linear",
)


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
    #: what the run recorded in ``trainer.history.info`` (``cuda_graphs``, ``cuda_graph_fallback``, ``tf32``...)
    run_info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The diagnosis as JSON-ready data (module labels included)."""
        d = asdict(self)
        d["top_modules"] = [dict(asdict(m), label=m.label) for m in self.top_modules]
        d["sync_sources"] = [s._asdict() for s in self.sync_sources]
        d["graph_break_reasons"] = [list(r) for r in self.graph_break_reasons]
        return d

    def __str__(self) -> str:
        return _render(self)



# ---------------------------------------------------------------------------- the probe
#: torch's warning for each synchronising CUDA operation under ``set_sync_debug_mode("warn")``
#: (its one-time notice that the mode is a prototype is not a sync and must not count).
_SYNC_WARNING = "called a synchronizing CUDA operation"
_READ_OP = "aten::tolist (loss read-back)"  # how a read-back is named on CPU (EpochMeter.read's .tolist())
_READ_LABEL = "(loss read-back)"
_PHASE_LABELS = {
    "forward": "(model)",  # inside the module the loop calls, but in none of the model's modules (a wrapper)
    "loss": "(loss or backward, outside the model)",
    "optimizer": "(optimizer step)",
    "data": "(data loading)",
    "step": "(training step)",
}


class _Probe(Strategy):
    """The doctor's view of the loop: step boundaries, forward, read-backs and batches.

    Listed first among the trainer's strategies, so that :meth:`prepare_batch` sees every
    batch before another strategy (TrimPadding) changes it. Outside a pass (``mode``
    ``"off"``, ``recording`` false) every hook only follows the phase.

    Phases of a recorded step: ``data`` from the previous step's end to
    :meth:`on_step_start` (read-backs there excluded); ``forward`` inside the module the
    loop calls (forward hooks); ``backward`` the rest of the step up to
    :meth:`before_clip` (the loss computation included, see :meth:`forward_end`);
    ``optimizer`` from :meth:`before_clip` to :meth:`on_step_end`; ``loss read-back``
    the time of every read (``trainer.loss_read_seconds``).

    A step role that replaces the step (CUDAGraphStep) gets no forward hooks, and
    :meth:`before_clip` (which runs inside the step, at capture only) does nothing: the
    step is one phase, from :meth:`on_step_start` to :meth:`on_step_end`, where the only
    timestamps (and, timed on CUDA, syncs) are taken.
    """

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.cuda = False
        self.pad_id = 0
        self.replaced_step = False  # a step role runs the whole step (CUDAGraphStep...)
        self.mode = "off"  # warmup | clean | timed | sync | profile
        self.recording = False
        self.closing = False  # after a pass's last step, until its train_epoch returns
        self.phase = "data"
        self.target = 0
        self.steps = 0
        self.acc: defaultdict[str, float] = defaultdict(float)
        self.body: defaultdict[str, float] = defaultdict(float)
        self.in_body = False
        self.last_end = self.step_start = self.opt_start = self.forward_t0 = 0.0
        self.rb_gap = 0.0  # read-back seconds between two steps (not data)
        self.read_mark = 0.0  # trainer.loss_read_seconds at the last read seen
        self.read_syncs = 0  # CUDA: the device's sync reports during the current read
        self.read_where = "FastTrainer reading the running loss"
        self.pending: list[tuple[float, int, str]] = []  # reads after the last step: (seconds, syncs, where)
        self.clean_marks: list[float] = []
        # module stack: [id(module), start, child_time]
        self.stack: list[list[Any]] = []
        self.names: dict[int, tuple[str, str]] = {}  # id(module) -> (qualified name, class name)
        self.labels: dict[int, str] = {}  # id(module) -> "name (Class)"
        self.mod_total: defaultdict[int, float] = defaultdict(float)
        self.mod_self: defaultdict[int, float] = defaultdict(float)
        self.mod_calls: defaultdict[int, int] = defaultdict(int)
        self.child_calls: defaultdict[tuple[int, int], int] = defaultdict(int)
        # syncs
        self.syncs: Counter[tuple[str, str]] = Counter()
        self.sync_where: defaultdict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        self.in_op = False
        self.warnings_seen = 0
        # padding
        self.pad = {"positions": 0.0, "pad": 0.0, "trimmable": 0.0}

    def __repr__(self) -> str:
        return "_Probe()"

    # ---- time
    def now(self) -> float:
        """A timestamp; in the timed pass on CUDA after the device finished its queue.

        Called only outside a replaced step (no hook runs inside one); the capture check
        is a last guard, since a sync while capturing makes the capture fail.
        """
        if self.cuda and self.mode == "timed" and not torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize(self.device)  # diagnostic sync: time the device's work, not the launch
        return time.perf_counter()

    # ---- passes
    def follow(self, mode: str) -> None:
        """Follow the loop as ``mode`` without recording anything (the warm-up epochs)."""
        self.mode, self.recording, self.closing = mode, False, False
        self.phase = "data"

    def start_pass(self, trainer: FastTrainer, mode: str, steps: int) -> None:
        """Record the next ``steps`` optimizer steps as pass ``mode``."""
        self.mode, self.target, self.steps = mode, steps, 0
        self.recording, self.closing = True, False
        self.phase = "data"
        self.acc.clear()
        self.pending.clear()
        self.stack.clear()
        if mode == "clean":
            self.clean_marks.clear()
        self.in_body = False
        self.rb_gap = 0.0
        self.read_syncs = 0
        self.read_mark = trainer.loss_read_seconds
        # after wrap_model: in-place surgery (GradientCheckpointing) may have changed the modules
        self.names = {id(m): (n, type(m).__name__) for n, m in trainer.model.named_modules()}
        self.labels = {mid: f"{n or '(root)'} ({cls})" for mid, (n, cls) in self.names.items()}
        self.last_end = self.now()

    def finish_pass(self) -> dict[str, float]:
        """Close the pass; return its sums (seconds over all its steps, ``"total"`` included).

        A "step" read-back comes after :meth:`on_step_end`, so the reads after the last
        step belong to it, except the last of them: the read that closes the epoch the
        pass interrupted, which a real run would not make there.
        """
        for seconds, syncs, where in self.pending[:-1]:
            self._count_read(seconds, syncs, where)
            self.acc["total"] += seconds
        self.pending.clear()
        self.closing = False
        return dict(self.acc)

    def stop(self) -> None:
        """Inert from now on."""
        self.mode, self.recording, self.closing = "off", False, False
        self.stack.clear()

    def clean_step_seconds(self, steps: int) -> float:
        """Wall seconds per step of the clean pass (from the end of its first step to the end of its last)."""
        marks = self.clean_marks
        return (marks[-1] - marks[0]) / steps if len(marks) >= 2 else float("nan")

    # ---- strategy hooks: the step's boundaries
    def setup(self, trainer: FastTrainer) -> None:
        self.device = trainer.device
        self.cuda = trainer.device.type == "cuda"
        self.pad_id = trainer.pad_id
        self.replaced_step = type(trainer.roles.step) is not StepRunner

    def prepare_batch(self, trainer: FastTrainer, batch: Any) -> Any:
        if self.mode == "warmup" and isinstance(batch, (tuple, list)) and len(batch) >= 2:
            for t in batch[:2]:
                if isinstance(t, torch.Tensor) and t.dim() == 2 and t.numel():
                    self._add_padding(t)  # warm-up only: may read values back, it is not timed
        return batch

    def on_step_start(self, trainer: FastTrainer) -> None:
        self.phase = "step"
        if not self.recording:
            return
        t = self.now()
        self.acc["data"] += t - self.last_end - self.rb_gap
        self.rb_gap = 0.0
        self.step_start = t
        self.in_body = True
        self.body.clear()

    def before_clip(self, trainer: FastTrainer) -> None:
        if self.replaced_step:
            return  # a step role runs it at capture only (CUDAGraphStep): its whole step is 'other'
        self.phase = "optimizer"
        if self.recording and self.in_body:
            t = self.now()
            self._close_body(t)
            self.opt_start = t

    def on_step_end(self, trainer: FastTrainer) -> None:
        self.phase = "data"
        if not self.recording:
            return
        t = self.now()
        if self.in_body:  # no before_clip: a replaced step
            self._close_body(t)
        else:
            self.acc["optimizer"] += t - self.opt_start
        self.steps += 1
        last = self.steps >= self.target
        if self.mode == "clean" and (self.steps == 1 or last):  # the window's two ends
            if self.cuda:
                torch.cuda.synchronize(self.device)  # diagnostic sync: close the timing window
            self.clean_marks.append(time.perf_counter())
            t = self.now()
        self.acc["total"] += t - self.last_end
        self.last_end = t
        self.rb_gap = 0.0
        if last:
            self.recording, self.closing = False, True
            trainer.request_stop()

    def _close_body(self, t: float) -> None:
        # the step up to before_clip, less the model's forward and the read-backs: the loss and
        # backward (of a replaced step: everything it does, reported as 'other')
        rest = t - self.step_start - self.body["forward"] - self.body["loss read-back"]
        self.acc["step (replaced)" if self.replaced_step else "backward"] += max(rest, 0.0)
        self.in_body = False

    # ---- read-backs
    def on_loss_read(self, trainer: FastTrainer, figures: "Figures") -> None:
        # the trainer times each read itself; on CUDA (timed pass) the read also waits for the
        # work queued since the last boundary (the backward of a micro-batch read right after
        # it), which therefore counts as read-back here: an approximation of the old split
        seconds = trainer.loss_read_seconds - self.read_mark
        self.read_mark = trainer.loss_read_seconds
        syncs = self.read_syncs if self.cuda else 1  # CUDA: what the device reported during the read
        self.read_syncs = 0
        if self.recording:
            self._count_read(seconds, syncs, self.read_where)
        elif self.closing:
            self.pending.append((seconds, syncs, self.read_where))

    def _count_read(self, seconds: float, syncs: int, where: str) -> None:
        self.acc["loss read-back"] += seconds
        if self.in_body:
            self.body["loss read-back"] += seconds
        else:
            self.rb_gap += seconds
        if syncs and self.mode == "sync":
            op = "sync outside an aten op" if self.cuda else _READ_OP
            self._add_sync(_READ_LABEL, op, syncs, where if self.cuda else "FastTrainer reading the running loss")

    # ---- forward hooks: the root (the module the loop calls) and every module of the model
    def forward_start(self, module: nn.Module, args: Any) -> None:
        self.phase = "forward"
        self.forward_t0 = self.now() if self.recording else 0.0

    def forward_end(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.recording and self.phase == "forward":
            dt = self.now() - self.forward_t0
            self.acc["forward"] += dt
            if self.in_body:
                self.body["forward"] += dt
        # the loss is computed after the model returns, and no public seam marks where the
        # backward starts: the loss counts under 'backward' (it used to count as forward)
        self.phase = "loss"

    def pre_hook(self, module: nn.Module, args: Any) -> None:
        self.stack.append([id(module), self.now() if self.mode == "timed" else 0.0, 0.0])

    def post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.stack:
            return
        mid, t0, child = self.stack.pop()
        if self.mode != "timed" or not self.recording or self.phase != "forward":
            return  # only forward time counts (a checkpointed module re-runs in backward)
        dt = self.now() - t0
        self.mod_total[mid] += dt
        self.mod_self[mid] += dt - child
        self.mod_calls[mid] += 1
        if self.stack:
            self.stack[-1][2] += dt
            self.child_calls[(self.stack[-1][0], mid)] += 1

    # ---- syncs
    def where_label(self) -> str:
        """The innermost module running, or the phase in brackets."""
        if self.stack:
            return self.labels.get(self.stack[-1][0], "(model)")
        return _PHASE_LABELS.get(self.phase, f"({self.phase})")

    def record_sync(self, op: str, n: int = 1, where: str | None = None) -> None:
        """Count ``n`` syncs of ``op`` where the loop is now (sync pass only)."""
        if self.recording and self.mode == "sync":
            self._add_sync(self.where_label(), op, n, where or _caller_location())

    def _add_sync(self, label: str, op: str, n: int, where: str) -> None:
        self.syncs[(label, op)] += n
        self.sync_where[(label, op)][where] += n

    # ---- padding
    def _add_padding(self, t: torch.Tensor) -> None:
        keep = t.ne(self.pad_id)
        used_cols = keep.any(0)
        n_cols = int(used_cols.nonzero().max()) + 1 if bool(used_cols.any()) else 0
        total = float(t.numel())
        self.pad["positions"] += total
        self.pad["pad"] += total - float(keep.sum())
        self.pad["trimmable"] += total - float(t.shape[0] * n_cols)


def _caller_location() -> str:
    """The innermost frame outside torch and this file: ``file:line in function``."""
    f = sys._getframe(1)
    while f is not None:
        fn = os.path.abspath(f.f_code.co_filename)
        if not fn.startswith(_TORCH_DIR) and fn != _THIS_FILE and "contextlib" not in fn:
            return f"{os.path.basename(fn)}:{f.f_lineno} in {f.f_code.co_name}"
        f = f.f_back  # type: ignore[assignment]
    return "?"


def _inside_read_back() -> bool:
    """Whether :meth:`FastTrainer.read_figures` is running (somewhere up the stack)."""
    code = FastTrainer.read_figures.__code__
    f = sys._getframe(1)
    while f is not None:
        if f.f_code is code:
            return True
        f = f.f_back  # type: ignore[assignment]
    return False


def _is_sync_warning(message: Any) -> bool:
    """Whether a warning is torch's report of one synchronising CUDA operation."""
    return _SYNC_WARNING in str(message)


@contextlib.contextmanager
def _forward_hooks(trainer: FastTrainer, probe: _Probe, modules: bool) -> Iterator[None]:
    """Time the module the loop calls (and, with ``modules``, every module of the model); removed on exit.

    Registers nothing when a step role replaces the step (CUDAGraphStep): a hook runs
    inside the step, which may be being captured, where a timestamp means nothing and a
    sync makes the capture fail.
    """
    handles: list[Any] = []
    if probe.replaced_step:
        yield
        return
    try:
        if modules:
            for m in trainer.model.modules():
                handles.append(m.register_forward_pre_hook(probe.pre_hook))
                handles.append(m.register_forward_hook(probe.post_hook, always_call=True))
        root = trainer.train_model
        # around the per-module hooks when the root is the model itself: first in, last out
        handles.append(root.register_forward_pre_hook(probe.forward_start, prepend=True))
        handles.append(root.register_forward_hook(probe.forward_end, always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()


class _SyncCounter:
    """Counts host-device syncs during the sync pass (a TorchDispatchMode plus, on CUDA, the device's own report)."""

    def __init__(self, probe: _Probe) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        cuda = probe.cuda

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
                kwargs = kwargs or {}
                name = func.overloadpacket.__name__
                if cuda:
                    before = probe.warnings_seen
                    probe.in_op = True
                    try:
                        out = func(*args, **kwargs)
                    finally:
                        probe.in_op = False
                    if probe.warnings_seen > before:  # the device said this op synchronised
                        probe.record_sync(f"aten::{name}", probe.warnings_seen - before)
                    return out
                if probe.phase not in ("data", "optimizer") and _is_sync_op(name, args):
                    # host tensors stay on the host on a GPU too: data loading and the
                    # optimizer's step counters are not counted on CPU
                    probe.record_sync(f"aten::{name}")
                return func(*args, **kwargs)

        self.mode = Mode()
        self.probe = probe

    def _show(self, original: Callable[..., None]) -> Callable[..., None]:
        p = self.probe

        def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            if not _is_sync_warning(message):
                original(message, category, filename, lineno, file, line)
                return
            if _inside_read_back():  # counted by the probe when the read is done (on_loss_read)
                p.read_syncs += 1
                p.read_where = f"{os.path.basename(filename)}:{lineno}"
                return
            p.warnings_seen += 1
            if not p.in_op:  # not inside an aten op: e.g. torch.cuda.synchronize(), .tolist()
                p.record_sync("sync outside an aten op", where=f"{os.path.basename(filename)}:{lineno}")

        return show

    @contextlib.contextmanager
    def active(self, dispatch: bool) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if self.probe.cuda:
                previous_mode = torch.cuda.get_sync_debug_mode()
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("always")
                warnings.showwarning = self._show(warnings.showwarning)
                torch.cuda.set_sync_debug_mode("warn")
                stack.callback(torch.cuda.set_sync_debug_mode, previous_mode)
            if dispatch:
                stack.enter_context(self.mode)
            yield


def _is_sync_op(name: str, args: tuple) -> bool:
    if name in _SYNC_OPS:
        return not (name == "repeat_interleave" and len(args) > 0 and not isinstance(args[0], torch.Tensor))
    if name in _BOOL_INDEX_OPS and len(args) > 1 and isinstance(args[1], (list, tuple)):
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return False


# ---------------------------------------------------------------------------- diagnose
def diagnose(
    model: nn.Module,
    data: Any,
    strategies: Sequence[Strategy] = (),
    steps: int = 20,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    *,
    warmup: int = 2,
    preset: Any = None,
    copy_model: bool = True,
    **trainer_kwargs: Any,
) -> Diagnosis:
    """Train a copy of ``model`` for a few steps and measure where a step's time goes.

    Args:
        model: the model, as :class:`FastTrainer` takes it (``model(src, tgt_in)``).
        data: what :meth:`FastTrainer.fit` takes: ``(src, tgt)`` tensors, a Dataset or a
            DataLoader.
        strategies: the speed-ups to diagnose with (copied; the given instances are
            not set up).
        steps: optimizer steps of the clean and timed passes (the sync and profiler
            passes run ``min(steps, 5)``).
        batch_size: micro-batch size; default 32, or the preset's.
        device: where to train; default the model's device.
        warmup: untimed steps first (compilation, allocator, CUDA graph capture); at
            least one more than a strategy's ``warmup_steps``. One-off costs that come
            later (a new input shape compiling or capturing again) land in the timed passes.
        preset: a :class:`~hlbd_fast.presets.Preset` or preset name; its strategies
            come before ``strategies`` and its batch size, loss normalisation and lr
            are the defaults.
        copy_model: train a deep copy (default), so ``model`` is untouched; ``False``
            trains ``model`` itself for ``warmup + ~3 * steps`` steps.
        **trainer_kwargs: more :class:`FastTrainer` arguments (``lr``, ``pad_id``,
            ``loss_normalization``, ``max_grad_norm``, ``seed``...). ``progress`` is
            always off.

    Returns:
        A :class:`Diagnosis`; print it for the report.

    Raises:
        DoctorError: a bad argument (the message names it and the fix).
    """
    _check_arguments(model, steps, warmup, batch_size, copy_model, trainer_kwargs)
    probe = _Probe()
    kwargs = _trainer_arguments(probe, strategies, batch_size, device, preset, trainer_kwargs, model)
    if copy_model:
        model = _copy_model(model)
    dynamo_before = _graph_break_counter()
    trainer = FastTrainer(model, **kwargs)
    try:
        measured = _measure(trainer, probe, data, steps, warmup)
    finally:
        probe.stop()
        _close_workers(trainer)
    return _assemble(trainer, probe, measured, steps, dynamo_before)


def _check_arguments(model: Any, steps: Any, warmup: Any, batch_size: Any, copy_model: bool, trainer_kwargs: dict[str, Any]) -> None:
    """Refuse bad arguments before anything is built (a :class:`DoctorError` naming the fix)."""
    if not isinstance(model, nn.Module):
        raise DoctorError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        check_positive_int("steps", steps)
        check_positive_int("warmup", warmup, minimum=0)
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
    except ValueError as e:
        raise DoctorError(str(e)) from None
    if "optimizer" in trainer_kwargs and copy_model:
        raise DoctorError(
            "optimizer= holds the parameters of the model you passed, but diagnose trains a copy; "
            "pass copy_model=False to train the given model with that optimizer"
        )


def _trainer_arguments(
    probe: _Probe,
    strategies: Sequence[Strategy],
    batch_size: int | None,
    device: str | torch.device | None,
    preset: Any,
    extra: dict[str, Any],
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """:class:`FastTrainer` keyword arguments: the preset's (fitted to ``model``), overridden by the caller's; the probe first."""
    overrides = {k: v for k, v in extra.items() if k != "progress"}
    overrides.setdefault("seed", 0)
    overrides.update(strategies=tuple(strategies), device=device, progress=False)
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    if preset is not None:
        from .presets import resolve_preset

        kwargs = resolve_preset(preset, device, model).trainer_kwargs(**overrides)
    else:
        kwargs = {"batch_size": 32, **overrides}
    try:
        copied = copy.deepcopy(tuple(kwargs["strategies"]))
    except Exception:  # noqa: BLE001 - a strategy holding something uncopyable: use it as given
        log.info("doctor: strategies could not be copied; using the given instances")
        copied = tuple(kwargs["strategies"])
    # first: its prepare_batch sees the batches before TrimPadding cuts them
    kwargs["strategies"] = (probe, *copied)
    return kwargs


def _copy_model(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise DoctorError(f"the model could not be deep-copied ({e}); pass copy_model=False to train it in place") from e


def _close_workers(trainer: FastTrainer) -> None:
    """Stop DataLoaderWorkers' processes (``train_epoch`` leaves them running for the next epoch)."""
    close = getattr(trainer.roles.batches, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # noqa: BLE001 - never hide the diagnosis (or its error) behind a shutdown failure
            log.warning("doctor: the DataLoader workers could not be stopped", exc_info=True)


# ---------------------------------------------------------------------------- the passes
@dataclass
class _Measured:
    """What the passes measured, before it is assembled into a :class:`Diagnosis`."""

    step_s: float  # clean pass, seconds per step
    timed: dict[str, float]  # timed pass, seconds over all its steps per phase (and "total")
    sync_steps: int  # steps of the sync pass; 0: not measured
    ops: list[OpTime]
    device_s: float | None
    kernels: float  # CUDA kernels per step
    compiled: bool
    notes: list[str]


def _run_pass(trainer: FastTrainer, probe: _Probe, data: Any, mode: str, steps: int) -> dict[str, float]:
    """Train ``steps`` optimizer steps (as many epochs as that takes) recorded as ``mode``; return the sums."""
    probe.start_pass(trainer, mode, steps)
    while probe.recording:
        before = probe.steps
        trainer.train_epoch(data)
        if probe.steps == before:
            raise DoctorError("data yielded no optimizer step; check the data and batch_size")
    return probe.finish_pass()


def _warmup_steps(trainer: FastTrainer, warmup: int) -> int:
    """``warmup``, at least 1 (the padding is looked at there), and past every strategy's own warm-up.

    A strategy that runs its first steps differently (CUDAGraphStep captures after a few
    eager steps) gets those steps inside the warm-up.
    """
    own = [int(getattr(s, "warmup_steps", 0)) + 1 for s in trainer.strategies] if warmup else []
    return max([warmup, 1] + own)


def _measure(trainer: FastTrainer, probe: _Probe, data: Any, steps: int, warmup: int) -> _Measured:
    """Run the five passes (see the module's docstring)."""
    compiled = _is_compiled(trainer)
    eager = not compiled and not probe.replaced_step
    notes: list[str] = []
    if not eager:
        notes.append(
            "the model runs compiled or as a captured step, so modules cannot be timed one by one; "
            "diagnose without Compile/CUDAGraphStep to see them"
        )
    run = functools.partial(_run_pass, trainer, probe, data)
    run("warmup", _warmup_steps(trainer, warmup))
    _warm_every_shape(trainer, probe, data, notes)
    run("clean", steps + 1)  # the first step end opens the timing window
    step_s = probe.clean_step_seconds(steps)
    with _forward_hooks(trainer, probe, modules=eager):
        timed = run("timed", steps)
    detail_steps = min(steps, _MAX_DETAIL_STEPS)
    sync_steps = _sync_pass(trainer, probe, run, eager, detail_steps, notes)
    ops, device_s, kernels = _profile(run, probe.cuda, detail_steps)
    return _Measured(step_s, timed, sync_steps, ops, device_s, kernels, compiled, notes)


def _warm_every_shape(trainer: FastTrainer, probe: _Probe, data: Any, notes: list[str]) -> int:
    """Warm a graph step up by whole epochs until an epoch runs on captured graphs only; return the epochs run.

    A graph step (a step role with ``graphing``, ``graphs`` and ``shapes()``, such as
    CUDAGraphStep) captures a step shape after ``warmup_steps`` eager runs of it, and
    shapes vary (TrimPadding buckets, the epoch's partial last step): the warm-up runs
    epochs, at most ``warmup_steps + 2``, and stops after an epoch that added no graph
    when every shape seen has one. Nothing is recorded meanwhile.
    """
    step: Any = trainer.roles.step
    if not (probe.replaced_step and getattr(step, "graphing", False) and callable(getattr(step, "shapes", None))):
        return 0
    limit = int(getattr(step, "warmup_steps", 0)) + 2
    epochs = 0
    probe.follow("warmup")
    try:
        while epochs < limit and step.graphing:
            before = step.graphs
            trainer.train_epoch(data)
            epochs += 1
            if step.graphs == before and step.graphs == len(step.shapes()):
                break
    finally:
        probe.follow("off")
    shapes = len(step.shapes())
    missing = shapes - step.graphs if step.graphing else 0
    notes.append(
        f"{type(step).__name__}: the warm-up ran {epochs} whole epoch{'s' if epochs != 1 else ''} so that every step "
        f"shape is captured before timing ({step.graphs} graph{'s' if step.graphs != 1 else ''} of {shapes} shapes)"
        + (f"; {missing} shapes were not captured yet: their capture falls in the measured passes" if missing else "")
    )
    return epochs


def _sync_pass(trainer: FastTrainer, probe: _Probe, run: Callable[[str, int], Any], eager: bool, steps: int, notes: list[str]) -> int:
    """Count the host syncs of ``steps`` steps; return the steps counted (0: not measurable here)."""
    if not (eager or probe.cuda):
        notes.append("host syncs are counted on CPU only for an eager model; run without Compile to count them")
        return 0
    with _forward_hooks(trainer, probe, modules=eager), _SyncCounter(probe).active(dispatch=eager):
        run("sync", steps)
    return steps


def _profile(run: Callable[[str, int], Any], cuda: bool, n: int) -> tuple[list[OpTime], float | None, float]:
    """Profiler pass: top operators by self time; device busy time and kernels per step on CUDA."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        run("profile", n)
    ops: list[OpTime] = []
    device_us = 0.0
    kernels = 0.0
    for e in prof.key_averages():
        if getattr(e, "is_user_annotation", False) or e.key.startswith("ProfilerStep"):
            continue
        if e.device_type == DeviceType.CPU:
            dev_self = float(getattr(e, "self_device_time_total", 0.0)) / 1e6 / n if cuda else None
            ops.append(OpTime(e.key, float(e.self_cpu_time_total) / 1e6 / n, dev_self, e.count / n))
        elif cuda:
            device_us += float(e.self_device_time_total)
            kernels += e.count
    ops.sort(key=lambda o: (o.device_s or 0.0) + o.host_s, reverse=True)
    return ops[:15], (device_us / 1e6 / n if cuda else None), kernels / n


def _graph_break_counter() -> dict[str, int]:
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return {}
    return dict(getattr(utils, "counters", {}).get("graph_break", {}))


def _is_compiled(trainer: FastTrainer) -> bool:
    """Whether the module the loop calls contains a ``torch.compile`` wrapper."""
    return any(hasattr(m, "_orig_mod") for m in trainer.train_model.modules())


def _graph_breaks(trainer: FastTrainer, before: dict[str, int], compiled: bool) -> tuple[int | None, list[tuple[str, int]]]:
    after = _graph_break_counter()
    reasons = [(str(k), int(v - before.get(k, 0))) for k, v in after.items() if v - before.get(k, 0) > 0]
    reasons.sort(key=lambda r: r[1], reverse=True)
    info = trainer.history.info.get("graph_breaks")
    compiled = compiled or info is not None
    if isinstance(info, (int, float)) and not isinstance(info, bool):
        count: int | None = int(info)
    elif isinstance(info, dict):
        reasons = reasons or sorted(((str(k), int(v)) for k, v in info.items()), key=lambda r: r[1], reverse=True)
        count = sum(int(v) for v in info.values())
    elif isinstance(info, (list, tuple)):  # Compile: [{"reason", "where", "count"}]
        listed = [
            (f"{r.get('reason')} at {r.get('where')}" if r.get("where") else str(r.get("reason")), int(r.get("count", 1)))
            if isinstance(r, dict) else (str(r), 1)
            for r in info
        ]
        reasons = sorted(listed, key=lambda r: r[1], reverse=True) or reasons
        count = sum(c for _, c in listed)
    else:
        count = sum(c for _, c in reasons) if (compiled or reasons) else None
    return count, reasons


# ---------------------------------------------------------------------------- assembling
def _assemble(trainer: FastTrainer, probe: _Probe, m: _Measured, steps: int, dynamo_before: dict[str, int]) -> Diagnosis:
    """The :class:`Diagnosis` of what the passes measured, with its recommendations."""
    n = max(steps, 1)
    timed_total = m.timed.get("total", 0.0) / n
    top = _module_times(probe, n, timed_total)
    sources, syncs_per_step, locations = _sync_summary(probe, m.sync_steps)
    breaks, reasons = _graph_breaks(trainer, dynamo_before, m.compiled)
    diag = Diagnosis(
        model=type(trainer.model).__name__,
        device=str(trainer.device),
        steps=steps,
        batch_size=trainer.batch_size,
        accumulation=trainer.accumulation,
        strategies=[repr(s) for s in trainer.strategies if s is not probe],
        step_s=m.step_s,
        timed_step_s=timed_total,
        phases=_phases(m.timed, n, timed_total),
        device_s=m.device_s,
        top_modules=top,
        top_classes=_class_times(top),
        syncs_per_step=syncs_per_step,
        sync_sources=sources,
        sync_locations=locations,
        top_ops=m.ops,
        padding=_padding(probe),
        graph_breaks=breaks,
        graph_break_reasons=reasons,
        recommendations=[],
        notes=m.notes + _caveats(trainer, probe),
        run_info=_run_info(trainer),
    )
    diag.recommendations = _recommend(diag, m.kernels, unpad_mode(trainer.model) is not None)
    return diag


def _phases(timed: dict[str, float], n: int, timed_total: float) -> dict[str, float]:
    """Seconds per step of each phase; 'other' is what a replaced step did plus what no phase holds."""
    phases = {k: timed.get(k, 0.0) / n for k in ("data", "forward", "backward", "optimizer", "loss read-back")}
    phases["other"] = timed.get("step (replaced)", 0.0) / n
    phases["other"] += max(timed_total - sum(phases.values()), 0.0)
    return phases


def _module_times(probe: _Probe, n: int, timed_total: float) -> list[ModuleTime]:
    """Every timed module's self time per step, largest first."""
    top = []
    for mid, self_t in probe.mod_self.items():
        qual, cls = probe.names.get(mid, ("?", "?"))
        child_calls = [(c, k) for (p_, k), c in probe.child_calls.items() if p_ == mid]
        most, most_id = max(child_calls, key=lambda x: x[0]) if child_calls else (0, None)
        top.append(
            ModuleTime(
                name=qual,
                cls=cls,
                self_s=self_t / n,
                total_s=probe.mod_total[mid] / n,
                calls=probe.mod_calls[mid] / n,
                share=(self_t / n) / timed_total if timed_total > 0 else 0.0,
                max_child_calls=most / n,
                child=probe.labels.get(most_id, "") if most_id is not None else "",
            )
        )
    top.sort(key=lambda m: m.self_s, reverse=True)
    return top


def _class_times(top: list[ModuleTime]) -> list[ClassTime]:
    """The module times summed per class, largest self time first."""
    classes: dict[str, ClassTime] = {}
    for m in top:
        c = classes.setdefault(m.cls, ClassTime(m.cls, 0, 0.0, 0.0, 0.0))
        c.modules += 1
        c.self_s += m.self_s
        c.total_s += m.total_s
        c.share += m.share
    return sorted(classes.values(), key=lambda c: c.self_s, reverse=True)


def _sync_summary(probe: _Probe, sync_steps: int) -> tuple[list[SyncSource], float | None, dict[str, str]]:
    """Sync sources per step (largest first), syncs per step (None: not measured), and their lines of code."""
    if not sync_steps:
        return [], None, {}
    sources = [SyncSource(m, op, c / sync_steps) for (m, op), c in probe.syncs.items()]
    sources.sort(key=lambda s: s.per_step, reverse=True)
    locations = {f"{m} | {op}": ", ".join(w for w, _ in probe.sync_where[(m, op)].most_common(3)) for (m, op) in probe.syncs}
    return sources, sum(s.per_step for s in sources), locations


def _padding(probe: _Probe) -> dict[str, float]:
    pad = probe.pad
    if not pad["positions"]:
        return {}
    return {"pad_fraction": pad["pad"] / pad["positions"], "trimmable_fraction": pad["trimmable"] / pad["positions"]}


def _run_info(trainer: FastTrainer) -> dict[str, Any]:
    """``trainer.history.info`` as JSON-ready data (numbers, strings and booleans kept, anything else as text)."""
    plain = (str, int, float, bool, type(None))
    return {str(k): v if isinstance(v, plain) else str(v) for k, v in trainer.history.info.items()}


def _caveats(trainer: FastTrainer, probe: _Probe) -> list[str]:
    """The notes every diagnosis of this kind carries."""
    notes = []
    fallback = trainer.history.info.get("cuda_graph_fallback")
    if fallback:
        notes.append(f"CUDAGraphStep ran the eager step instead of graphs ({fallback}): these are the eager step's times")
    if probe.replaced_step:
        notes.append(
            f"{type(trainer.roles.step).__name__} runs the whole step; what it does besides the model's forward "
            "and the loss read-backs is under 'other'"
        )
    notes.append("forward is the model's own forward; computing the loss from its output counts under backward")
    if trainer.device.type == "cpu":
        notes.append(
            "on CPU there is no device to wait for: 'syncs' are the operations that would make the host "
            "wait for a GPU; data loading and optimizer-step counters are not counted"
        )
        notes.append("device time: n/a on CPU (everything runs on the host)")
    else:
        notes.append(
            "the timed pass synchronises the device at each step's start and end only: the step runs whole (replayed)"
            if probe.replaced_step
            else "the timed pass synchronises the device at every boundary: its shares are of a serialised step"
        )
    return notes


# ---------------------------------------------------------------------------- recommendations
def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


@dataclass
class _Facts:
    """What several rules need, derived once from the diagnosis."""

    step: float  # timed step seconds (nan when nothing was timed)
    share: dict[str, float]  # each phase's share of the timed step
    kernels_per_step: float  # CUDA kernels per step (profiler)
    syncs_by_module: dict[str, list[SyncSource]]
    mentioned: set[str]  # module labels a class recommendation already covers
    unpad_capable: bool = False  # Unpad can run the model (its protocol, or torch transformer layers)

    @property
    def compute(self) -> float:
        """The share of forward + backward."""
        return self.share.get("forward", 0.0) + self.share.get("backward", 0.0)


class _ClassEvidence(NamedTuple):
    """What speaks against one module class: its modules, their syncs and Python loops."""

    members: list[ModuleTime]
    labels: set[str]
    syncs: list[SyncSource]
    n_sync: float
    loopers: list[ModuleTime]  # modules that call one child >= 4 times per call


def _class_evidence(d: Diagnosis, c: ClassTime) -> _ClassEvidence:
    members = [m for m in d.top_modules if m.cls == c.cls]
    labels = {m.label for m in members}
    syncs = [s for s in d.sync_sources if s.module in labels]
    loopers = [m for m in members if m.calls > 0 and m.max_child_calls / m.calls >= 4]
    return _ClassEvidence(members, labels, syncs, sum(s.per_step for s in syncs), loopers)


def _stands_out(c: ClassTime, ev: _ClassEvidence) -> bool:
    """A user's class that dominates, or any class that reads values back or loops in Python."""
    return (
        (c.share >= 0.2 and not _is_builtin(c.cls))
        or (ev.n_sync >= 1 and c.share >= 0.05)
        or (bool(ev.loopers) and c.share >= 0.1)
    )


def _facts(d: Diagnosis, kernels_per_step: float, unpad_capable: bool = False) -> _Facts:
    step = d.timed_step_s if d.timed_step_s > 0 else float("nan")
    by_module: defaultdict[str, list[SyncSource]] = defaultdict(list)
    for s in d.sync_sources:
        by_module[s.module].append(s)
    mentioned: set[str] = set()
    for c in d.top_classes[:5]:
        ev = _class_evidence(d, c)
        if _stands_out(c, ev):
            mentioned |= ev.labels
    share = {k: v / step for k, v in d.phases.items()}
    return _Facts(step, share, kernels_per_step, dict(by_module), mentioned, unpad_capable)


def _slow_class(d: Diagnosis, f: _Facts, c: ClassTime) -> Recommendation | None:
    """A module class that dominates, loops, or reads values back (all its instances together)."""
    ev = _class_evidence(d, c)
    if not _stands_out(c, ev):
        return None
    total = c.total_s / f.step if f.step > 0 else 0.0
    first = ev.members[0].name or "the model itself" if ev.members else "?"
    which = first if c.modules == 1 else f"{c.modules} modules, e.g. {first}"
    parts = [
        f"`{c.cls}.forward` ({which}): {_pct(c.share)} of step time in its own code"
        + (f" ({_pct(total)} with the modules it calls)" if total >= c.share + 0.05 else "")
    ]
    if ev.n_sync:
        src = max(ev.syncs, key=lambda s: s.per_step)
        where = d.sync_locations.get(f"{src.module} | {src.op}", "")
        parts.append(f"{ev.n_sync:g} host syncs per step, mostly {src.op} ({_op_meaning(src.op)}) at {where}")
    if ev.loopers:
        m = max(ev.loopers, key=lambda m: m.max_child_calls / m.calls)
        parts.append(
            f"it runs {m.child} {m.max_child_calls / m.calls:.0f} times per call: a Python loop "
            "(over the batch or the heads?); batch it into one tensor operation"
        )
    advice = "move statistics and logging out of the training step (or compute them on the device and read them once)" if ev.n_sync else (
        "vectorise it" if ev.loopers else "look at what it computes per call"
    )
    return Recommendation("; ".join(parts) + f". {advice[0].upper()}{advice[1:]}.", c.share, [])


def _builtin_class(d: Diagnosis, f: _Facts, c: ClassTime) -> Recommendation | None:
    """torch's own layers that take a large share: say so (the work itself, not a defect)."""
    if not (_is_builtin(c.cls) and c.share >= 0.15):
        return None
    return Recommendation(
        f"torch's `nn.{c.cls}` ({c.modules} module{'s' if c.modules != 1 else ''}) takes {_pct(c.share)} of step "
        "time in its own forward: that is its work itself; doing less of it (fewer padded positions) or in "
        "fewer, larger kernels (bigger micro-batches, Compile) is what reduces it",
        c.share,
        [],
    )


def _loss_readback(d: Diagnosis, f: _Facts) -> Recommendation | None:
    """The running loss read back at least once per step."""
    readback = sum(s.per_step for s in d.sync_sources if s.module == _READ_LABEL)
    if readback < 1:
        return None
    return Recommendation(
        f"the running loss is read back {readback:g} times per step ({_pct(f.share.get('loss read-back', 0))} of step "
        "time in the timed pass; on a GPU each read also makes the host wait for the device, so the next step's launches "
        "no longer overlap its work): use DeferredLossSync() to read it once per epoch",
        f.share.get("loss read-back", 0.0),
        ["DeferredLossSync"],
    )


def _unpads_own_sync(d: Diagnosis, where: str) -> bool:
    """Whether a sync is Unpad's read-back of a packing's size (hlbd_fast/packing.py), by design."""
    return any(s.startswith("Unpad(") for s in d.strategies) and "packing.py:" in where and " in _packing" in where


def _module_syncs(d: Diagnosis, f: _Facts, module: str) -> Recommendation | None:
    """Syncs in a module (or phase) that no class recommendation covers (Unpad's own get a note instead)."""
    syncs = f.syncs_by_module.get(module, [])
    own = [s for s in syncs if _unpads_own_sync(d, d.sync_locations.get(f"{s.module} | {s.op}", ""))]
    if own and not any(n.startswith("Unpad reads") for n in d.notes):
        d.notes.append(
            f"Unpad reads each packing's size back ({sum(s.per_step for s in own):g} per step, aten::nonzero in "
            "hlbd_fast/packing.py): on a GPU each one makes the host wait for the device; it is how Unpad sizes the "
            "packed tensors, and why CUDAGraphStep cannot be combined with it"
        )
    syncs = [s for s in syncs if s not in own]
    n_sync = sum(s.per_step for s in syncs)
    if module in f.mentioned or module == _READ_LABEL or n_sync < 1:
        return None
    src = max(syncs, key=lambda s: s.per_step)
    where = d.sync_locations.get(f"{src.module} | {src.op}", "")
    mshare = next((m.share for m in d.top_modules if m.label == module), 0.0)
    return Recommendation(
        f"{module}: {n_sync:g} host syncs per step ({src.op} at {where}); each one makes the host wait for the device. "
        "Keep the value on the device or read it once per epoch",
        mshare,
        [],
    )


def _data_loading(d: Diagnosis, f: _Facts) -> Recommendation | None:
    data = f.share.get("data", 0.0)
    if not data >= 0.1:
        return None
    if d.device.startswith("cuda"):
        return Recommendation(f"loading data takes {_pct(data)} of step time: DevicePreload() keeps the whole dataset on the GPU", data, ["DevicePreload"])
    return Recommendation(
        f"loading data takes {_pct(data)} of step time: DataLoaderWorkers() prepares batches in worker processes", data, ["DataLoaderWorkers"]
    )


def _padding_rule(d: Diagnosis, f: _Facts) -> Recommendation | None:
    trim = d.padding.get("trimmable_fraction", 0.0)
    if trim < 0.25 or any("TrimPadding" in s for s in d.strategies):
        return None
    return Recommendation(
        f"{_pct(d.padding['pad_fraction'])} of the batch positions are padding and {_pct(trim)} are columns that are "
        f"padding in every row of their batch; forward+backward take {_pct(f.compute)} of step time: TrimPadding() cuts those columns",
        f.compute * trim,
        ["TrimPadding"],
    )


def _unpad_rule(d: Diagnosis, f: _Facts) -> Recommendation | None:
    """Padding that trimming leaves (short rows under a long one), for a model that can run without it."""
    if not f.unpad_capable or not d.padding or any(s.startswith("Unpad(") for s in d.strategies):
        return None
    trimmed = any(s.startswith("TrimPadding(") for s in d.strategies)
    left = d.padding["pad_fraction"] - (d.padding["trimmable_fraction"] if trimmed else 0.0)
    if left < 0.2:
        return None
    after = "after trimming " if trimmed else ""
    return Recommendation(
        f"{_pct(left)} of the batch positions {after}are padding; forward+backward take {_pct(f.compute)} of step time and "
        "the model runs padding-free: Unpad() sends only the real tokens through the matrix products",
        f.compute * left,
        ["Unpad"],
    )


def _launch_bound(d: Diagnosis, f: _Facts) -> Recommendation | None:
    """A GPU that idles while the host launches kernels."""
    if d.device_s is None or not d.step_s > 0:
        return None
    busy = d.device_s / d.step_s
    if not busy < 0.5:
        return None
    k = f.kernels_per_step
    avg = d.device_s / k * 1e6 if k else float("nan")
    return Recommendation(
        f"the GPU is busy only {_pct(busy)} of the step ({k:.0f} kernels per step, {avg:.0f} us each on average): "
        "the host cannot launch work fast enough. CUDAGraphStep() replays the whole step as one graph; "
        "a bigger micro-batch or Compile() also cut launches",
        1 - busy,
        ["CUDAGraphStep", "Compile"],
    )


def _host_share(d: Diagnosis, names: Callable[[str], bool]) -> float:
    """The share of the busiest operators' host time spent in operators ``names`` accepts (CPU)."""
    total = sum(o.host_s for o in d.top_ops) or float("nan")
    return sum(o.host_s for o in d.top_ops if names(o.name)) / total


def _cpu_bf16(d: Diagnosis, f: _Facts) -> Recommendation | None:
    """CPU matmuls: bf16 where the CPU has it natively; otherwise a note (emulated bf16 is slower)."""
    if not d.device.startswith("cpu") or not d.top_ops or any("MixedPrecision" in s for s in d.strategies):
        return None
    mm = _host_share(d, lambda name: name in _MATMUL_OPS)
    if not mm >= 0.3:
        return None
    if cpu_has_native_bf16():
        return Recommendation(
            f"matrix multiplications are {_pct(mm)} of the busiest operators' host time and this CPU "
            'computes bf16 natively (AVX512-BF16 or AMX): MixedPrecision("bf16") runs them in bfloat16',
            f.compute * mm,
            ["MixedPrecision"],
        )
    d.notes.append(
        f"matrix multiplications are {_pct(mm)} of the busiest operators' host time, but this CPU has "
        'no native bf16 (neither AVX512-BF16 nor AMX): MixedPrecision("bf16") would be emulated here; measure it '
        "(hlbd-fast bench --rows baseline,mixed-precision) before using it"
    )
    return None


def _dropout_masks(d: Diagnosis, f: _Facts) -> Recommendation | None:
    """CPU dropout masks drawn serially by torch."""
    if not d.device.startswith("cpu") or not d.top_ops or any("FastDropout" in s for s in d.strategies):
        return None
    masks = _host_share(d, lambda name: name == "aten::bernoulli_")
    if not masks >= 0.05:
        return None
    from .strategies.dropout import torch_draws_dropout_serially

    if not torch_draws_dropout_serially():
        return None
    return Recommendation(
        f"dropout's random masks (aten::bernoulli_) are {_pct(masks)} of the busiest operators' host "
        "time; this torch draws them on one core, two 32-bit draws per element: FastDropout() draws the same "
        "distribution with half the draws (FastDropout(exact=True): torch's own masks, bit for bit, with a "
        "smaller gain)",
        f.compute * masks,
        ["FastDropout"],
    )


def _optimizer(d: Diagnosis, f: _Facts) -> Recommendation | None:
    opt = f.share.get("optimizer", 0.0)
    if not opt >= 0.15 or any("FusedAdamW" in s for s in d.strategies):
        return None
    return Recommendation(
        f"the optimizer step (clip + step + zero_grad) takes {_pct(opt)} of step time: "
        "FusedAdamW() updates all parameters in one kernel (CUDA, and the CPU in recent torch)",
        opt,
        ["FusedAdamW"],
    )


def _small_micro_batches(d: Diagnosis, f: _Facts) -> Recommendation | None:
    if not (d.accumulation > 1 and d.batch_size < 32):
        return None
    return Recommendation(
        f"each step runs {d.accumulation} micro-batches of {d.batch_size}; forward+backward take {_pct(f.compute)} of step time "
        f"in {d.accumulation} small passes. A micro-batch of {d.batch_size * d.accumulation} with "
        "loss_normalization='tokens' computes the same step in one pass if memory allows",
        f.compute * (1 - 1 / d.accumulation),
        ["GradientAccumulation"],
    )


def _compilation(d: Diagnosis, f: _Facts) -> Recommendation | None:
    if not d.graph_breaks:
        return None
    top_reason = d.graph_break_reasons[0][0] if d.graph_break_reasons else "see torch._dynamo.explain"
    n = d.graph_breaks
    return Recommendation(
        f"torch.compile broke the graph {n} time{'s' if n != 1 else ''} (most often: {top_reason}), so the forward "
        f"({_pct(f.share.get('forward', 0))} of step time) runs as several graphs with eager code between them. "
        "Remove the reason (often a .item() or a Python branch on a tensor value)",
        f.share.get("forward", 0.0),
        ["Compile"],
    )


_Rule = Callable[[Diagnosis, _Facts], "Recommendation | None"]

#: The rules about the step as a whole, in the order their recommendations are listed at equal share.
_STEP_RULES: tuple[_Rule, ...] = (
    _data_loading,
    _padding_rule,
    _unpad_rule,
    _launch_bound,
    _cpu_bf16,
    _dropout_masks,
    _optimizer,
    _small_micro_batches,
    _compilation,
)


def _rules(d: Diagnosis, f: _Facts) -> list[_Rule]:
    """Every rule to apply: per module class, the read-back, per sync source, then the step rules."""
    top = d.top_classes[:5]
    return [
        *(functools.partial(_slow_class, c=c) for c in top),
        *(functools.partial(_builtin_class, c=c) for c in top),
        _loss_readback,
        *(functools.partial(_module_syncs, module=m) for m in f.syncs_by_module),
        *_STEP_RULES,
    ]


def _recommend(d: Diagnosis, kernels_per_step: float, unpad_capable: bool = False) -> list[Recommendation]:
    """Apply every rule; the recommendations found, largest share first (a rule may add a note to ``d``)."""
    f = _facts(d, kernels_per_step, unpad_capable)
    recs = [r for rule in _rules(d, f) if (r := rule(d, f)) is not None]
    recs.sort(key=lambda r: r.share, reverse=True)
    return recs


def _op_meaning(op: str) -> str:
    return _SYNC_OPS.get(op.removeprefix("aten::"), "reads a value back")


def _is_builtin(cls_name: str) -> bool:
    return hasattr(nn, cls_name) and isinstance(getattr(nn, cls_name), type)


# ---------------------------------------------------------------------------- report
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
    dev_line = "n/a on CPU (everything runs on the host)" if d.device_s is None else (
        f"{_ms(d.device_s)} ms busy per step ({_pct(d.device_s / d.step_s) if d.step_s > 0 else '?'} of the wall time)"
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
        out.append(f"  {k:<16}{_ms(v):>10}{_pct(v / d.timed_step_s) if d.timed_step_s > 0 else '?':>8}")
    out.append("")
    return out


def _render_modules(d: Diagnosis) -> list[str]:
    if not d.top_modules:
        return []
    out = ["Modules by self time (forward; a module's own code, the modules it calls excluded)"]
    width = max(40, min(70, max(len(m.label) for m in d.top_modules[:10]) + 2))
    out.append(f"  {'#':>2}  {'module':<{width}}{'self ms':>9}{'share':>7}{'calls':>7}{'total ms':>10}")
    for i, m in enumerate(d.top_modules[:10], 1):
        out.append(f"  {i:>2}  {m.label:<{width}}{_ms(m.self_s):>9}{_pct(m.share):>7}{m.calls:>7.0f}{_ms(m.total_s):>10}")
    out += ["", "The same by module class", f"  {'class':<32}{'modules':>8}{'self ms':>9}{'share':>7}"]
    for c in d.top_classes[:8]:
        out.append(f"  {c.cls:<32}{c.modules:>8}{_ms(c.self_s):>9}{_pct(c.share):>7}")
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
            f"Padding: {_pct(d.padding['pad_fraction'])} of batch positions are padding; "
            f"{_pct(d.padding['trimmable_fraction'])} are in columns that are padding in every row of their batch"
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
        out.append(f"  {i}. [{_pct(r.share)}] {r.text}")
    if d.notes:
        out += ["", "Notes"]
        out.extend(f"  - {n}" for n in d.notes)
    return out


# ---------------------------------------------------------------------------- CLI
def _reference(device: torch.device, vocab_size: int | None = None, model: nn.Module | None = None) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The bundled HLBD pairs, encoded, and (unless given) the reference model."""
    from .data import CharTokenizer, encode_pairs, load_hlbd
    from .models import Seq2SeqTransformer

    pairs = load_hlbd()
    vocab = 5000 if vocab_size is None else vocab_size
    try:
        tokenizer = CharTokenizer.from_pairs(pairs, vocab_size=vocab)
    except ValueError as e:
        raise DoctorError(f"the model's vocabulary ({vocab}) is too small for the bundled HLBD data: {e}; return (model, data) from the factory") from None
    max_length = getattr(model, "max_length", 64) if model is not None else 64
    data = encode_pairs(pairs, tokenizer, max_length=int(max_length) if isinstance(max_length, int) else 64)
    if model is None:
        torch.manual_seed(0)
        model = Seq2SeqTransformer(vocab_size=tokenizer.vocab_size)
    return model, data


def _load_factory(spec: str, device: torch.device) -> tuple[nn.Module, Any]:
    if ":" not in spec:
        raise DoctorError(f"--model {spec!r} must be 'module:factory', e.g. --model mypkg.models:make_model")
    mod_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: a module in the current folder is found
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise DoctorError(f"--model {spec}: cannot import {mod_name!r} ({e}); run from its folder or install it") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise DoctorError(f"--model {spec}: {mod_name} has no callable {attr!r}")
    made = factory()
    if isinstance(made, nn.Module):
        return _reference(device, infer_vocab_size(made), made)
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        return made[0], made[1]
    raise DoctorError(f"--model {spec}: the factory returned {type(made).__name__}; return a model or a (model, data) pair")



def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``hlbd-fast doctor`` to ``p``."""
    p.add_argument("--model", default=None, help="module:factory returning a model or (model, data); default: the reference model on the bundled HLBD data")
    p.add_argument("--steps", type=int, default=10, help="steps of the clean and timed passes (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch size (default 32, or the preset's)")
    p.add_argument("--preset", default=None, help="diagnose with a preset's strategies, e.g. baseline")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", default=None, help="also write the diagnosis as JSON to this file (checked before training)")


def _parser() -> argparse.ArgumentParser:
    """The parser of ``hlbd-fast doctor`` on its own (:func:`main`)."""
    p = argparse.ArgumentParser(prog="hlbd-fast doctor", description="Profile a few training steps and say where the time goes.")
    add_arguments(p)
    return p


def _check_options(args: argparse.Namespace) -> torch.device:
    """The device; every option that can be checked without training is checked here (DoctorError)."""
    from ._io import check_writable_file
    from .cli import resolve_device

    try:
        if args.json is not None:
            check_writable_file(args.json, "--json")  # before minutes of diagnosis, not after
        device = resolve_device(args.device)
    except ValueError as e:
        raise DoctorError(str(e)) from None
    if args.preset is not None:
        from .presets import PRESETS

        if args.preset not in PRESETS:
            raise DoctorError(f"--preset {args.preset!r} is unknown; choose one of {', '.join(sorted(PRESETS))}")
    return device


def _write_json(path: str, diag: Diagnosis) -> None:
    from ._io import atomic_write

    text = json.dumps(diag.to_dict(), indent=2, default=str)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def run(args: argparse.Namespace) -> int:
    """``hlbd-fast doctor``: diagnose the reference model or ``--model module:factory``; returns the exit status.

    The factory is called without arguments and returns a model (trained on the bundled
    HLBD pairs, encoded for its vocabulary) or a ``(model, data)`` pair, ``data`` as
    :meth:`FastTrainer.fit` takes it. An unwritable ``--json`` path is refused (status 2)
    before anything trains. ``args`` holds the options of :func:`add_arguments`.
    """
    try:
        device = _check_options(args)
        model, data = _load_factory(args.model, device) if args.model else _reference(device)
        diag = diagnose(model, data, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, device=device, preset=args.preset)
    except DoctorError as e:
        print(f"hlbd-fast doctor: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line for the user, not a traceback
        print(f"hlbd-fast doctor: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(diag)
    if args.json:
        _write_json(args.json, diag)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hlbd-fast doctor`` on its own (``argv`` without the command name); returns the exit status (see :func:`run`)."""
    return run(_parser().parse_args(argv))
