"""FastTrainer: the plain seq2seq training loop, with speed-ups as pluggable strategies.

The loop reads top to bottom: :meth:`FastTrainer.fit` runs epochs,
:meth:`FastTrainer._run_epoch` runs an epoch's steps, :meth:`FastTrainer.train_step`
is one optimizer step. Each part a strategy may replace is a call on a role object
(``self.roles.precision.backward(...)``) whose default is the plain loop;
:mod:`hlbd_fast.strategies.base` draws the whole loop with every role and hook.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import assembly, fitting
from ._io import ctrl_c_requests_stop
from ._validation import check_bool, check_strategy_list, check_trainer_arguments, default_device, refuse_forward_loss_override, token_loss_sum, token_pair
from .batches import DataSource, KnownLengths, check_batch, chunks, epoch_order, host_batches, make_source, move, validate_tensors
from .checkpoint import CHECKPOINT_NAME, rng_state, trainer_state
from .evaluation import EvalPlan, evaluate
from .history import EpochRecord, History
from .meter import EpochMeter, Figures, raise_if_diverged
from .strategies.base import Roles, Strategy, claim

__all__ = ["FastTrainer", "DataSource", "EpochMeter", "CHECKPOINT_NAME"]

log = logging.getLogger("hlbd_fast")


class FastTrainer:
    """A seq2seq training loop whose speed-ups are strategies.

    With no strategies it is the plain fp32 loop::

        for micro-batch (src, tgt):
            logits = model(src, tgt[:, :-1])
            loss = cross_entropy(logits, tgt[:, 1:], ignore_index=pad_id)
            loss.backward(); clip_grad_norm_(max_grad_norm); optimizer.step(); zero_grad()

    Args:
        model: any module whose ``forward(src, tgt_in)`` returns logits ``[B, T, V]``, a
            dict with ``"logits"``, or a tuple whose first item is the logits. Other
            signatures or batch formats: subclass and override :meth:`forward_logits`
            (and :meth:`count_tokens`).
        strategies: speed-ups, e.g. ``[GradientAccumulation(8), DeferredLossSync()]``.
        optimizer: used as given; default ``torch.optim.Adam(params, lr=lr)``.
        lr: learning rate of the default optimizer (a finite number > 0).
        pad_id: target id ignored by the loss; default the model's ``pad_id`` when it has
            one (a different one given here is refused), else 0.
        max_grad_norm: gradients are clipped to this norm before every step; ``None``
            off. Either way a step whose gradients are not finite stops the run.
        loss_normalization: ``"tokens"`` divides a step's summed token loss by the non-pad
            token count of the whole step (micro-batch size and accumulation are pure speed
            knobs); ``"micro_batch"`` is the classic loop: each micro-batch's mean / accumulation.
        device: where to train; default the model's device.
        seed: seeds the shuffling order, and torch's global RNG (dropout) once here.
        progress: show a tqdm bar per epoch.
        batch_size: default micro-batch size of :meth:`fit` and :meth:`train_epoch`.
        scheduler: stepped once per optimizer step: a callable ``optimizer -> LRScheduler``
            (:func:`hlbd_fast.schedules.warmup_cosine`) or a scheduler built on ``optimizer``
            (:mod:`hlbd_fast.schedules`; ``ReduceLROnPlateau``, stepped with a metric, is refused).

    Use it as a context manager (``with FastTrainer(...) as trainer:``), or call :meth:`close`,
    when done. A strategy instance serves one trainer at a time.
    """

    roles: Roles  # one object per role
    device: torch.device  # where the model trains
    seed: int  # of the sample order (and of torch's RNG, when given)
    vocab_size: int | None  # the model's vocabulary (model.vocab_size or its largest embedding)
    pad_id: int  # the target id the loss ignores
    train_model: nn.Module  # what the loop calls: the model wrapped by the strategies
    params: list[nn.Parameter]  # the trainable parameters
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LRScheduler stepped once per optimizer step, or None
    meter: EpochMeter  # the epoch's running figures on the device

    def __init__(
        self,
        model: nn.Module,
        *,
        strategies: Sequence[Strategy] | None = (),
        optimizer: torch.optim.Optimizer | None = None,
        lr: float = 5e-5,
        pad_id: int | None = None,
        max_grad_norm: float | None = 1.0,
        loss_normalization: str = "tokens",
        device: str | torch.device | None = None,
        seed: int | None = None,
        progress: bool = True,
        batch_size: int = 32,
        scheduler: Any = None,
    ) -> None:
        self.strategies: tuple[Strategy, ...] = check_strategy_list(strategies)
        check_trainer_arguments(model, lr, max_grad_norm, loss_normalization, progress, batch_size, seed)
        refuse_forward_loss_override(type(self), FastTrainer)
        self.model = model
        self.lr = float(lr)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.loss_normalization = loss_normalization
        self.progress = progress
        self.batch_size = batch_size
        self.history = History()  # every epoch's record so far
        self.epoch = 0  # completed epochs
        self.global_step = 0  # optimizer steps taken
        self.checkpoint_path: Path | None = None  # where fit's checkpoints go, when set
        self.loss_reads = 0  # host syncs spent reading the running figures back (all epochs)
        self.loss_read_seconds = 0.0  # wall seconds those reads took
        self.known_lengths = KnownLengths()  # host-known lengths of the batch in hand (trimming it needs no sync)
        self._stop_requested = False
        self._closed = False
        self._resume: dict[str, Any] | None = None  # set by load() when resuming mid-epoch
        self._epoch_state: dict[str, Any] = {}
        self._checked_device_batch = False
        self._bar: Any = None
        self._eval_plan: EvalPlan | None = None
        for s in self.strategies:
            claim(s, self)  # one trainer per strategy instance
        try:
            assembly.build(self, model, optimizer, device, seed, pad_id, scheduler)
        except BaseException:
            self.close()  # a trainer that failed to build owns nothing
            raise

    @property
    def steps_in_epoch(self) -> int:
        """Optimizer steps taken in the current (or last) epoch."""
        return int(self._epoch_state.get("steps", 0))

    @property
    def micro_batches_in_epoch(self) -> int:
        """Micro-batches trained in the current (or last) epoch."""
        return int(self._epoch_state.get("micro", 0))

    @property
    def evaluates(self) -> bool:
        """Whether the running ``fit`` evaluates (it was given ``eval_data``)."""
        return self._eval_plan is not None and self._eval_plan.data is not None

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step (the accumulation role's ``steps``)."""
        return self.roles.accumulation.steps

    @classmethod
    def from_preset(cls, model: nn.Module, preset: Any, **kwargs: Any) -> "FastTrainer":
        """Build a trainer from a :class:`~hlbd_fast.presets.Preset` or a preset name.

        The preset supplies strategies, micro-batch size, loss normalisation and lr;
        keyword arguments override them (``strategies=`` is appended to the preset's).
        """
        from .presets import resolve_preset

        preset = resolve_preset(preset, default_device(model, kwargs.get("device")), model)
        return cls(model, **preset.trainer_kwargs(**kwargs))

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Release what the strategies started (worker processes, captured graphs) and their ownership.

        Idempotent. ``with FastTrainer(...) as trainer:`` calls it on every exit path. A
        closed trainer refuses to train or evaluate; its strategies may serve a new one.
        """
        if not self._closed:
            self._closed = True
            assembly.close(self)

    def __enter__(self) -> "FastTrainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"FastTrainer.{what}: this trainer was closed; build a new FastTrainer (with fresh strategies)")

    def reports(self) -> dict[str, Any]:
        """Every strategy's :meth:`~hlbd_fast.strategies.Strategy.report` that has one, by class name."""
        return assembly.reports(self)

    # ------------------------------------------------------------------ the forward
    def forward_logits(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of one batch at the positions the loss scores, and their targets.

        The one seam for the forward: training (``model`` the wrapped training model),
        :meth:`evaluate`, ``fit(eval_data=...)``, the doctor and ``tune`` call it; the loss,
        token count and accuracy follow from ``(logits [..., V], targets [...])`` and
        ``pad_id``. Default: the ``forward`` role, ``model(src, tgt[:, :-1])`` against
        ``tgt[:, 1:]``. Override it for other signatures or batch formats (a dict batch),
        with :meth:`count_tokens`; check such batches in :meth:`to_device`.
        """
        return self.roles.forward.logits(self, model, batch)

    def forward_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward one training micro-batch: ``(summed token loss, non-pad token count)``, 0-d tensors.

        Built on :meth:`forward_logits` (override that one, not this).
        """
        logits, targets = self.forward_logits(self.train_model, batch)
        return token_loss_sum(logits, targets, self.pad_id), self.count_tokens(batch)

    def count_tokens(self, batch: Any) -> torch.Tensor:
        """Non-pad target tokens of a micro-batch (0-d tensor on the device)."""
        return (token_pair(batch, "FastTrainer.count_tokens")[1][:, 1:] != self.pad_id).sum()

    def _normalise(self, loss_sum: torch.Tensor, n_tokens: torch.Tensor, step_tokens: torch.Tensor) -> torch.Tensor:
        if self.loss_normalization == "tokens":
            # only a zero count is replaced: a distributed divisor may be below 1 (DDP: tokens / W)
            return loss_sum / torch.where(step_tokens > 0, step_tokens, torch.ones_like(step_tokens))
        # the classic loop: mean per micro-batch, divided by the accumulation steps
        return loss_sum / n_tokens.clamp(min=1) / self.accumulation

    # ------------------------------------------------------------------ the step
    def train_step(self, micro_batches: list[Any]) -> None:
        """One optimizer step over ``micro_batches``: the plain loop, through the roles."""
        precision, distribution = self.roles.precision, self.roles.distribution
        local = torch.stack([self.count_tokens(b) for b in micro_batches]).sum()
        step_tokens = distribution.global_tokens(self, local)
        last = len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            with distribution.gradient_sync(self, i == last):
                with precision.forward_context(self):
                    loss_sum, n_tokens = self.forward_loss(batch)
                    loss = self._normalise(loss_sum, n_tokens, step_tokens)
                precision.backward(self, loss)
            self.meter.add_micro(loss_sum, n_tokens)
            self._maybe_read("micro_batch")
        self.clip_and_step()

    def clip_and_step(self) -> None:
        """Unscale, clip (measuring the gradient norm), step the optimizer, clear gradients; count the step."""
        self.roles.precision.unscale_gradients(self)
        for s in self.strategies:
            s.before_clip(self)
        norm = _grad_norm(self.params, self.max_grad_norm)
        skipped = self.roles.precision.optimizer_step(self)
        for s in self.strategies:
            s.after_optimizer_step(self)
        self.optimizer.zero_grad(set_to_none=True)
        self.meter.add_step(skipped, norm)  # a non-finite norm on a step taken stops the run at the next read

    # ------------------------------------------------------------------ data
    def make_source(self, data: Any, batch_size: int | None = None, shuffle: bool = True) -> DataSource:
        """Normalise ``data`` (tensors pair, Dataset or DataLoader) and check tensors whole, once."""
        return make_source(data, self.batch_size if batch_size is None else batch_size, shuffle, self.vocab_size)

    def validate_tensors(self, src: Any, tgt: Any, where: str = "batch") -> None:
        """Check a ``(src, tgt)`` pair: 2-D int64 tensors, same rows, ids in the vocabulary (reads values)."""
        validate_tensors(src, tgt, self.vocab_size, where)

    def epoch_order(self, n: int, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch``: a host permutation from (seed, epoch) alone."""
        return epoch_order(self.seed, epoch, n)

    def host_batches(self, source: DataSource, epoch: int) -> Iterator[Any]:
        """The plain loop's micro-batches of one epoch, on the host (what the default batch source yields)."""
        return host_batches(self, source, epoch)

    def to_device(self, batch: Any) -> Any:
        """Move a batch to the device; host ``(src, tgt)`` pairs are checked first, device ones once."""
        if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor):
            on_host = batch[0].device.type == "cpu"
            if on_host or not self._checked_device_batch:  # host: free to check; device: once (one sync)
                check_batch(batch, self.vocab_size)
                self._checked_device_batch = self._checked_device_batch or not on_host
        return move(batch, self.device)

    def _epoch_batches(self, source: DataSource, epoch: int) -> Iterator[Any]:
        checked = self.roles.batches.prevalidated or (source.tensors is not None and source.loader is None)
        for batch in self.roles.batches.batches(self, source, epoch):
            batch = move(batch, self.device) if checked else self.to_device(batch)
            for s in self.strategies:
                batch = s.prepare_batch(self, batch)
            yield batch

    # ------------------------------------------------------------------ epochs
    def fit(
        self,
        data: Any,
        epochs: int,
        batch_size: int | None = None,
        shuffle: bool = True,
        *,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 1,
        resume: bool = False,
        eval_data: Any = None,
        eval_every: int = 1,
        keep_best: str | None = None,
    ) -> History:
        """Train until ``epochs`` epochs are complete (counting epochs already done).

        Args:
            data: ``(src, tgt)`` int64 tensors ``[N, S]``/``[N, T]``, a Dataset of
                ``(src, tgt)`` items, or a DataLoader (used as it is).
            epochs: total epochs; a resumed trainer runs only the ones left.
            batch_size: micro-batch size; default the trainer's ``batch_size``.
            shuffle: reshuffle every epoch (order from ``seed`` and the epoch number).
            checkpoint_dir: write ``last.pt`` there every ``checkpoint_every`` epochs and
                when training is interrupted (Ctrl-C); writes are atomic.
            resume: load ``checkpoint_dir/last.pt`` first, when it exists.
            eval_data: evaluated (:meth:`evaluate`) every ``eval_every`` epochs and after
                the last; the metrics go into ``EpochRecord.eval``. Training is unchanged
                by it, bit for bit. Checked (its first batch) before the first step.
            eval_every: epochs between evaluations.
            keep_best: an evaluation metric (``"eval_loss"``, ``"eval_token_accuracy"``)
                whose best value so far writes ``best.pt`` beside ``last.pt`` (a loss is
                best low, an accuracy high); needs ``eval_data`` and ``checkpoint_dir``.

        Returns:
            The trainer's :class:`History` (all epochs so far).

        Raises:
            NonFiniteLossError, NonFiniteGradientError: training diverged; the last
                checkpoint is untouched.
            KeyboardInterrupt: after writing a checkpoint, when one is configured.
        """
        self._check_open("fit")
        source, plan = fitting.begin(
            self, data, epochs, batch_size, shuffle, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
            resume=resume, eval_data=eval_data, eval_every=eval_every, keep_best=keep_best,
        )  # fmt: skip
        self._stop_requested = False
        self._eval_plan = plan
        try:
            with ctrl_c_requests_stop(self), self._scopes("run"):
                while self.epoch < epochs and not self._stop_requested:
                    record = self._run_epoch(source, epochs)
                    if record is not None:
                        fitting.after_epoch(self, plan, record, epochs, checkpoint_every, self._stop_requested)
        finally:
            self._eval_plan = None
        return self.history

    def evaluate(
        self, data: Any, batch_size: int | None = None, generate: bool = False, *, bos_id: int | None = None, eos_id: int | None = None
    ) -> dict[str, float]:
        """Loss and token accuracy (and, with ``generate=True``, exact match) of the model on ``data``.

        In eval mode, without gradients, under the trainer's precision, with the averaged
        weights when :class:`~hlbd_fast.strategies.EMA` is on; the model's mode, weights and
        every RNG are left as they were. One host sync (more with ``generate=True``, which
        decodes from ``bos_id`` to ``eos_id``: by default the ids the targets start and end
        with). See :func:`hlbd_fast.evaluation.evaluate`.
        """
        self._check_open("evaluate")
        check_bool("generate", generate)
        return evaluate(self, data, batch_size, generate, bos_id=bos_id, eos_id=eos_id)

    def train_epoch(self, data: Any, batch_size: int | None = None, shuffle: bool = True) -> float:
        """Train one epoch and return its mean loss: the drop-in for a hand-written ``train_epoch``.

        ``data`` as in :meth:`fit`; a DataLoader is used as it is.
        """
        self._check_open("train_epoch")
        source = self.make_source(data, batch_size, shuffle)
        self._stop_requested = False
        with self._scopes("run"):
            record = self._run_epoch(source, None)
        return record.loss if record is not None else float("nan")

    @contextlib.contextmanager
    def _scopes(self, kind: str, *args: Any) -> Iterator[None]:
        """Every strategy's run or epoch scope, entered in order and exited in reverse on any exit path."""
        with contextlib.ExitStack() as stack:
            for s in self.strategies:
                scope = s.run_scope(self) if kind == "run" else s.epoch_scope(self, *args)
                stack.enter_context(scope)
            yield

    def _run_epoch(self, source: DataSource, total_epochs: int | None) -> EpochRecord | None:
        epoch = self.epoch
        resume, self._resume = self._resume, None
        self.train_model.train()
        t0 = time.perf_counter()
        with self._scopes("epoch", epoch):
            for s in self.strategies:
                s.on_epoch_start(self, epoch)
            stopped_early = self._run_steps(source, epoch, total_epochs, resume)
            if self._epoch_state["micro"] == 0:
                raise ValueError("data yielded no batches this epoch; check the DataLoader or the data")
            figures = self.read_figures()  # the epoch's one sync; never a checkpoint after a non-finite loss or gradient
        seconds = time.perf_counter() - t0
        if stopped_early:
            if self.checkpoint_path is not None:
                fitting.write_mid_epoch(self, self.checkpoint_path, self._epoch_state)
            return None
        return self._finish_epoch(epoch, figures, seconds)

    def _run_steps(self, source: DataSource, epoch: int, total: int | None, resume: dict[str, Any] | None) -> bool:
        """Run the epoch's optimizer steps; return whether a stop request left some of it untrained."""
        batches = self._epoch_batches(source, epoch)
        skip = self._start_epoch(batches, resume)
        self._epoch_state["batch_size"] = source.batch_size
        count = self.roles.batches.num_batches(self, source)
        desc = f"epoch {epoch + 1}/{total}" if total else f"epoch {epoch + 1}"
        self._bar = tqdm(total=count, initial=skip, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True, unit="batch")
        groups = chunks(batches, self.accumulation)
        try:
            for micro_batches in groups:
                for s in self.strategies:
                    s.on_step_start(self)
                self.roles.step.run_step(self, micro_batches)
                if self.scheduler is not None:
                    self.scheduler.step()  # once per optimizer step (host arithmetic; a tensor lr is filled in place)
                self.global_step += 1
                self._epoch_state["micro"] += len(micro_batches)
                self._epoch_state["steps"] += 1
                self._bar.update(len(micro_batches))
                for s in self.strategies:
                    s.on_step_end(self)
                self._maybe_read("step")
                if self._stop_requested:
                    # before looking ahead: fetching the next batch may draw from the RNG (augmentation)
                    self._epoch_state["stop_rng"] = rng_state()
                    return next(groups, None) is not None
        finally:
            self._bar.close()
            self._bar = None
        return False

    def _start_epoch(self, batches: Iterator[Any], resume: dict[str, Any] | None) -> int:
        """Reset the figures; or, resuming mid-epoch, restore them and skip the batches already trained."""
        if resume is None:
            self.meter.reset()
            self._epoch_state = {"start_rng": rng_state(), "micro": 0, "steps": 0}
        else:
            self._epoch_state = fitting.resume_epoch(self, batches, resume)
        return int(self._epoch_state["micro"])

    def _finish_epoch(self, epoch: int, figures: Figures, seconds: float) -> EpochRecord:
        state = self._epoch_state
        record = EpochRecord.from_figures(epoch + 1, figures, seconds, steps=state["steps"], micro_batches=state["micro"])
        record.lr = float(self.optimizer.param_groups[0].get("lr", float("nan")))  # a tensor lr (CUDA graphs): one read
        if self._eval_plan is not None:
            record.eval = self._eval_plan.run(self, epoch + 1)  # before the hooks: loggers and early stopping read it
        if record.empty_micro_batches:
            log.warning("epoch %d: %d micro-batches had only padding targets; they contributed nothing", record.epoch, record.empty_micro_batches)
        for s in self.strategies:
            s.on_epoch_end(self, record)
        self.history.records.append(record)
        self.epoch += 1
        return record

    # ------------------------------------------------------------------ reading the figures
    def read_figures(self) -> Figures:
        """Read the epoch's running figures back: one host sync (a collective under several processes).

        Raises:
            NonFiniteLossError, NonFiniteGradientError: the loss or the gradients of a
                step taken became NaN/inf (naming the epoch and step).
        """
        t0 = time.perf_counter()
        figures = self.meter.read(self.roles.distribution, self, self.loss_normalization)  # waits for the device
        self.loss_reads += 1
        self.loss_read_seconds += time.perf_counter() - t0
        raise_if_diverged(figures, self.epoch + 1, self.checkpoint_path)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{figures.loss:.4f}", refresh=False)
        for s in self.strategies:
            s.on_loss_read(self, figures)
        return figures

    def _maybe_read(self, event: str) -> None:
        if self.roles.readback.should_read(self, event):
            self.read_figures()

    def request_stop(self) -> None:
        """Stop ``fit`` after the current optimizer step (a checkpoint is written if configured)."""
        self._stop_requested = True

    # ------------------------------------------------------------------ checkpoints (hlbd_fast.fitting, hlbd_fast.checkpoint)
    def state_dict(self) -> dict[str, Any]:
        """The whole training state: model, optimizer, strategies, counters, RNG states, history."""
        return trainer_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (or a checkpoint's state), checked whole first.

        Raises:
            CheckpointError: it does not fit this trainer (the difference named); nothing was changed.
        """
        fitting.apply(self, state, None)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a checkpoint atomically (with a checksum); never one holding non-finite weights."""
        fitting.save(self, Path(path))

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore a checkpoint written by :meth:`save` (or by ``fit``); see :meth:`load_state_dict`."""
        fitting.load(self, Path(path))


def _grad_norm(params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor | None:
    """Clip to ``max_norm`` and return the total norm; without clipping, only measure it (no sync either way)."""
    if max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if total_norm is not None:
        return total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))  # torch < 2.6
