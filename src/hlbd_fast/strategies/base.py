"""The strategy protocol: what a speed-up may change in the training loop.

A strategy is an object with a few hooks. Every hook defaults to doing nothing, so a
strategy overrides only what it changes. ``FastTrainer`` with no strategies is the plain
fp32 loop; every strategy is checked against it.

The loop, with each hook where it is called (``[one]`` marks an *exclusive* hook: at
most one strategy may own it, and two owners are a configuration error raised when the
trainer is built)::

    for s in strategies: s.setup(trainer)                  # in the order given
    model = s.wrap_model(model)                            # every strategy, by ascending ``order``
    optimizer = build_optimizer(params)                    # [one] default: Adam(lr)
    for epoch in epochs:
        s.on_epoch_start(trainer, epoch)
        batches = make_batches(trainer, source, epoch)     # [one] default: host batches
        for micro_batches in groups of accumulation_steps():          # [one] default: 1
            each batch: moved to the device, then s.prepare_batch(batch) for every strategy
            train_step(trainer, micro_batches)             # [one] default: trainer.default_train_step
                step_tokens = global_token_count(local)    # [one] default: identity
                for batch in micro_batches:
                    with s.micro_step_context(last):       # every strategy (DDP no_sync)
                        with s.forward_context():          # every strategy (autocast)
                            loss_sum, n_tokens = trainer.forward_loss(batch)
                        backward(loss)                     # [one] default: loss.backward()
                s.before_clip(optimizer)                   # every strategy (unscale)
                clip_grad_norm_(params, max_grad_norm)
                skipped = optimizer_step(optimizer)        # [one] default: optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            s.on_step_end(trainer)
            if should_sync_loss(trainer, event):           # [one] default: when the bar redraws
                read the running loss back (one host sync)
        s.on_epoch_end(trainer, record)

Exclusive hooks are found automatically: a strategy owns every exclusive hook its class
overrides. A strategy whose ownership depends on its arguments (``MixedPrecision`` owns
``backward`` only for fp16) overrides :meth:`Strategy.owned_hooks`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ContextManager, Iterable

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import DataSource, FastTrainer

__all__ = ["Strategy", "EXCLUSIVE_HOOKS", "StrategyConflictError"]

#: Hooks that only one strategy may own.
EXCLUSIVE_HOOKS: tuple[str, ...] = (
    "build_optimizer",
    "make_batches",
    "accumulation_steps",
    "train_step",
    "global_token_count",
    "backward",
    "optimizer_step",
    "should_sync_loss",
    "reduce_metrics",
)


class StrategyConflictError(ValueError):
    """Two strategies want to own the same exclusive hook, or cannot be combined."""


class Strategy:
    """Base class of every speed-up. Override only the hooks you change.

    Subclasses should call ``super().__init__()`` only if they define ``__init__``
    with arguments they want shown in ``repr``; the default ``repr`` lists the public
    attributes of the instance.
    """

    #: Position among the strategies for :meth:`wrap_model` (ascending): in-place
    #: module surgery first (checkpointing, 0), then wrappers (DDP 50, compile 100).
    order: int = 0

    # ------------------------------------------------------------------ ownership
    def owned_hooks(self) -> frozenset[str]:
        """The exclusive hooks this strategy owns: by default those its class overrides."""
        cls = type(self)
        return frozenset(
            name for name in EXCLUSIVE_HOOKS if getattr(cls, name) is not getattr(Strategy, name)
        )

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: "FastTrainer") -> None:
        """Called once when the trainer is built, before the model is wrapped.

        ``trainer.params`` and ``trainer.optimizer`` do not exist yet (they are built
        after every set-up); use :meth:`on_epoch_start` for work that needs them, and
        keep a reference to ``trainer`` here if a later hook (``before_clip``) needs it.
        """

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Return the module the loop calls (compiled, DDP-wrapped...). Default: unchanged."""
        return model

    def build_optimizer(self, params: list[nn.Parameter], trainer: "FastTrainer") -> torch.optim.Optimizer:
        """[exclusive] Build the optimizer over ``params``."""
        raise NotImplementedError  # pragma: no cover - only called on owners

    # ------------------------------------------------------------------ data
    def make_batches(self, trainer: "FastTrainer", source: "DataSource", epoch: int) -> Iterable[Any]:
        """[exclusive] Yield the micro-batches of one epoch, on the trainer's device."""
        raise NotImplementedError  # pragma: no cover

    def prepare_batch(self, batch: Any) -> Any:
        """Transform one micro-batch after it reached the device (every strategy, in order)."""
        return batch

    def accumulation_steps(self) -> int:
        """[exclusive] Micro-batches per optimizer step."""
        raise NotImplementedError  # pragma: no cover

    # ------------------------------------------------------------------ the step
    def train_step(self, trainer: "FastTrainer", micro_batches: list[Any]) -> None:
        """[exclusive] Run one whole optimizer step over ``micro_batches``.

        The owner must leave the trainer as :meth:`FastTrainer.default_train_step` would:
        parameters stepped, gradients cleared, the step's figures added to
        ``trainer.meter`` (see :class:`hlbd_fast.trainer.EpochMeter`).
        """
        raise NotImplementedError  # pragma: no cover

    def global_token_count(self, local_tokens: torch.Tensor) -> torch.Tensor:
        """[exclusive] The token count a step's summed loss is divided by (DDP: all ranks)."""
        raise NotImplementedError  # pragma: no cover

    def micro_step_context(self, last: bool) -> ContextManager[Any]:
        """Entered around forward and backward of one micro-batch; ``last`` closes the step."""
        return contextlib.nullcontext()

    def forward_context(self) -> ContextManager[Any]:
        """Entered around forward and loss (autocast)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """[exclusive] Backward of one micro-batch's normalised loss."""
        raise NotImplementedError  # pragma: no cover

    def before_clip(self, optimizer: torch.optim.Optimizer) -> None:
        """Called before gradients are clipped (unscale fp16 gradients here)."""

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | bool:
        """[exclusive] Step the optimizer; return whether the step was skipped.

        A 0-d tensor is accepted so the answer can stay on the device (no host sync).
        """
        raise NotImplementedError  # pragma: no cover

    # ------------------------------------------------------------------ bookkeeping
    def on_epoch_start(self, trainer: "FastTrainer", epoch: int) -> None:
        """Called at the start of every epoch (``epoch`` counts from 0)."""

    def on_step_end(self, trainer: "FastTrainer") -> None:
        """Called after every optimizer step."""

    def should_sync_loss(self, trainer: "FastTrainer", event: str) -> bool:
        """[exclusive] Read the running loss back now? ``event`` is ``"micro_batch"`` or ``"step"``.

        Each ``True`` costs one host-device sync. The epoch's end always reads once.
        """
        raise NotImplementedError  # pragma: no cover

    def reduce_metrics(self, values: torch.Tensor) -> torch.Tensor:
        """[exclusive] Combine the epoch's running figures across processes before read-back."""
        raise NotImplementedError  # pragma: no cover

    def on_epoch_end(self, trainer: "FastTrainer", record: Any) -> None:
        """Called with the finished :class:`~hlbd_fast.history.EpochRecord`; may fill ``record.extra``."""

    def teardown(self, trainer: "FastTrainer") -> None:
        """Called when ``fit`` ends, normally or not."""

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
