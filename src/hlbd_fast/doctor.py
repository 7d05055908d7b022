"""Where a training step's time goes, measured on *your* model.

:func:`diagnose` trains a copy of a model for a few steps with :class:`FastTrainer` and
measures, in separate passes so that one measurement does not distort the next:

1. **warm-up** (``warmup`` steps): one-off costs (allocator, compilation, CUDA graph
   capture) and the padding of the batches.
2. **clean pass** (``steps`` steps): the honest wall time of a step, nothing added.
3. **timed pass** (``steps`` steps): the split of a step into data, forward (loss
   included), backward, optimizer (clip + step + zero_grad), loss read-back and other;
   and every module's *self* time: the time inside its ``forward`` minus the time of
   the modules it called, so containers and the root do not hide the culprit.
   On CUDA this pass synchronises the device at every boundary (a diagnostic may:
   otherwise host timestamps say nothing about queued GPU work), so its shares are
   those of a serialised step; the step time reported comes from the clean pass.
4. **sync pass** (up to 5 steps): every host-device synchronisation (``.item()``,
   ``float()``/``bool()`` of a tensor, ``.tolist()``, ``.cpu()``, boolean-mask
   indexing, ``nonzero``...), attributed to the innermost module running, with the
   line of code that asked for it. On CUDA the device itself reports them
   (``torch.cuda.set_sync_debug_mode("warn")``); on CPU there is no device to wait
   for, so the operations that would wait on a GPU are counted instead.
5. **profiler pass** (up to 5 steps): ``torch.profiler``'s busiest operators, and on
   CUDA the device's busy time per step against the wall time (host-bound or not).

It then writes recommendations ordered by the share of the step they address, each
based on the numbers above. ``str(diagnosis)`` is the report; ``diagnosis.to_dict()``
is the same as JSON-ready data. From the shell: ``hlbd-fast doctor``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from torch import nn

from .strategies.base import Strategy
from .trainer import FastTrainer

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
class _Probe:
    """Per-pass measurement state shared by the trainer subclass, the hooks and the sync counter."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.mode = "off"  # warmup | clean | timed | sync | profile
        self.recording = False
        self.phase = "data"
        self.target = 0
        self.steps = 0
        self.acc: defaultdict[str, float] = defaultdict(float)
        self.last_end = 0.0
        self.step_start = 0.0
        self.in_body = False
        self.body: defaultdict[str, float] = defaultdict(float)
        self.rb_gap = 0.0
        self.rb_depth = 0
        self.clean_marks: list[float] = []
        self.owner_step = False
        # module stack: [module, start, child_time]
        self.stack: list[list[Any]] = []
        self.labels: dict[int, str] = {}
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
        self.pad_id = 0

    # ---- time
    def now(self) -> float:
        if self.cuda and self.mode == "timed":
            torch.cuda.synchronize(self.device)  # diagnostic sync: time the device's work, not the launch
        return time.perf_counter()

    def start_pass(self, mode: str, steps: int) -> None:
        self.mode = mode
        self.target = steps
        self.steps = 0
        self.recording = True
        self.phase = "data"
        self.stack.clear()
        self.in_body = False
        self.rb_gap = 0.0
        self.last_end = self.now()

    # ---- step boundaries (called by _DoctorTrainer)
    def step_begin(self) -> None:
        if not self.recording:
            return
        t = self.now()
        self.acc["data"] += t - self.last_end - self.rb_gap
        self.rb_gap = 0.0
        self.step_start = t
        self.in_body = True
        self.body.clear()
        self.phase = "step"

    def step_body_end(self) -> None:
        if not self.recording or not self.in_body:
            return
        t = self.now()
        rest = t - self.step_start - self.body["forward"] - self.body["optimizer"] - self.body["loss read-back"]
        self.acc["step (owner)" if self.owner_step else "backward"] += max(rest, 0.0)
        self.in_body = False
        self.phase = "step"

    def step_end(self, trainer: FastTrainer) -> None:
        if not self.recording:
            return
        self.steps += 1
        last = self.steps >= self.target
        if self.mode == "clean":
            if self.steps == 1 or last:  # the window's two ends; the device must have finished
                if self.cuda:
                    torch.cuda.synchronize(self.device)  # diagnostic sync: close the timing window
                self.clean_marks.append(time.perf_counter())
        t = self.now()
        self.acc["total"] += t - self.last_end
        self.last_end = t
        self.rb_gap = 0.0
        self.phase = "data"
        if last:
            self.recording = False
            trainer.request_stop()

    def add(self, phase: str, dt: float) -> None:
        if not self.recording:
            return
        self.acc[phase] += dt
        if self.in_body:
            self.body[phase] += dt
        elif phase == "loss read-back":
            self.rb_gap += dt

    # ---- module hooks
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

    def where_label(self) -> str:
        if self.stack:
            return self.labels.get(self.stack[-1][0], "(model)")
        return {
            "forward": "(loss, outside the model)",
            "backward": "(backward)",
            "optimizer": "(optimizer step)",
            "loss read-back": "(loss read-back)",
            "data": "(data loading)",
            "step": "(training step)",
        }.get(self.phase, f"({self.phase})")

    # ---- syncs
    def record_sync(self, op: str, n: int = 1, where: str | None = None) -> None:
        if not self.recording or self.mode != "sync":
            return
        key = (self.where_label(), op)
        self.syncs[key] += n
        self.sync_where[key][where or _caller_location()] += n


def _caller_location() -> str:
    """The innermost frame outside torch and this file: ``file:line in function``."""
    f = sys._getframe(1)
    while f is not None:
        fn = os.path.abspath(f.f_code.co_filename)
        if not fn.startswith(_TORCH_DIR) and fn != _THIS_FILE and "contextlib" not in fn:
            return f"{os.path.basename(fn)}:{f.f_lineno} in {f.f_code.co_name}"
        f = f.f_back  # type: ignore[assignment]
    return "?"


class _DoctorTrainer(FastTrainer):
    """FastTrainer with timing points at the step's boundaries; the loop is unchanged."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.probe = _Probe(torch.device("cpu"))  # inert until diagnose installs the real one
        super().__init__(*args, **kwargs)

    def default_train_step(self, micro_batches: list[Any]) -> None:
        self.probe.step_begin()
        super().default_train_step(micro_batches)
        self.probe.step_body_end()

    def forward_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.probe
        t0 = p.now()
        p.phase = "forward"
        try:
            return super().forward_loss(batch)
        finally:
            p.add("forward", p.now() - t0)
            p.phase = "backward"

    def clip_and_step(self) -> torch.Tensor | bool:
        p = self.probe
        t0 = p.now()
        p.phase = "optimizer"
        try:
            return super().clip_and_step()
        finally:
            p.add("optimizer", p.now() - t0)
            p.phase = "step"

    def _read_meter(self, epoch: int) -> dict[str, float]:
        p = self.probe
        if p.rb_depth:
            return super()._read_meter(epoch)
        p.rb_depth += 1
        previous, p.phase = p.phase, "loss read-back"
        t0 = p.now()
        try:
            if not p.cuda:  # on CUDA the device reports this sync itself
                p.record_sync("aten::tolist (loss read-back)", where="FastTrainer reading the running loss")
            return super()._read_meter(epoch)
        finally:
            p.add("loss read-back", p.now() - t0)
            p.phase = previous
            p.rb_depth -= 1

    def maybe_read_loss(self, event: str) -> None:
        super().maybe_read_loss(event)
        if event == "step":
            self.probe.step_end(self)

    def to_device(self, batch: Any) -> Any:
        p = self.probe
        if p.mode == "warmup" and isinstance(batch, (tuple, list)) and len(batch) >= 2:
            for t in batch[:2]:
                if isinstance(t, torch.Tensor) and t.dim() == 2 and t.numel():
                    _add_padding(p, t)  # warm-up only: may read values back, it is not timed
        return super().to_device(batch)


def _add_padding(p: _Probe, t: torch.Tensor) -> None:
    keep = t.ne(p.pad_id)
    used_cols = keep.any(0)
    n_cols = int(used_cols.nonzero().max()) + 1 if bool(used_cols.any()) else 0
    total = float(t.numel())
    p.pad["positions"] += total
    p.pad["pad"] += total - float(keep.sum())
    p.pad["trimmable"] += total - float(t.shape[0] * n_cols)


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

    @contextlib.contextmanager
    def active(self, dispatch: bool) -> Iterator[None]:
        p = self.probe
        with contextlib.ExitStack() as stack:
            if p.cuda:
                previous_mode = torch.cuda.get_sync_debug_mode()
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("always")
                original = warnings.showwarning

                def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
                    if "synchroniz" not in str(message):
                        original(message, category, filename, lineno, file, line)
                        return
                    p.warnings_seen += 1
                    if not p.in_op:  # not inside an aten op: e.g. torch.cuda.synchronize(), .tolist()
                        p.record_sync("sync outside an aten op", where=f"{os.path.basename(filename)}:{lineno}")

                warnings.showwarning = show
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
    if not isinstance(model, nn.Module):
        raise DoctorError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, value, low in (("steps", steps, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DoctorError(f"{name}={value!r} must be an integer >= {low}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise DoctorError(f"batch_size={batch_size!r} must be an integer >= 1")
    if "optimizer" in trainer_kwargs and copy_model:
        raise DoctorError(
            "optimizer= holds the parameters of the model you passed, but diagnose trains a copy; "
            "pass copy_model=False to train the given model with that optimizer"
        )
    trainer_kwargs.pop("progress", None)
    trainer_kwargs.setdefault("seed", 0)
    strategies = tuple(strategies)
    if preset is not None:
        from .presets import Preset, get_preset

        if not isinstance(preset, Preset):
            preset = get_preset(str(preset), device=device)
        strategies = tuple(preset.strategies) + strategies
        batch_size = preset.batch_size if batch_size is None else batch_size
        trainer_kwargs.setdefault("loss_normalization", preset.loss_normalization)
        trainer_kwargs.setdefault("lr", preset.lr)
    batch_size = 32 if batch_size is None else batch_size
    try:
        strategies = copy.deepcopy(strategies)
    except Exception:  # noqa: BLE001 - a strategy holding something uncopyable: use it as given
        log.info("doctor: strategies could not be copied; using the given instances")
    if copy_model:
        try:
            model = copy.deepcopy(model)
        except Exception as e:  # noqa: BLE001 - re-raised with the fix
            raise DoctorError(f"the model could not be deep-copied ({e}); pass copy_model=False to train it in place") from e

    dynamo_before = _graph_break_counter()
    trainer = _DoctorTrainer(model, strategies=strategies, progress=False, batch_size=batch_size, device=device, **trainer_kwargs)
    dev = trainer.device
    probe = _Probe(dev)
    probe.pad_id = trainer.pad_id
    trainer.probe = probe
    owner = trainer.owner("train_step")
    if owner is not None:
        probe.owner_step = True
        owned = owner.train_step

        def timed_train_step(tr: FastTrainer, micro_batches: list[Any]) -> None:
            probe.step_begin()
            owned(tr, micro_batches)
            probe.step_body_end()

        owner.train_step = timed_train_step  # type: ignore[method-assign]  # on the doctor's own copy
    compiled = _is_compiled(trainer)
    eager = not compiled and owner is None
    notes: list[str] = []
    if not eager:
        notes.append(
            "the model runs compiled or as a captured step, so modules cannot be timed one by one; "
            "diagnose without Compile/CUDAGraphStep to see them"
        )

    labels = {id(m): f"{n or '(root)'} ({type(m).__name__})" for n, m in model.named_modules()}
    names = {id(m): (n, type(m).__name__) for n, m in model.named_modules()}
    probe.labels = labels

    def run(mode: str, n: int) -> None:
        probe.start_pass(mode, n)
        while probe.recording:
            before = probe.steps
            trainer.train_epoch(data)
            if probe.steps == before:
                raise DoctorError("data yielded no optimizer step; check the data and batch_size")

    hooks: list[Any] = []

    @contextlib.contextmanager
    def module_hooks() -> Iterator[None]:
        if eager:
            for m in model.modules():
                hooks.append(m.register_forward_pre_hook(probe.pre_hook))
                hooks.append(m.register_forward_hook(probe.post_hook, always_call=True))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            hooks.clear()

    # a strategy that runs its first steps differently (CUDAGraphStep captures after a few
    # eager steps) gets those steps inside the warm-up
    warm = max([warmup, 1] + [int(getattr(s, "warmup_steps", 0)) + 1 for s in trainer.strategies if warmup])
    try:
        run("warmup", warm)  # with warmup=0 still one untimed step: the padding is looked at there
        probe.acc.clear()

        run("clean", steps + 1)  # the first step end opens the timing window
        marks = probe.clean_marks
        step_s = (marks[-1] - marks[0]) / steps if len(marks) >= 2 else float("nan")
        probe.acc.clear()

        with module_hooks():
            run("timed", steps)
        timed = dict(probe.acc)
        probe.acc.clear()

        detail_steps = min(steps, _MAX_DETAIL_STEPS)
        counter = _SyncCounter(probe)
        syncs_measurable = eager or dev.type == "cuda"
        if syncs_measurable:
            with module_hooks(), counter.active(dispatch=eager):
                run("sync", detail_steps)
            sync_steps = detail_steps
        else:
            sync_steps = 0
            notes.append("host syncs are counted on CPU only for an eager model; run without Compile to count them")

        prof_ops, device_s, kernels = _profile(trainer, run, probe, detail_steps)
    finally:
        for s in trainer.strategies:
            with contextlib.suppress(Exception):
                s.teardown(trainer)
        probe.mode = "off"

    # ---- assemble
    n = max(steps, 1)
    timed_total = timed.get("total", 0.0) / n
    phases = {k: timed.get(k, 0.0) / n for k in ("data", "forward", "backward", "optimizer", "loss read-back")}
    if probe.owner_step:
        phases["other"] = timed.get("step (owner)", 0.0) / n
        notes.append(f"{type(owner).__name__} runs the whole step; what it does besides forward_loss/clip_and_step is under 'other'")
    else:
        phases["other"] = 0.0
    phases["other"] += max(timed_total - sum(phases.values()), 0.0)

    top = []
    for mid, self_t in probe.mod_self.items():
        qual, cls = names.get(mid, ("?", "?"))
        child_calls = [(c, k) for (p_, k), c in probe.child_calls.items() if p_ == mid]
        most, most_label = max(child_calls, default=(0, None), key=lambda x: x[0]) if child_calls else (0, None)
        top.append(
            ModuleTime(
                name=qual,
                cls=cls,
                self_s=self_t / n,
                total_s=probe.mod_total[mid] / n,
                calls=probe.mod_calls[mid] / n,
                share=(self_t / n) / timed_total if timed_total > 0 else 0.0,
                max_child_calls=most / n,
                child=labels.get(most_label, "") if most_label is not None else "",
            )
        )
    top.sort(key=lambda m: m.self_s, reverse=True)
    classes: dict[str, ClassTime] = {}
    for m in top:
        c = classes.setdefault(m.cls, ClassTime(m.cls, 0, 0.0, 0.0, 0.0))
        c.modules += 1
        c.self_s += m.self_s
        c.total_s += m.total_s
        c.share += m.share
    top_classes = sorted(classes.values(), key=lambda c: c.self_s, reverse=True)

    if sync_steps:
        sources = [SyncSource(m, op, c / sync_steps) for (m, op), c in probe.syncs.items()]
        sources.sort(key=lambda s: s.per_step, reverse=True)
        syncs_per_step: float | None = sum(s.per_step for s in sources)
        locations = {f"{m} | {op}": ", ".join(w for w, _ in probe.sync_where[(m, op)].most_common(3)) for (m, op) in probe.syncs}
    else:
        sources, syncs_per_step, locations = [], None, {}
    if dev.type == "cpu":
        notes.append(
            "on CPU there is no device to wait for: 'syncs' are the operations that would make the host "
            "wait for a GPU; data loading and optimizer-step counters are not counted"
        )
        notes.append("device time: n/a on CPU (everything runs on the host)")
    else:
        notes.append("the timed pass synchronises the device at every boundary: its shares are of a serialised step")

    pad = probe.pad
    padding = (
        {"pad_fraction": pad["pad"] / pad["positions"], "trimmable_fraction": pad["trimmable"] / pad["positions"]}
        if pad["positions"]
        else {}
    )
    breaks, reasons = _graph_breaks(trainer, dynamo_before, compiled)

    diag = Diagnosis(
        model=type(model).__name__,
        device=str(dev),
        steps=steps,
        batch_size=batch_size,
        accumulation=trainer.accumulation,
        strategies=[repr(s) for s in trainer.strategies],
        step_s=step_s,
        timed_step_s=timed_total,
        phases=phases,
        device_s=device_s,
        top_modules=top,
        top_classes=top_classes,
        syncs_per_step=syncs_per_step,
        sync_sources=sources,
        sync_locations=locations,
        top_ops=prof_ops,
        padding=padding,
        graph_breaks=breaks,
        graph_break_reasons=reasons,
        recommendations=[],
        notes=notes,
    )
    diag.recommendations = _recommend(diag, kernels, trainer)
    return diag


def _profile(trainer: FastTrainer, run: Callable[[str, int], None], probe: _Probe, n: int) -> tuple[list[OpTime], float | None, float]:
    """Profiler pass: top operators by self time; device busy time and kernels per step on CUDA."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if probe.cuda:
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        run("profile", n)
    averages = prof.key_averages()
    ops: list[OpTime] = []
    device_us = 0.0
    kernels = 0.0
    for e in averages:
        if getattr(e, "is_user_annotation", False) or e.key.startswith("ProfilerStep"):
            continue
        if e.device_type == DeviceType.CPU:
            dev_self = float(getattr(e, "self_device_time_total", 0.0)) / 1e6 / n if probe.cuda else None
            ops.append(OpTime(e.key, float(e.self_cpu_time_total) / 1e6 / n, dev_self, e.count / n))
        elif probe.cuda:
            device_us += float(e.self_device_time_total)
            kernels += e.count
    ops.sort(key=lambda o: (o.device_s or 0.0) + o.host_s, reverse=True)
    return ops[:15], (device_us / 1e6 / n if probe.cuda else None), kernels / n


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


# ---------------------------------------------------------------------------- recommendations
def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _recommend(d: Diagnosis, kernels_per_step: float, trainer: FastTrainer) -> list[Recommendation]:
    recs: list[Recommendation] = []
    step = d.timed_step_s if d.timed_step_s > 0 else float("nan")
    share = {k: v / step for k, v in d.phases.items()}
    by_module: defaultdict[str, list[SyncSource]] = defaultdict(list)
    for s in d.sync_sources:
        by_module[s.module].append(s)

    # 1. module classes that dominate, loop, or read values back (all instances together)
    mentioned: set[str] = set()
    for c in d.top_classes[:5]:
        members = [m for m in d.top_modules if m.cls == c.cls]
        labels = {m.label for m in members}
        syncs = [s for s in d.sync_sources if s.module in labels]
        n_sync = sum(s.per_step for s in syncs)
        loopers = [m for m in members if m.calls > 0 and m.max_child_calls / m.calls >= 4]
        if not (c.share >= 0.2 and not _is_builtin(c.cls)) and not (n_sync >= 1 and c.share >= 0.05) and not (loopers and c.share >= 0.1):
            continue
        total = c.total_s / step if step > 0 else 0.0
        first = members[0].name or "the model itself" if members else "?"
        which = first if c.modules == 1 else f"{c.modules} modules, e.g. {first}"
        parts = [
            f"`{c.cls}.forward` ({which}): {_pct(c.share)} of step time in its own code"
            + (f" ({_pct(total)} with the modules it calls)" if total >= c.share + 0.05 else "")
        ]
        if n_sync:
            src = max(syncs, key=lambda s: s.per_step)
            where = d.sync_locations.get(f"{src.module} | {src.op}", "")
            parts.append(f"{n_sync:g} host syncs per step, mostly {src.op} ({_op_meaning(src.op)}) at {where}")
        if loopers:
            m = max(loopers, key=lambda m: m.max_child_calls / m.calls)
            parts.append(
                f"it runs {m.child} {m.max_child_calls / m.calls:.0f} times per call: a Python loop "
                "(over the batch or the heads?); batch it into one tensor operation"
            )
        advice = "move statistics and logging out of the training step (or compute them on the device and read them once)" if n_sync else (
            "vectorise it" if loopers else "look at what it computes per call"
        )
        recs.append(Recommendation("; ".join(parts) + f". {advice[0].upper()}{advice[1:]}.", c.share, []))
        mentioned.update(labels)

    # torch's own layers that take a large share: say so (the work itself, not a defect)
    for c in d.top_classes[:5]:
        if _is_builtin(c.cls) and c.share >= 0.15:
            recs.append(
                Recommendation(
                    f"torch's `nn.{c.cls}` ({c.modules} module{'s' if c.modules != 1 else ''}) takes {_pct(c.share)} of step "
                    "time in its own forward: that is its work itself; doing less of it (fewer padded positions) or in "
                    "fewer, larger kernels (bigger micro-batches, Compile) is what reduces it",
                    c.share,
                    [],
                )
            )

    # 2. syncs elsewhere
    readback = sum(s.per_step for s in d.sync_sources if s.module == "(loss read-back)")
    if readback >= 1:
        recs.append(
            Recommendation(
                f"the running loss is read back {readback:g} times per step ({_pct(share.get('loss read-back', 0))} of step "
                "time in the timed pass; on a GPU each read also makes the host wait for the device, so the next step's launches "
                "no longer overlap its work): use DeferredLossSync() to read it once per epoch",
                share.get("loss read-back", 0.0),
                ["DeferredLossSync"],
            )
        )
    for module, syncs in by_module.items():
        if module in mentioned or module == "(loss read-back)":
            continue
        n_sync = sum(s.per_step for s in syncs)
        if n_sync < 1:
            continue
        src = max(syncs, key=lambda s: s.per_step)
        where = d.sync_locations.get(f"{src.module} | {src.op}", "")
        mshare = next((m.share for m in d.top_modules if m.label == module), 0.0)
        recs.append(
            Recommendation(
                f"{module}: {n_sync:g} host syncs per step ({src.op} at {where}); each one makes the host wait for the device. "
                "Keep the value on the device or read it once per epoch",
                mshare,
                [],
            )
        )

    # 3. data
    if share.get("data", 0) >= 0.1:
        strat = ["GPUPreload"] if d.device.startswith("cuda") else ["DataLoaderWorkers"]
        recs.append(
            Recommendation(
                f"loading data takes {_pct(share['data'])} of step time: "
                + ("GPUPreload() keeps the whole dataset on the GPU" if strat == ["GPUPreload"] else "DataLoaderWorkers() prepares batches in worker processes"),
                share["data"],
                strat,
            )
        )

    # 4. padding
    trim = d.padding.get("trimmable_fraction", 0.0)
    if trim >= 0.25 and not any("TrimPadding" in s for s in d.strategies):
        fb = share.get("forward", 0) + share.get("backward", 0)
        recs.append(
            Recommendation(
                f"{_pct(d.padding['pad_fraction'])} of the batch positions are padding and {_pct(trim)} are columns that are "
                f"padding in every row of their batch; forward+backward take {_pct(fb)} of step time: TrimPadding() cuts those columns",
                fb * trim,
                ["TrimPadding"],
            )
        )

    # 5. launch-bound GPU / compute on CPU
    if d.device_s is not None and d.step_s > 0:
        busy = d.device_s / d.step_s
        if busy < 0.5:
            avg = d.device_s / kernels_per_step * 1e6 if kernels_per_step else float("nan")
            recs.append(
                Recommendation(
                    f"the GPU is busy only {_pct(busy)} of the step ({kernels_per_step:.0f} kernels per step, {avg:.0f} us each on average): "
                    "the host cannot launch work fast enough. CUDAGraphStep() replays the whole step as one graph; "
                    "a bigger micro-batch or Compile() also cut launches",
                    1 - busy,
                    ["CUDAGraphStep", "Compile"],
                )
            )
    if d.device.startswith("cpu") and d.top_ops:
        total = sum(o.host_s for o in d.top_ops) or float("nan")
        mm = sum(o.host_s for o in d.top_ops if o.name in _MATMUL_OPS)
        if mm / total >= 0.3 and not any("MixedPrecision" in s for s in d.strategies):
            fb = share.get("forward", 0) + share.get("backward", 0)
            if _cpu_has_bf16():
                recs.append(
                    Recommendation(
                        f"matrix multiplications are {_pct(mm / total)} of the busiest operators' host time and this CPU "
                        'computes bf16 natively (oneDNN says so): MixedPrecision("bf16") runs them in bfloat16',
                        fb * mm / total,
                        ["MixedPrecision"],
                    )
                )
            else:
                d.notes.append(
                    f"matrix multiplications are {_pct(mm / total)} of the busiest operators' host time, but this CPU has "
                    'no native bf16 (oneDNN reports none): MixedPrecision("bf16") would be emulated here; measure it '
                    "(hlbd-fast bench --rows baseline,mixed-precision) before using it"
                )

    if d.device.startswith("cpu") and d.top_ops and not any("FastDropout" in s for s in d.strategies):
        total = sum(o.host_s for o in d.top_ops) or float("nan")
        masks = sum(o.host_s for o in d.top_ops if o.name == "aten::bernoulli_")
        if masks / total >= 0.05:
            from .strategies.dropout import torch_draws_dropout_serially

            if torch_draws_dropout_serially():
                fb = share.get("forward", 0) + share.get("backward", 0)
                recs.append(
                    Recommendation(
                        f"dropout's random masks (aten::bernoulli_) are {_pct(masks / total)} of the busiest operators' host "
                        "time; this torch draws them on one core, two 32-bit draws per element: FastDropout() draws the same "
                        "distribution with half the draws (FastDropout(exact=True): torch's own masks, bit for bit, with a "
                        "smaller gain)",
                        fb * masks / total,
                        ["FastDropout"],
                    )
                )

    # 6. optimizer
    if share.get("optimizer", 0) >= 0.15 and not any("FusedAdamW" in s for s in d.strategies):
        recs.append(
            Recommendation(
                f"the optimizer step (clip + step + zero_grad) takes {_pct(share['optimizer'])} of step time: "
                "FusedAdamW() updates all parameters in one kernel (CUDA, and the CPU in recent torch)",
                share["optimizer"],
                ["FusedAdamW"],
            )
        )

    # 7. small micro-batches
    if d.accumulation > 1 and d.batch_size < 32:
        fb = share.get("forward", 0) + share.get("backward", 0)
        recs.append(
            Recommendation(
                f"each step runs {d.accumulation} micro-batches of {d.batch_size}; forward+backward take {_pct(fb)} of step time "
                f"in {d.accumulation} small passes. A micro-batch of {d.batch_size * d.accumulation} with "
                "loss_normalization='tokens' computes the same step in one pass if memory allows",
                fb * (1 - 1 / d.accumulation),
                ["GradientAccumulation"],
            )
        )

    # 8. compilation
    if d.graph_breaks:
        top_reason = d.graph_break_reasons[0][0] if d.graph_break_reasons else "see torch._dynamo.explain"
        n = d.graph_breaks
        recs.append(
            Recommendation(
                f"torch.compile broke the graph {n} time{'s' if n != 1 else ''} (most often: {top_reason}), so the forward "
                f"({_pct(share.get('forward', 0))} of step time) runs as several graphs with eager code between them. "
                "Remove the reason (often a .item() or a Python branch on a tensor value)",
                share.get("forward", 0.0),
                ["Compile"],
            )
        )
    recs.sort(key=lambda r: r.share, reverse=True)
    return recs


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _op_meaning(op: str) -> str:
    return _SYNC_OPS.get(op.removeprefix("aten::"), "reads a value back")


def _is_builtin(cls_name: str) -> bool:
    return hasattr(nn, cls_name) and isinstance(getattr(nn, cls_name), type)


# ---------------------------------------------------------------------------- report
def _ms(s: float | None) -> str:
    return "n/a" if s is None or (isinstance(s, float) and math.isnan(s)) else f"{s * 1e3:.2f}"


def _render(d: Diagnosis) -> str:
    out: list[str] = []
    strategies = ", ".join(d.strategies) or "none (the plain fp32 loop)"
    out.append(f"hlbd_fast doctor: {d.model} on {d.device}; {d.steps} steps of {d.accumulation} x {d.batch_size} samples")
    out.append(f"strategies: {strategies}")
    dev_line = "n/a on CPU (everything runs on the host)" if d.device_s is None else (
        f"{_ms(d.device_s)} ms busy per step ({_pct(d.device_s / d.step_s) if d.step_s > 0 else '?'} of the wall time)"
    )
    out.append(f"step time: {_ms(d.step_s)} ms (clean pass); device time: {dev_line}")
    out.append("")
    out.append(f"Where a step's time goes (timed pass: {_ms(d.timed_step_s)} ms per step)")
    out.append(f"  {'phase':<16}{'ms/step':>10}{'share':>8}")
    for k in _PHASES:
        v = d.phases.get(k, 0.0)
        out.append(f"  {k:<16}{_ms(v):>10}{_pct(v / d.timed_step_s) if d.timed_step_s > 0 else '?':>8}")
    out.append("")
    if d.top_modules:
        out.append("Modules by self time (forward; a module's own code, the modules it calls excluded)")
        width = max(40, min(70, max(len(m.label) for m in d.top_modules[:10]) + 2))
        out.append(f"  {'#':>2}  {'module':<{width}}{'self ms':>9}{'share':>7}{'calls':>7}{'total ms':>10}")
        for i, m in enumerate(d.top_modules[:10], 1):
            out.append(f"  {i:>2}  {m.label:<{width}}{_ms(m.self_s):>9}{_pct(m.share):>7}{m.calls:>7.0f}{_ms(m.total_s):>10}")
        out.append("")
        out.append("The same by module class")
        out.append(f"  {'class':<32}{'modules':>8}{'self ms':>9}{'share':>7}")
        for c in d.top_classes[:8]:
            out.append(f"  {c.cls:<32}{c.modules:>8}{_ms(c.self_s):>9}{_pct(c.share):>7}")
        out.append("")
    if d.syncs_per_step is None:
        out.append("Host syncs: not measurable here (see notes)")
    else:
        out.append(f"Host syncs: {d.syncs_per_step:g} per step" + ("" if d.sync_sources else " (none found)"))
        if d.sync_sources:
            width = max(30, min(60, max(len(s.module) for s in d.sync_sources[:10]) + 2))
            out.append(f"  {'where':<{width}}{'op':<40}{'per step':>9}  lines of code")
            for s in d.sync_sources[:10]:
                loc = d.sync_locations.get(f"{s.module} | {s.op}", "")
                out.append(f"  {s.module:<{width}}{s.op:<40}{s.per_step:>9g}  {loc}")
    out.append("")
    if d.top_ops:
        dev = d.device_s is not None
        out.append("Busiest operators (profiler, self time per step)")
        out.append(f"  {'op':<48}{'host ms':>9}" + (f"{'device ms':>11}" if dev else "") + f"{'calls':>7}")
        for o in d.top_ops[:8]:
            out.append(f"  {o.name[:47]:<48}{_ms(o.host_s):>9}" + (f"{_ms(o.device_s):>11}" if dev else "") + f"{o.calls:>7.0f}")
        out.append("")
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
    out.append("Recommendations (largest measured share of the step first)")
    if not d.recommendations:
        out.append("  none: no phase, module or sync stands out")
    for i, r in enumerate(d.recommendations, 1):
        out.append(f"  {i}. [{_pct(r.share)}] {r.text}")
    if d.notes:
        out.append("")
        out.append("Notes")
        out.extend(f"  - {n}" for n in d.notes)
    return "\n".join(out)


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


def _vocab_size(model: nn.Module) -> int | None:
    v = getattr(model, "vocab_size", None)
    if isinstance(v, int):
        return v
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(sizes) if sizes else None


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
        return _reference(device, _vocab_size(made), made)
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        return made[0], made[1]
    raise DoctorError(f"--model {spec}: the factory returned {type(made).__name__}; return a model or a (model, data) pair")


def main(argv: list[str] | None = None) -> int:
    """``hlbd-fast doctor``: diagnose the reference model or ``--model module:factory``; returns the exit status.

    The factory is called without arguments and returns a model (trained on the bundled
    HLBD pairs, encoded for its vocabulary) or a ``(model, data)`` pair, ``data`` as
    :meth:`FastTrainer.fit` takes it.
    """
    p = argparse.ArgumentParser(prog="hlbd-fast doctor", description="Profile a few training steps and say where the time goes.")
    p.add_argument("--model", default=None, help="module:factory returning a model or (model, data); default: the reference model on the bundled HLBD data")
    p.add_argument("--steps", type=int, default=10, help="steps of the clean and timed passes (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch size (default 32, or the preset's)")
    p.add_argument("--preset", default=None, help="diagnose with a preset's strategies, e.g. baseline")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", default=None, help="also write the diagnosis as JSON to this file")
    args = p.parse_args(argv)
    try:
        from .cli import resolve_device

        try:
            device = resolve_device(args.device)
        except ValueError as e:
            raise DoctorError(str(e)) from None
        if args.preset is not None:
            from .presets import PRESETS

            if args.preset not in PRESETS:
                raise DoctorError(f"--preset {args.preset!r} is unknown; choose one of {', '.join(sorted(PRESETS))}")
        if args.model:
            model, data = _load_factory(args.model, device)
        else:
            model, data = _reference(device)
        diag = diagnose(model, data, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, device=device, preset=args.preset)
    except DoctorError as e:
        print(f"hlbd-fast doctor: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line for the user, not a traceback
        print(f"hlbd-fast doctor: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(diag)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(diag.to_dict(), f, indent=2, default=str)
    return 0
