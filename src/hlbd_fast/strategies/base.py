"""The strategy protocol: roles that replace a part of the plain loop, and hooks that add to it.

``FastTrainer`` holds exactly one object per **role**. The default object of every role
*is* the plain loop (``Precision`` calls ``loss.backward()`` and ``optimizer.step()``),
so the loop never asks whether somebody replaced a part. A strategy that replaces a
part subclasses the role's class and overrides its methods; two strategies for one
role are a :class:`StrategyConflictError` when the trainer is built, naming both.

Every strategy — role or not — may also *add* to the loop through hooks that do
nothing by default. Every hook receives the trainer first. Whatever a strategy
installs for a run or an epoch (a kernel, a global flag, worker processes) it installs
in :meth:`Strategy.run_scope` or :meth:`Strategy.epoch_scope`: context managers that
``fit`` and ``train_epoch`` enter with ``try/finally``, so every exit path — an error,
Ctrl-C, ``request_stop`` — removes it.

The loop, with each role (``roles.X``) and hook (``s.X``: every strategy, in list order)::

    roles set up first (distribution, precision, optimizer, accumulation, batches,
    step, readback), then every other strategy: s.setup(trainer)
    model = s.wrap_model(trainer, model)                 # every strategy, by ascending ``order``
    optimizer = roles.optimizer.build_optimizer(trainer, params)       # Adam(lr)
    with s.run_scope(trainer) for every s:               # fit() or train_epoch()
      for epoch:
        with s.epoch_scope(trainer, epoch) for every s:
          s.on_epoch_start(trainer, epoch)
          for batch in roles.batches.batches(trainer, source, epoch):  # host batches, seeded order
              batch = s.prepare_batch(trainer, to_device(batch))
          for groups of roles.accumulation.steps micro-batches:       # 1
              s.on_step_start(trainer)
              roles.step.run_step(trainer, micro_batches)   # trainer.train_step(micro_batches):
                  step_tokens = roles.distribution.global_tokens(trainer, local)
                  for batch in micro_batches:
                      with roles.distribution.gradient_sync(trainer, last):
                          with roles.precision.forward_context(trainer):
                              loss_sum, n_tokens = trainer.forward_loss(batch)
                              # logits, targets = roles.forward.logits(trainer, model, batch)   # model(src, tgt[:, :-1])
                          roles.precision.backward(trainer, loss)    # loss.backward()
                  roles.precision.unscale_gradients(trainer)          # nothing
                  s.before_clip(trainer)
                  grad_norm = clip_grad_norm_(params, max_grad_norm)  # non-finite: stops the run
                  skipped = roles.precision.optimizer_step(trainer)   # optimizer.step()
                  s.after_optimizer_step(trainer)
                  optimizer.zero_grad(set_to_none=True)
              scheduler.step()                             # when FastTrainer(scheduler=...) has one
              s.on_step_end(trainer)
              if roles.readback.should_read(trainer, "step"):         # when the bar redraws
                  figures = trainer.read_figures()   # one host sync; then s.on_loss_read(trainer, figures)
        record.eval = trainer.evaluate(eval_data)    # fit(eval_data=...), inside s.eval_scope(trainer)
        s.on_epoch_end(trainer, record)              # after the epoch's one read-back
        save last.pt; best.pt when keep_best improved (inside s.eval_scope)
"""

from __future__ import annotations

import contextlib
import time
import weakref
from typing import TYPE_CHECKING, Any, ClassVar, ContextManager, Iterable, Iterator

import torch
from torch import nn

from .needs import Context, Declaration

if TYPE_CHECKING:  # pragma: no cover
    from ..batches import DataSource
    from ..history import EpochRecord
    from ..meter import Figures
    from ..trainer import FastTrainer

__all__ = [
    "ROLES",
    "Strategy",
    "StrategyConflictError",
    "Precision",
    "OptimizerFactory",
    "Accumulation",
    "BatchSource",
    "Forward",
    "Distribution",
    "StepRunner",
    "LossReadback",
    "Roles",
    "resolve_roles",
]

#: The roles, in the order their strategies are set up.
ROLES: tuple[str, ...] = ("distribution", "precision", "optimizer", "accumulation", "batches", "forward", "step", "readback")

_BAR_REFRESH_S = 0.5  # the default read-back policy reads the loss at most this often, for the bar


class StrategyConflictError(ValueError):
    """Two strategies fill the same role, or cannot be combined."""


class Strategy:
    """Base class of every speed-up. Override only the hooks you add to; each gets the trainer first.

    A strategy that replaces a part of the plain loop subclasses one of the role classes
    below instead (:class:`Precision`, :class:`OptimizerFactory`, :class:`Accumulation`,
    :class:`BatchSource`, :class:`Distribution`, :class:`StepRunner`,
    :class:`LossReadback`); it may use these hooks too. The default ``repr`` lists the
    public attributes of the instance.
    """

    #: The role this strategy fills (set by the role classes); ``None``: it only adds.
    role: ClassVar[str | None] = None
    #: Position among the strategies for :meth:`wrap_model` (ascending): in-place module
    #: surgery first (checkpointing, 0), then wrappers (DDP 50, compile 100).
    order: int = 0
    #: What an override of :meth:`before_clip` / :meth:`after_optimizer_step` does: ``"host"``
    #: (Python work that must run at every step: refused when the step is captured as a CUDA
    #: graph, which runs it once) or ``"device"`` (it only queues device work, replayed with the step).
    step_hook_work: ClassVar[str] = "host"
    #: Whether :meth:`prepare_batch` also prepares evaluation batches: set it for a
    #: preparation that keeps results (trimming proven padding); leave it off for training
    #: bookkeeping (shard stand-ins, counters).
    prepares_eval_batches: ClassVar[bool] = False

    # ------------------------------------------------------------------ declarations
    def declare(self, context: Context) -> Declaration:
        """What this strategy provides, requires and forbids for ``context`` (model, device).

        Read once when the trainer is built (see :mod:`hlbd_fast.strategies.needs`); the
        default declares nothing. Presets, the bench, the doctor and ``tune`` read it too.
        """
        return Declaration()

    def report(self) -> Any:
        """What this strategy has to report about the run so far: a frozen dataclass, or ``None``."""
        return None

    def close(self) -> None:
        """Release what the strategy started (worker processes, captured graphs); idempotent.

        Called by :meth:`FastTrainer.close` (and on leaving ``with FastTrainer(...)``).
        """

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: "FastTrainer") -> None:
        """Called once when the trainer is built, before the model is wrapped.

        ``trainer.params`` and ``trainer.optimizer`` do not exist yet; use
        :meth:`on_epoch_start` or :meth:`run_scope` for work that needs them.
        """

    def wrap_model(self, trainer: "FastTrainer", model: nn.Module) -> nn.Module:
        """Return the module the loop calls (compiled, DDP-wrapped...). Default: unchanged."""
        return model

    # ------------------------------------------------------------------ scopes
    def run_scope(self, trainer: "FastTrainer") -> ContextManager[Any]:
        """Entered around a whole ``fit`` or ``train_epoch`` call; its exit runs on every exit path."""
        return contextlib.nullcontext()

    def epoch_scope(self, trainer: "FastTrainer", epoch: int) -> ContextManager[Any]:
        """Entered around one epoch (``epoch`` counts from 0); its exit runs on every exit path."""
        return contextlib.nullcontext()

    def eval_scope(self, trainer: "FastTrainer") -> ContextManager[Any]:
        """Entered around :meth:`FastTrainer.evaluate` and the writing of ``best.pt`` (EMA swaps its weights in)."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ events
    def on_epoch_start(self, trainer: "FastTrainer", epoch: int) -> None:
        """Called at the start of every epoch (``epoch`` counts from 0), inside the epoch's scopes."""

    def prepare_batch(self, trainer: "FastTrainer", batch: Any) -> Any:
        """Transform one micro-batch after it reached the device (every strategy, in order)."""
        return batch

    def on_step_start(self, trainer: "FastTrainer") -> None:
        """Called before every optimizer step's micro-batches run."""

    def before_clip(self, trainer: "FastTrainer") -> None:
        """Called after the step's backward passes (gradients unscaled), before clipping.

        Under :class:`~hlbd_fast.strategies.CUDAGraphStep` this runs at capture only.
        """

    def after_optimizer_step(self, trainer: "FastTrainer") -> None:
        """Called right after the optimizer stepped, before gradients are cleared (EMA updates here).

        Device work only: under :class:`~hlbd_fast.strategies.CUDAGraphStep` this is
        captured with the step and replayed, so its Python runs once, at capture.
        """

    def on_step_end(self, trainer: "FastTrainer") -> None:
        """Called after every optimizer step (``trainer.global_step`` counts it)."""

    def on_loss_read(self, trainer: "FastTrainer", figures: "Figures") -> None:
        """Called after every read-back of the running figures (no extra sync: they are on the host)."""

    def on_epoch_end(self, trainer: "FastTrainer", record: "EpochRecord") -> None:
        """Called with the finished :class:`~hlbd_fast.history.EpochRecord`; may fill ``record.extra``."""

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """State that goes into checkpoints (tensors, numbers, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    # ------------------------------------------------------------------ display
    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


# ---------------------------------------------------------------------------- the roles
class Precision(Strategy):
    """Role ``precision``: the forward's numeric context, backward, unscaling and the optimizer step.

    The default is the plain fp32 loop: no autocast, ``loss.backward()``, nothing to
    unscale, ``optimizer.step()``.
    """

    role = "precision"

    def forward_context(self, trainer: "FastTrainer") -> ContextManager[Any]:
        """Entered around forward and loss (autocast)."""
        return contextlib.nullcontext()

    def backward(self, trainer: "FastTrainer", loss: torch.Tensor) -> None:
        """Backward of one micro-batch's normalised loss."""
        loss.backward()

    def unscale_gradients(self, trainer: "FastTrainer") -> None:
        """Bring the gradients to their true scale before clipping (fp16 loss scaling)."""

    def optimizer_step(self, trainer: "FastTrainer") -> torch.Tensor | bool:
        """Step the optimizer; return whether the step was skipped (a 0-d tensor may stay on the device)."""
        trainer.optimizer.step()
        return False


class OptimizerFactory(Strategy):
    """Role ``optimizer``: builds the optimizer. Default: ``torch.optim.Adam(params, lr=trainer.lr)``."""

    role = "optimizer"

    def build_optimizer(self, trainer: "FastTrainer", params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The optimizer over ``params``."""
        return torch.optim.Adam(params, lr=trainer.lr)


class GivenOptimizer(OptimizerFactory):
    """The optimizer passed to ``FastTrainer(optimizer=...)``, used as it is."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def build_optimizer(self, trainer: "FastTrainer", params: list[nn.Parameter]) -> torch.optim.Optimizer:
        mine = {id(p) for p in trainer.model.parameters()}
        theirs = [p for g in self.optimizer.param_groups for p in g["params"]]
        if not theirs or any(id(p) not in mine for p in theirs):
            raise ValueError("optimizer does not hold this model's parameters; build it from model.parameters() after moving the model to its device")
        return self.optimizer

    def __repr__(self) -> str:
        return f"optimizer={type(self.optimizer).__name__}(...)"


class Accumulation(Strategy):
    """Role ``accumulation``: micro-batches per optimizer step. Default: 1."""

    role = "accumulation"
    steps: int = 1


class BatchSource(Strategy):
    """Role ``batches``: the micro-batches of an epoch. Default: host batches in the seeded order.

    Tensors are sliced by :meth:`FastTrainer.epoch_order`, a Dataset is read by a
    DataLoader over that order, a DataLoader is iterated as it is. The trainer moves
    each batch to its device afterwards.
    """

    role = "batches"
    #: Whether every batch comes from data validated whole (no per-batch check is needed).
    prevalidated: bool = False

    def batches(self, trainer: "FastTrainer", source: "DataSource", epoch: int) -> Iterable[Any]:
        """The micro-batches of epoch ``epoch`` (0-based)."""
        from ..batches import host_batches

        return host_batches(trainer, source, epoch)

    def num_batches(self, trainer: "FastTrainer", source: "DataSource") -> int | None:
        """Micro-batches per epoch of this process, when known."""
        return source.num_batches(trainer.roles.distribution)


class Distribution(Strategy):
    """Role ``distribution``: how processes share the work. Default: one process, figures as they are."""

    role = "distribution"

    @property
    def world_size(self) -> int:
        """Number of processes."""
        return 1

    @property
    def rank(self) -> int:
        """This process's rank."""
        return 0

    @property
    def is_main(self) -> bool:
        """Whether this process logs, shows the bar and writes checkpoints."""
        return self.rank == 0

    def resolve_device(self, device: torch.device) -> torch.device:
        """The device this process trains on, decided before the model is moved."""
        return device

    def batch_indices(self, trainer: "FastTrainer", order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        """This process's micro-batches of an epoch as index tensors into the data, from the epoch's ``order``."""
        return list(order.split(batch_size))

    def iterate_loader(self, trainer: "FastTrainer", loader: Any, epoch: int) -> Iterable[Any]:
        """The batches of a DataLoader given to ``fit`` (used as it is; it shards itself, if at all)."""
        return loader

    def gradient_sync(self, trainer: "FastTrainer", last: bool) -> ContextManager[Any]:
        """Entered around one micro-batch's forward and backward; ``last`` closes the step."""
        return contextlib.nullcontext()

    def global_tokens(self, trainer: "FastTrainer", local: torch.Tensor) -> torch.Tensor:
        """The token count a step's summed loss is divided by (``loss_normalization="tokens"``)."""
        return local

    def all_reduce(self, trainer: "FastTrainer", tensor: torch.Tensor, op: str) -> torch.Tensor:
        """Combine ``tensor`` over processes with ``op`` (``"sum"`` or ``"max"``); one process: as it is."""
        return tensor

    def stand_ins(self, trainer: "FastTrainer") -> int:
        """Micro-batches this process ran this epoch that hold no data (zero-token stand-ins)."""
        return 0


class Forward(Strategy):
    """Role ``forward``: the model's logits at the positions the loss scores, and their targets.

    Default: ``logits = model(src, tgt[:, :-1])`` (``[B, T, V]``, checked) against
    ``tgt[:, 1:]``; the trainer sums the cross-entropy over non-pad targets.
    """

    role = "forward"

    def logits(self, trainer: "FastTrainer", model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [..., V], targets [...])`` of a ``(src, tgt)`` batch; ``model`` is what to call."""
        from .._validation import extract_logits, token_pair

        src, tgt = token_pair(batch, "FastTrainer.forward_loss")
        tgt_in = tgt[:, :-1]
        out = extract_logits(model(src, tgt_in), src.shape[0], tgt_in.shape[1], trainer.vocab_size)
        return out, tgt[:, 1:]


class StepRunner(Strategy):
    """Role ``step``: runs one optimizer step. Default: the eager :meth:`FastTrainer.train_step`."""

    role = "step"

    def run_step(self, trainer: "FastTrainer", micro_batches: list[Any]) -> None:
        """Run one whole optimizer step over ``micro_batches``.

        A replacement must leave the trainer as :meth:`FastTrainer.train_step` does:
        parameters stepped, gradients cleared, the step's figures in ``trainer.meter``.
        """
        trainer.train_step(micro_batches)

    def check_optimizer(self, optimizer: "torch.optim.Optimizer") -> None:
        """Refuse an optimizer this step cannot run, when the trainer is built (default: any)."""


class LossReadback(Strategy):
    """Role ``readback``: when the running loss is read back to the host (each read is one sync).

    Default: at a step's end when the progress bar would redraw (at most every 0.5 s),
    and never mid-epoch when several processes train (each read is a collective, and
    clocks differ between processes). The epoch's end always reads once.
    """

    role = "readback"

    def __init__(self) -> None:
        self._last_read = 0.0

    def should_read(self, trainer: "FastTrainer", event: str) -> bool:
        """Read now? ``event`` is ``"micro_batch"`` or ``"step"``."""
        if event != "step" or not trainer.progress or trainer.roles.distribution.world_size > 1:
            return False
        now = time.perf_counter()
        if now - getattr(self, "_last_read", 0.0) < _BAR_REFRESH_S:
            return False
        self._last_read = now
        return True


#: The role classes, by role name: the default object of each role is an instance.
ROLE_CLASSES: dict[str, type[Strategy]] = {
    "distribution": Distribution,
    "precision": Precision,
    "optimizer": OptimizerFactory,
    "accumulation": Accumulation,
    "batches": BatchSource,
    "forward": Forward,
    "step": StepRunner,
    "readback": LossReadback,
}


class Roles:
    """The trainer's one object per role; a role nobody filled holds its plain default."""

    __slots__ = ROLES

    def __init__(self, **objects: Strategy) -> None:
        for name in ROLES:
            object.__setattr__(self, name, objects.get(name) or ROLE_CLASSES[name]())

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("roles are decided when the trainer is built")

    def __iter__(self) -> Iterator[Strategy]:
        """The role objects, in set-up order."""
        return (getattr(self, name) for name in ROLES)

    def __repr__(self) -> str:
        return "Roles(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in ROLES) + ")"

    # typed access (slots are filled in __init__)
    distribution: Distribution
    precision: Precision
    optimizer: OptimizerFactory
    accumulation: Accumulation
    batches: BatchSource
    forward: Forward
    step: StepRunner
    readback: LossReadback


def resolve_roles(strategies: Iterable[Strategy], optimizer: torch.optim.Optimizer | None) -> tuple[Roles, list[str]]:
    """One object per role from the user's strategies (and ``optimizer=``), and every role filled twice.

    The first strategy of a role fills it; each later one is a conflict, returned as a
    sentence with its fix (the trainer raises them with the declarations' violations).
    """
    filled: dict[str, Strategy] = {}
    problems: list[str] = []
    if optimizer is not None:
        filled["optimizer"] = GivenOptimizer(optimizer)
    for s in strategies:
        if s.role is None:
            continue
        if s.role not in ROLE_CLASSES:
            raise ValueError(f"{s!r} claims unknown role {s.role!r}; the roles are {ROLES}")
        other = filled.setdefault(s.role, s)
        if other is s:
            continue
        if isinstance(other, GivenOptimizer):
            problems.append(f"an optimizer ({type(other.optimizer).__name__}) was given to FastTrainer and strategy {s!r} builds one too; keep one of them")
        else:
            problems.append(f"strategies {other!r} and {s!r} both fill the role '{s.role}' (only one may); keep one of them")
    return Roles(**filled), problems


# ---------------------------------------------------------------------------- ownership
def claim(strategy: Strategy, trainer: "FastTrainer") -> None:
    """Record ``trainer`` as the owner of ``strategy``; one still owned by another open trainer is refused."""
    ref = vars(strategy).get("_owner")
    owner = ref() if ref is not None else None
    if owner is not None and owner is not trainer:
        raise ValueError(
            f"{strategy!r} already belongs to another FastTrainer: a strategy instance keeps one trainer's state "
            "(its model, averages, records). Build a fresh instance for this trainer (presets build fresh ones), "
            "or close() the other trainer first"
        )
    vars(strategy)["_owner"] = weakref.ref(trainer)


def release(strategy: Strategy, trainer: "FastTrainer") -> None:
    """Forget ``trainer`` as the owner of ``strategy`` (when it owns it)."""
    ref = vars(strategy).get("_owner")
    if ref is not None and ref() is trainer:
        vars(strategy)["_owner"] = None
