"""The doctor's view of the training loop: the probe strategy, forward hooks and the host-sync counter."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from ..strategies.base import StepRunner, Strategy
from ..trainer import FastTrainer

if TYPE_CHECKING:  # pragma: no cover
    from ..meter import Figures

_TORCH_DIR = os.path.dirname(torch.__file__)
#: every file of the doctor (this package): its frames are not where a sync comes from
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

# Operators that make the host wait for the device on a GPU: a value is read back, or
# the size of the result depends on the values. On CPU nothing waits, so these are
# what the sync pass counts there.
SYNC_OPS: dict[str, str] = {
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

#: torch's warning for each synchronising CUDA operation under ``set_sync_debug_mode("warn")``
#: (its one-time notice that the mode is a prototype is not a sync and must not count).
_SYNC_WARNING = "called a synchronizing CUDA operation"
_READ_OP = "aten::tolist (loss read-back)"  # how a read-back is named on CPU (EpochMeter.read's .tolist())
READ_LABEL = "(loss read-back)"
_PHASE_LABELS = {
    "forward": "(model)",  # inside the module the loop calls, but in none of the model's modules (a wrapper)
    "loss": "(loss or backward, outside the model)",
    "optimizer": "(optimizer step)",
    "data": "(data loading)",
    "step": "(training step)",
}


class Probe(Strategy):
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

    # before_clip times the step on the host, and does nothing when a step role replays the
    # step (``replaced_step``): what remains is safe to capture
    step_hook_work = "device"

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
        self.sample: tuple[torch.Tensor, torch.Tensor] | None = None  # the first batch of the warm-up, as loaded (pricing)

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
            if self.sample is None and all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in batch[:2]):
                self.sample = (batch[0], batch[1])
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
            self._add_sync(READ_LABEL, op, syncs, where if self.cuda else "FastTrainer reading the running loss")

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
    """The innermost frame outside torch and the doctor's package: ``file:line in function``."""
    f = sys._getframe(1)
    while f is not None:
        fn = os.path.abspath(f.f_code.co_filename)
        if not fn.startswith(_TORCH_DIR) and not fn.startswith(_PACKAGE_DIR) and "contextlib" not in fn:
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


def is_sync_warning(message: Any) -> bool:
    """Whether a warning is torch's report of one synchronising CUDA operation."""
    return _SYNC_WARNING in str(message)


@contextlib.contextmanager
def forward_hooks(trainer: FastTrainer, probe: Probe, modules: bool) -> Iterator[None]:
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


class SyncCounter:
    """Counts host-device syncs during the sync pass (a TorchDispatchMode plus, on CUDA, the device's own report)."""

    def __init__(self, probe: Probe) -> None:
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
            if not is_sync_warning(message):
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
    if name in SYNC_OPS:
        return not (name == "repeat_interleave" and len(args) > 0 and not isinstance(args[0], torch.Tensor))
    if name in _BOOL_INDEX_OPS and len(args) > 1 and isinstance(args[1], (list, tuple)):
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return False
