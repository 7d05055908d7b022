"""CUDAGraphStep: capture the whole optimizer step as one CUDA graph and replay it.

At HLBD's size (a 3+3-layer transformer, micro-batches of a few hundred tokens) a step
is hundreds of tiny kernels, and launching them costs more than running them. A CUDA
graph launches them all at once. The step captured is :meth:`FastTrainer.train_step`
itself — every micro-batch's forward and backward, the on-device loss bookkeeping in
``trainer.meter``, clipping and the optimizer step — run on static input buffers that
each step's batches are copied into on the device.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from .._validation import check_positive_int, is_token_pair
from .base import StepRunner, StrategyConflictError
from .needs import Capability, Context, Declaration, Need

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import FastTrainer

__all__ = ["CUDAGraphStep", "GraphBackend", "GraphReport", "SyncFinding", "first_sync", "uncapturable"]

log = logging.getLogger("hlbd_fast")

_SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's sync-debug warning, one per sync
_DEBUG_MODE_NOTICE = "Synchronization debug mode is a prototype feature"  # torch's one-time notice

StepKey = tuple[Any, ...]


# ---------------------------------------------------------------------------- helpers
def _step_key(micro_batches: list[Any]) -> StepKey:
    """What a step's graph depends on: micro-batch count, rows of each, padded lengths, dtypes."""
    for b in micro_batches:
        if not (is_token_pair(b) and len(b) == 2):
            raise TypeError(
                "CUDAGraphStep feeds (src, tgt) pairs of 2-D token tensors through static buffers; got a batch of type "
                f"{type(b).__name__}" + (f" with {len(b)} items" if isinstance(b, (tuple, list)) else "")
            )
    s_len = max(b[0].shape[1] for b in micro_batches)
    t_len = max(b[1].shape[1] for b in micro_batches)
    rows = tuple(b[0].shape[0] for b in micro_batches)
    return (len(micro_batches), rows, s_len, t_len, micro_batches[0][0].dtype, micro_batches[0][1].dtype)


def _fill(buffer: torch.Tensor, x: torch.Tensor, pad_id: int) -> None:
    """Copy ``x`` into the left columns of ``buffer`` on the device; pad the rest."""
    width = x.shape[1]
    if width == buffer.shape[1]:
        buffer.copy_(x)
    else:
        buffer[:, :width].copy_(x)
        buffer[:, width:].fill_(pad_id)


def _make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Switch every param group that has a ``capturable`` option on, moving step counters to the device.

    ``capturable=True`` keeps Adam's step counter and bias corrections on the device, so its
    step has no host work a graph could not replay (``step()`` refuses capture otherwise).
    """
    for group in optimizer.param_groups:
        if "capturable" not in group or group["capturable"]:
            continue
        group["capturable"] = True
        for p in group["params"]:
            state = optimizer.state.get(p)
            step = state.get("step") if state else None
            if isinstance(step, torch.Tensor) and step.device != p.device:
                state["step"] = step.to(p.device)  # once per state, when switching
    off = [i for i, g in enumerate(optimizer.param_groups) if g.get("capturable") is False]
    if off:
        raise RuntimeError(f"could not switch param groups {off} of {type(optimizer).__name__} to capturable=True")


def uncapturable(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer``'s step cannot be captured in a CUDA graph, or ``None`` when it can.

    A param group without a ``capturable`` option (``SGD``, bitsandbytes' 8-bit AdamW, most
    user optimizers) steps with values read on the host — the learning rate, a step counter,
    a bias correction — which a replayed graph would keep at their values at capture.
    Groups that have the option are switched to ``capturable=True`` by :class:`CUDAGraphStep`.
    """
    missing = [i for i, g in enumerate(optimizer.param_groups) if "capturable" not in g]
    if not missing:
        return None
    which = "its param groups" if len(missing) == len(optimizer.param_groups) else f"its param groups {missing}"
    return (
        f"CUDAGraphStep cannot capture the step of {type(optimizer).__name__}: {which} have no 'capturable' option, so "
        "its step reads values on the host (the learning rate, step counters) that every replay of a captured graph "
        "would keep at their values at capture. Use FusedAdamW(), torch.optim.Adam or AdamW (CUDAGraphStep switches "
        "them to capturable=True), an optimizer whose param groups hold 'capturable': True, or train without CUDAGraphStep"
    )


def _reads_at_replay(lr: Any, device: torch.device) -> bool:
    """Whether a replay reads ``lr`` afresh: a float32 tensor on ``device`` (anything else is read once, at capture)."""
    return isinstance(lr, torch.Tensor) and lr.device == device and lr.dtype == torch.float32


def _lr_as_tensor(optimizer: torch.optim.Optimizer, device: torch.device, numbers: bool) -> list[tuple[dict[str, Any], Any]]:
    """Make the groups' tensor learning rates (and, with ``numbers``, Python ones) 0-d float32 tensors on ``device``.

    A replayed graph reads a float32 tensor lr on the device, so a schedule that fills it in
    place (torch's LRScheduler does, for tensor lrs) changes it without a new capture. Any
    other tensor lr (a resumed checkpoint's lr is a CPU tensor: ``read_checkpoint`` maps to
    the CPU) is read on the host at capture and frozen into the graph, so it is replaced (a
    new tensor: the graphs are captured again). A Python number is frozen too, but a change
    to it is seen (the graphs are captured again): it is replaced only with ``numbers``.
    Returns ``(group, lr before)`` for each group changed.
    """
    changed = []
    for group in optimizer.param_groups:
        lr = group["lr"]
        if _reads_at_replay(lr, device) or not (numbers or isinstance(lr, torch.Tensor)):
            continue
        if isinstance(lr, torch.Tensor):
            group["lr"] = lr.detach().to(device=device, dtype=torch.float32).reshape(())  # once, at a (re)capture
        else:
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
        changed.append((group, lr))
    return changed


def _revert(optimizer: torch.optim.Optimizer, capturable: list[dict[str, Any]], lrs: list[tuple[dict[str, Any], Any]]) -> None:
    """Undo what the graph path changed in ``optimizer`` for the eager step: ``capturable`` and the tensor lrs.

    A group switched to ``capturable=True`` is switched back, and its step counters return
    to the host unless the group is fused (torch keeps a non-capturable, non-fused Adam's
    counters there; on the device its step would read each one back). A learning rate made
    a device tensor is a Python number again (or the tensor it was, holding the current value).
    """
    groups = {id(g) for g in optimizer.param_groups}
    for group in capturable:
        if id(group) not in groups or group.get("capturable") is not True:
            continue
        group["capturable"] = False
        if group.get("fused"):
            continue
        for p in group["params"]:
            state = optimizer.state.get(p)
            step = state.get("step") if state else None
            if isinstance(step, torch.Tensor) and step.device.type != "cpu":
                state["step"] = step.cpu()  # once, at the fallback
    for group, before in lrs:
        if id(group) not in groups or not isinstance(group["lr"], torch.Tensor):
            continue
        now = float(group["lr"])  # once, at the fallback
        if isinstance(before, torch.Tensor):
            with torch.no_grad():
                before.fill_(now)
            group["lr"] = before
        else:
            group["lr"] = now


def _signature(trainer: "FastTrainer") -> tuple[Any, ...]:
    """What a captured graph baked in from the optimizer and meter: objects, state and hyper-parameters.

    Python numbers (lr, betas, ...) are frozen into a graph; a change needs a new capture.
    Tensor hyper-parameters are read on the device at replay, so only their identity counts.
    """
    opt = trainer.optimizer
    groups = tuple(
        tuple((k, ("tensor", id(v)) if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k != "params") + ((id(g["params"]), len(g["params"])),)
        for g in opt.param_groups
    )
    return (id(opt), id(opt.state), id(opt.param_groups), groups, trainer.meter.values.data_ptr(), trainer.meter.step_index.data_ptr())


@contextlib.contextmanager
def _no_autocast_cache() -> Iterator[None]:
    """Autocast regions opened inside inherit ``cache_enabled=False`` (required inside a capture)."""
    previous = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(previous)


@dataclass
class SyncFinding:
    """What :meth:`GraphBackend.detect_syncs` saw."""

    message: str | None = None  # the first host-sync warning seen, if any


def first_sync(caught: list[warnings.WarningMessage]) -> str | None:
    """The first of torch's per-sync warnings among ``caught`` ("... at file:line"), or ``None``.

    Torch's one-time notice when sync-debug mode is first set in a process ("Synchronization
    debug mode is a prototype feature ...") is not a sync and never counts.
    """
    first = next((w for w in caught if _SYNC_WARNING in str(w.message)), None)
    return None if first is None else f"{first.message} at {first.filename}:{first.lineno}"


def others(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    """The warnings of ``caught`` that are neither syncs nor torch's sync-debug notice (handed on)."""
    return [w for w in caught if _SYNC_WARNING not in str(w.message) and _DEBUG_MODE_NOTICE not in str(w.message)]


# ---------------------------------------------------------------------------- the CUDA seam
class GraphBackend:
    """What :class:`CUDAGraphStep` asks of CUDA: a side stream, sync detection, capture.

    This class is the real thing. ``CUDAGraphStep(backend=...)`` takes a subclass, which
    is how the tests drive the whole graph path (warm-up, capture per shape, replay,
    fallbacks) on a CPU with a stand-in for the graph.
    """

    def __init__(self) -> None:
        self._streams: dict[Any, Any] = {}  # one side stream per device
        self._pools: dict[Any, Any] = {}  # one graph memory pool per device

    def unavailable(self, device: torch.device) -> str | None:
        """Why graphs cannot run on ``device``, or ``None`` when they can."""
        if device.type != "cuda":
            return f"the trainer's device is {device.type}; CUDA graphs need a CUDA device"
        return None

    def _stream(self, device: torch.device) -> Any:
        if device not in self._streams:
            with torch.cuda.device(device):  # a stream belongs to the device current when it is made
                self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    @contextlib.contextmanager
    def side_stream(self, device: torch.device) -> Iterator[None]:
        """Run on a side stream of ``device``, ordered after and before the current stream's work (no host sync)."""
        stream = self._stream(device)
        with torch.cuda.device(device):
            current = torch.cuda.current_stream(device)
            stream.wait_stream(current)  # the side stream sees the static buffers just filled
            with torch.cuda.stream(stream):
                yield
            current.wait_stream(stream)  # later work on the current stream sees the step's results

    @contextlib.contextmanager
    def detect_syncs(self) -> Iterator[SyncFinding]:
        """Record whether the body makes a host-device sync torch can see (``.item()``, ``.cpu()``, ...).

        Torch's sync debug mode in "warn" mode: the body completes normally. Only torch's
        per-sync warning counts; the one-time notice torch prints when the mode is first
        set in a process ("... a prototype feature ...") is not a sync.
        """
        finding = SyncFinding()
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield finding
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        finding.message = first_sync(caught)
        for w in others(caught):  # hand the body's other warnings on
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def _pool(self, device: torch.device) -> Any:
        # One memory pool for every step graph of a device. Safe here because no tensor
        # allocated inside a capture outlives its replay: inputs, weights, optimizer state and
        # the meter live outside the pool, and the step ends by setting the gradients to None.
        # Graphs never run concurrently (one stream, replayed one after another).
        if device not in self._pools:
            self._pools[device] = torch.cuda.graph_pool_handle()
        return self._pools[device]

    def capture(self, device: torch.device, step: Callable[[], None]) -> Any:
        """Capture ``step`` into a new CUDA graph on the side stream (warm-up used the same stream)."""
        stream = self._stream(device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(device), torch.cuda.stream(stream):
                # torch.cuda.graph synchronizes the device once before capturing (a one-off per shape)
                with torch.cuda.graph(graph, stream=stream, pool=self._pool(device)):
                    step()
        except BaseException:
            with contextlib.suppress(Exception):
                graph.reset()  # recent torch also ends the generator's and the allocator's capture state here
            raise
        return graph

    def usable_after_failure(self, device: torch.device) -> str | None:
        """Whether eager CUDA work still runs after a failed capture; the reason when it does not.

        Older torch leaves the CUDA generator in capture state when ``capture_end`` fails (the
        next eager dropout raises "Offset increment outside graph capture"), or a sticky CUDA
        error. The probe draws once (then puts the generator back: the training stream is
        unchanged), allocates, and synchronizes.
        """
        try:
            with torch.cuda.device(device):
                state = torch.cuda.get_rng_state(device)
                torch.empty(16, device=device).bernoulli_(0.5)
                torch.cuda.set_rng_state(state, device)
                torch.cuda.synchronize(device)
        except Exception as e:  # noqa: BLE001 - any failure: the process cannot run eagerly
            return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        return None

    def make_capturable(self, optimizer: torch.optim.Optimizer) -> None:
        """Switch the optimizer to ``capturable=True`` (its step counters move to the device)."""
        _make_capturable(optimizer)


@dataclass
class _StepGraph:
    """One step shape: its static input buffers, eager steps run so far, and its graph once captured."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]  # static (src, tgt) buffers, one pair per micro-batch
    eager_steps: int = 0  # warm-up steps run (real training steps)
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    capture_seconds: float = field(default=0.0)

    @classmethod
    def allocate(cls, key: StepKey, device: torch.device) -> "_StepGraph":
        _, rows, s_len, t_len, s_dtype, t_dtype = key
        return cls([(torch.empty((r, s_len), dtype=s_dtype, device=device), torch.empty((r, t_len), dtype=t_dtype, device=device)) for r in rows])

    def load(self, micro_batches: list[Any], pad_id: int) -> None:
        for (bs, bt), b in zip(self.batches, micro_batches):
            _fill(bs, b[0], pad_id)
            _fill(bt, b[1], pad_id)


# ---------------------------------------------------------------------------- the strategy
@dataclass(frozen=True)
class GraphReport:
    """What :class:`CUDAGraphStep` did so far."""

    graphing: bool  # steps go through CUDA graphs (False on CPU and after a fallback)
    graphs: int  # step graphs captured and kept now
    capture_seconds: float  # wall seconds spent capturing, all graphs so far
    fallback: str | None  # why steps run eagerly, once that happened


class CUDAGraphStep(StepRunner):
    """Run each optimizer step as one replayed CUDA graph: forward, backward, clipping, optimizer step.

    Fills the ``step`` role. Needs :class:`DevicePreload` (batches already on the device).
    Each step's micro-batches are copied on the device into static buffers
    (``static.copy_(batch)``) and the graph of :meth:`FastTrainer.train_step` over those
    buffers is replayed; the figures in ``trainer.meter`` are updated inside the graph, on
    the device.

    **Shapes.** A graph is captured per step shape: the number of micro-batches, the rows of
    each, and the longest ``src``/``tgt`` among them (shorter micro-batches of one step —
    :class:`TrimPadding` buckets with accumulation — are padded up to it with ``pad_id`` in
    the static buffers). With :class:`TrimPadding` buckets that is one graph per bucket
    pair. A shape is run eagerly ``warmup_steps`` times, then captured the next time it
    comes: the partial last step of an epoch is captured like any other shape, epochs later.
    The graphs of a device share one memory pool (safe: no tensor allocated in one step
    outlives it, see ``GraphBackend``).

    **Warm-up steps are real training steps** on the real batches, run eagerly on a side
    stream before capture (as CUDA graph capture requires), so nothing is trained twice or
    skipped. The optimizer is switched to ``capturable=True`` at the first step (Adam/AdamW
    and :class:`FusedAdamW` accept it; their step then keeps its counter and bias corrections
    on the device). Replays compute what the same eager step computes with that optimizer.
    An optimizer whose param groups have no ``capturable`` option (``SGD``, bitsandbytes'
    8-bit AdamW, most user optimizers) reads values on the host in its step, which a replay
    would freeze: it is refused (:class:`StrategyConflictError`, see :func:`uncapturable`),
    when the trainer is built for an ``optimizer=`` given to it, else at the first step.

    **Fallback.** On a non-CUDA device, or when the step cannot be captured — a host sync in
    the step (``.item()``, ``.cpu()``, printing a tensor, a Python ``if`` on a tensor: seen
    during warm-up with torch's sync debug mode) or a failed capture — every step runs
    :meth:`FastTrainer.train_step` instead, with one warning naming the reason (also in
    :meth:`report` and :attr:`fallback_reason`). A failed
    capture runs no kernel; the gradients it assigned are dropped and the step is then run
    eagerly, so training is the eager loop's. What the graph path changed in the optimizer
    is undone for the eager step: groups it switched to ``capturable=True`` are switched
    back, and a learning rate it made a device tensor is a Python number again.

    **Frozen at capture.** Python values the step reads are baked in: the optimizer's
    hyper-parameters (a changed ``lr`` or a new optimizer state, e.g. after ``load``, is
    detected and the graphs are captured again, with one warning), strategies' Python-side
    work in their hooks (a strategy whose step hooks do host work is refused, see below),
    and Python branches in the model. A 0-d float32 tensor lr on the device is read at
    replay: with a ``scheduler=`` every group's lr becomes one, so ``scheduler.step()``
    changes what the replays read without a new capture. A tensor lr found elsewhere or in
    another dtype (a resumed checkpoint's lr is a CPU tensor) is moved onto the device as
    float32 before the graphs are captured again.
    :meth:`report` gives the graphs kept, the seconds spent capturing and any fallback.

    Refused when the trainer is built (see :meth:`declare`): strategies that bring varying
    shapes (:class:`Unpad`), read the RNG state in the forward
    (:class:`GradientCheckpointing`), let the host decide whether to step (fp16 loss
    scaling: use ``MixedPrecision("bf16")``), read the loss after every micro-batch
    (:class:`EagerLossSync`: use :class:`DeferredLossSync`), do host work in
    ``before_clip``/``after_optimizer_step`` (``step_hook_work = "host"``), run collectives in
    the step (:class:`DistributedTraining` across processes) or capture CUDA graphs of their
    own (``Compile("reduce-overhead")``). bf16 autocast is captured with its weight cache off
    (``cache_enabled=False``).

    Args:
        warmup_steps: eager steps of each shape before it is captured (>= 1).
        backend: how CUDA is driven (:class:`GraphBackend`); a stand-in lets the graph path
            run on a CPU (the tests use one).
    """

    def __init__(self, warmup_steps: int = 3, *, backend: GraphBackend | None = None) -> None:
        check_positive_int("warmup_steps", warmup_steps, "CUDAGraphStep", hint=" (capture needs eager steps first: lazy initialisation, optimizer state)")
        if backend is not None and not isinstance(backend, GraphBackend):
            raise TypeError(f"CUDAGraphStep(backend={backend!r}): backend must be a GraphBackend (or None for CUDA)")
        self.warmup_steps = warmup_steps
        self.fallback_reason: str | None = None  # why steps run eagerly, once that happened
        self._backend = backend if backend is not None else GraphBackend()
        self._step: Callable[["FastTrainer", list[Any]], None] = self._eager
        self._graphs: dict[StepKey, _StepGraph] = {}
        self._signature: tuple[Any, ...] | None = None
        self._tensors: tuple[int, ...] | None = None
        self._warned_recapture = False
        self._capture_seconds = 0.0  # wall seconds spent capturing, all graphs
        self._switched: list[dict[str, Any]] = []  # param groups this step switched to capturable=True
        self._lrs: list[tuple[dict[str, Any], Any]] = []  # (param group, its lr before) for each lr made a device tensor

    # ------------------------------------------------------------------ set-up
    def declare(self, context: Context) -> Declaration:
        """Batches on the device; nothing in the step that a replay cannot repeat."""
        replay = "a captured step replays its device work and runs none of its Python"
        return Declaration(
            provides=(Need(Capability.STEP_CAPTURE, "CUDAGraphStep captures the whole step once per shape"),),
            requires=(Need(Capability.DEVICE_BATCHES, "the graph copies each batch into its static buffers on the device"),),
            forbids=(
                Need(Capability.VARYING_SHAPES, "a new shape every micro-batch would mean a new capture every step"),
                Need(Capability.RNG_STATE_IN_FORWARD, "capture refuses reading the CUDA generator's state"),
                Need(
                    Capability.HOST_STEP_DECISION,
                    "a replayed graph cannot let the host decide whether to step (fp16's GradScaler); use MixedPrecision('bf16'), which needs no scaler",
                ),
                Need(Capability.MICRO_BATCH_READS, f"{replay}, so it cannot stop to read the loss; use DeferredLossSync()"),
                Need(Capability.HOST_STEP_HOOKS, f"{replay}: host work in a step hook would run once, at capture"),
                Need(
                    Capability.COLLECTIVES_IN_STEP,
                    "DDP's bucket rebuild makes a blocking copy in the step after capture warm-up; train one process per "
                    "graph, or drop CUDAGraphStep under DistributedTraining",
                ),
                Need(Capability.OWN_CUDA_GRAPHS, "CUDA graphs cannot be nested inside the step's graph"),
            ),
            warmup_steps=self.warmup_steps + 2,  # eager runs of a shape, its capture, then a replay
        )

    def report(self) -> "GraphReport":
        """Graphs kept now, the seconds spent capturing, and why steps run eagerly (if they do)."""
        return GraphReport(self.graphing, self.graphs, self._capture_seconds, self.fallback_reason)

    def close(self) -> None:
        """Free the captured graphs and their static buffers (a later step captures again)."""
        self._graphs.clear()

    def setup(self, trainer: "FastTrainer") -> None:
        self._graphs.clear()
        self._switched, self._lrs = [], []
        self.fallback_reason = None
        reason = self._backend.unavailable(trainer.device)
        if reason is not None:
            self._fall_back(trainer, reason)
            return
        self._step = self._graphed
        # An optimizer given to the trainer exists already (the optimizer role holds it): refuse it now. One that a
        # strategy builds exists only after every setup; it is checked before the first step.
        given = getattr(trainer.roles.optimizer, "optimizer", None)
        if isinstance(given, torch.optim.Optimizer):
            self.check_optimizer(given)

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse an optimizer whose step cannot be captured (see :func:`uncapturable`); eager steps take any.

        Raises:
            StrategyConflictError: steps go through graphs and a param group has no ``capturable`` option.
        """
        why = uncapturable(optimizer) if self.graphing else None
        if why is not None:
            raise StrategyConflictError(why)

    @property
    def backend(self) -> GraphBackend:
        """How this step drives CUDA (a stand-in when one was given)."""
        return self._backend

    @property
    def graphing(self) -> bool:
        """Whether steps go through CUDA graphs (False on CPU and after a fallback)."""
        return self._step == self._graphed

    @property
    def graphs(self) -> int:
        """Step graphs captured and kept now."""
        return sum(g.graph is not None for g in self._graphs.values())

    def shapes(self) -> list[StepKey]:
        """The step shapes seen so far: ``(micro-batches, rows of each, src length, tgt length, dtypes)``."""
        return list(self._graphs)

    # ------------------------------------------------------------------ the step
    def run_step(self, trainer: "FastTrainer", micro_batches: list[Any]) -> None:
        self._step(trainer, micro_batches)

    def _eager(self, trainer: "FastTrainer", micro_batches: list[Any]) -> None:
        trainer.train_step(micro_batches)

    def _graphed(self, trainer: "FastTrainer", micro_batches: list[Any]) -> None:
        self._check_unchanged(trainer)
        key = _step_key(micro_batches)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = _StepGraph.allocate(key, trainer.device)
        entry.load(micro_batches, trainer.pad_id)  # on-device copies into the static buffers
        if entry.graph is not None:
            entry.graph.replay()
        elif entry.eager_steps < self.warmup_steps:
            self._warm_up(trainer, entry)
        else:
            self._capture(trainer, entry, micro_batches)

    def _warm_up(self, trainer: "FastTrainer", entry: _StepGraph) -> None:
        """One real eager step on the static buffers, on the side stream, watching for host syncs."""
        with self._backend.side_stream(trainer.device), _no_autocast_cache(), self._backend.detect_syncs() as found:
            trainer.train_step(entry.batches)
        entry.eager_steps += 1
        if found.message is not None:
            self._fall_back(
                trainer,
                f"the step makes a host-device sync ({found.message}), for example .item(), .cpu(), printing a tensor or "
                "a Python `if` on a tensor in the model's forward; a CUDA graph cannot contain one",
            )

    def _capture(self, trainer: "FastTrainer", entry: _StepGraph, micro_batches: list[Any]) -> None:
        # gradients start as None so the graph allocates them in the graphs' shared pool (and clears them itself)
        trainer.optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        try:
            with _no_autocast_cache():
                graph = self._backend.capture(trainer.device, lambda: trainer.train_step(entry.batches))
        except Exception as e:  # noqa: BLE001 - any failure means: run eagerly, loudly
            first_line = (str(e).strip().splitlines() or [""])[0]
            broken = self._backend.usable_after_failure(trainer.device)
            if broken is not None:
                raise RuntimeError(
                    f"CUDAGraphStep: capturing the step failed ({type(e).__name__}: {first_line}) and left this process "
                    f"unable to run CUDA work eagerly ({broken}); this torch version does not clean up a failed capture. "
                    "Restart, and train without CUDAGraphStep or remove the cause (the first error above)"
                ) from e
            trainer.optimizer.zero_grad(set_to_none=True)  # drop the gradients the capture assigned
            self._fall_back(trainer, f"capturing the step failed ({type(e).__name__}: {first_line})")
            trainer.train_step(micro_batches)  # this step, eagerly
            return
        seconds = time.perf_counter() - t0
        entry.graph, entry.capture_seconds = graph, seconds
        self._capture_seconds += seconds
        log.info("CUDAGraphStep: captured a step of shape %s in %.2f s", _describe(entry), seconds)
        graph.replay()  # the capture itself ran nothing: this is the step

    # ------------------------------------------------------------------ invalidation
    def _check_unchanged(self, trainer: "FastTrainer") -> None:
        """Host-only check each step: is the optimizer (object, state, hyper-parameters) still the captured one?"""
        signature = _signature(trainer)
        if signature == self._signature:
            return
        if self._signature is not None:
            self._drop_graphs("the optimizer changed (its hyper-parameters such as lr, its state, or the object)")
        optimizer = trainer.optimizer
        self.check_optimizer(optimizer)
        off = [g for g in optimizer.param_groups if g.get("capturable") is False]
        self._backend.make_capturable(optimizer)
        self._switched += [g for g in off if g.get("capturable") is True]
        # with a schedule every lr becomes a device tensor that it fills in place: no capture per step
        self._lrs += _lr_as_tensor(optimizer, trainer.device, numbers=trainer.scheduler is not None)
        self._signature = _signature(trainer)

    def on_epoch_start(self, trainer: "FastTrainer", epoch: int) -> None:
        """Once per epoch: have the parameters or buffers been moved to new memory since capture?"""
        if not self.graphing:
            return
        tensors = tuple(t.data_ptr() for t in (*trainer.params, *trainer.model.buffers()))
        if self._tensors is not None and tensors != self._tensors:
            self._drop_graphs("the model's parameters or buffers moved to new memory")
        self._tensors = tensors

    def _drop_graphs(self, why: str) -> None:
        captured = self.graphs > 0
        self._graphs.clear()
        if captured and not self._warned_recapture:
            self._warned_recapture = True
            warnings.warn(
                f"CUDAGraphStep: {why} after capture; the step graphs are captured again ({self.warmup_steps} eager "
                "steps per shape first). Changing it every step makes every step eager: pass the learning rate as a "
                "0-d CUDA tensor to change it without a new capture",
                stacklevel=4,
            )

    def _fall_back(self, trainer: "FastTrainer", reason: str) -> None:
        self._step = self._eager
        self._graphs.clear()
        self.fallback_reason = reason
        optimizer = getattr(trainer, "optimizer", None)  # none yet when setup falls back
        if optimizer is not None:
            _revert(optimizer, self._switched, self._lrs)
        self._switched, self._lrs = [], []
        warnings.warn(f"CUDAGraphStep: running the eager step instead of a CUDA graph: {reason}", stacklevel=4)


def _describe(entry: _StepGraph) -> str:
    return "+".join(f"{tuple(s.shape)}/{tuple(t.shape)}" for s, t in entry.batches)
