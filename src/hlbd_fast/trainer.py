"""FastTrainer: the plain seq2seq training loop, with speed-ups as pluggable strategies.

The loop reads top to bottom: :meth:`FastTrainer.fit` runs epochs,
:meth:`FastTrainer._run_epoch` runs an epoch's steps, :meth:`FastTrainer.train_step`
is one optimizer step. Each part a strategy may replace is a call on a role object
(``self.roles.precision.backward(...)``) whose default is the plain loop;
:mod:`hlbd_fast.strategies.base` draws the whole loop with every role and hook.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ._io import check_checkpoint_files, check_writable_dir, ctrl_c_requests_stop
from ._validation import (
    check_bool,
    check_pad_id,
    check_positive_int,
    check_strategy_list,
    check_trainer_arguments,
    infer_vocab_size,
    token_loss_sum,
    token_pair,
)
from .batches import DataSource, KnownLengths, check_batch, chunks, epoch_order, host_batches, make_source, move, validate_tensors
from .checkpoint import (
    CHECKPOINT_NAME,
    apply_trainer_state,
    check_resume,
    mid_epoch_state,
    read_checkpoint,
    rng_state,
    set_rng_state,
    trainer_state,
    write_trainer_checkpoint,
)
from .evaluation import BEST_NAME, EvalPlan, evaluate
from .history import EpochRecord, History
from .meter import EpochMeter, Figures, raise_if_diverged
from .schedules import resolve_scheduler
from .strategies.base import ROLES, Forward, Roles, Strategy, StrategyConflictError, claim, release, resolve_roles
from .strategies.needs import Context, check_strategies

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
        pad_id: target id ignored by the loss.
        max_grad_norm: gradients are clipped to this norm before every step; ``None``
            off. Either way a step whose gradients are not finite stops the run.
        loss_normalization: ``"tokens"`` divides a step's summed token loss by the
            non-pad token count of the whole step, so micro-batch size and accumulation
            are pure speed knobs; ``"micro_batch"`` reproduces the classic loop: the mean
            per micro-batch, divided by the accumulation steps.
        device: where to train; default the model's device.
        seed: seeds the shuffling order, and torch's global RNG (dropout) once here.
        progress: show a tqdm bar per epoch.
        batch_size: default micro-batch size of :meth:`fit` and :meth:`train_epoch`.
        scheduler: a learning-rate schedule stepped once per optimizer step: a callable
            ``optimizer -> LRScheduler`` (e.g. :func:`hlbd_fast.schedules.warmup_cosine`) or
            a scheduler built on the ``optimizer`` given (see :mod:`hlbd_fast.schedules`).

    Use it as a context manager (``with FastTrainer(...) as trainer:``), or call
    :meth:`close`, to stop worker processes and free captured graphs when done. A strategy
    instance serves one trainer at a time.

    Attributes:
        roles: the one object per role (:class:`~hlbd_fast.strategies.base.Roles`).
        known_lengths: the host-known lengths of the batch in hand (:class:`~hlbd_fast.batches.KnownLengths`).
        history: the :class:`~hlbd_fast.history.History` of every epoch so far.
        loss_reads / loss_read_seconds: host syncs spent reading the running loss, and their time.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        strategies: Sequence[Strategy] | None = (),
        optimizer: torch.optim.Optimizer | None = None,
        lr: float = 5e-5,
        pad_id: int = 0,
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
        _refuse_forward_loss_override(type(self))
        self.model = model
        self.lr = float(lr)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.loss_normalization = loss_normalization
        self.progress = progress
        self.batch_size = batch_size
        self.history = History()
        self.epoch = 0  # completed epochs
        self.global_step = 0  # optimizer steps taken
        self.checkpoint_path: Path | None = None  # where fit's checkpoints go, when set
        self.loss_reads = 0  # host syncs spent reading the running figures back (all epochs)
        self.loss_read_seconds = 0.0  # wall seconds those reads took
        self.known_lengths = KnownLengths()  # host-known lengths of the batch in hand (no sync to trim it)
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
            self._build(model, optimizer, device, seed, pad_id, scheduler)
        except BaseException:
            self.close()  # a trainer that failed to build owns nothing
            raise

    def _build(self, model: nn.Module, optimizer: Any, device: Any, seed: int | None, pad_id: int, scheduler: Any) -> None:
        """Roles, device, the declarations' check, set-up, wrapping, optimizer and schedule."""
        self.roles, problems = resolve_roles(self.strategies, optimizer)
        _check_forward_override(type(self), self.roles)
        self.device = self.roles.distribution.resolve_device(_default_device(model, device))
        model.to(self.device)
        problems += check_strategies(self._setup_order(), Context(model, self.device))
        if problems:
            raise StrategyConflictError("these strategies cannot train together:\n- " + "\n- ".join(problems))
        self.seed = _seed(seed)
        self.vocab_size = infer_vocab_size(model)
        self.pad_id = check_pad_id(pad_id, self.vocab_size)
        for s in self._setup_order():
            s.setup(self)
        wrapped = model
        for s in sorted(self.strategies, key=lambda s: s.order):
            wrapped = s.wrap_model(self, wrapped)
        self.train_model: nn.Module = wrapped  # what the loop calls; ``self.model`` holds the weights
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no trainable parameters (all requires_grad=False)")
        self.optimizer = self.roles.optimizer.build_optimizer(self, self.params)
        self.scheduler = resolve_scheduler(scheduler, self.optimizer)
        self.meter = EpochMeter(self.device)

    def _setup_order(self) -> list[Strategy]:
        """Roles first, in role order (the distribution decides the device others see); then the rest as given."""
        by_role = [getattr(self.roles, name) for name in ROLES]
        return by_role + [s for s in self.strategies if s.role is None]

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

        preset = resolve_preset(preset, _default_device(model, kwargs.get("device")), model)
        return cls(model, **preset.trainer_kwargs(**kwargs))

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Release what the strategies started (worker processes, captured graphs) and their ownership.

        Idempotent. ``with FastTrainer(...) as trainer:`` calls it on every exit path. A
        closed trainer refuses to train or evaluate; its strategies may serve a new one.
        """
        if self._closed:
            return
        self._closed = True
        roles = getattr(self, "roles", None)
        owned = list(self.strategies) + [s for s in (roles or ()) if all(s is not t for t in self.strategies)]
        try:
            for s in owned:
                s.close()
        finally:
            for s in self.strategies:
                release(s, self)

    def __enter__(self) -> "FastTrainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"FastTrainer.{what}: this trainer was closed; build a new FastTrainer (with fresh strategies)")

    def reports(self) -> dict[str, Any]:
        """Every strategy's :meth:`~hlbd_fast.strategies.Strategy.report` that has one, by class name."""
        out: dict[str, Any] = {}
        for s in self._setup_order():
            report = s.report()
            if report is not None:
                name = type(s).__name__
                out[name if name not in out else f"{name}#{sum(k.split('#')[0] == name for k in out) + 1}"] = report
        return out

    # ------------------------------------------------------------------ the forward
    def forward_logits(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of one batch at the positions the loss scores, and their targets.

        The one seam for the forward: training (with ``model`` the wrapped training model),
        :meth:`evaluate` and ``fit(eval_data=...)`` (with the plain model, in eval mode), the
        doctor and ``tune`` all call it; the token loss, the token count and the accuracy
        follow from ``(logits [..., V], targets [...])`` and ``pad_id``. Default: the
        ``forward`` role, ``model(src, tgt[:, :-1])`` against ``tgt[:, 1:]``.

        Override it for other model signatures or batch formats (a dict batch), and
        override :meth:`count_tokens` too (the step divides its loss by the count before
        running the forwards); check such batches in :meth:`to_device` with
        :meth:`validate_tensors`.
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
                by it, bit for bit.
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
        check_positive_int("epochs", epochs)
        check_positive_int("checkpoint_every", checkpoint_every)
        check_bool("resume", resume)
        source = self.make_source(data, batch_size, shuffle)
        plan = EvalPlan.make(self, eval_data, eval_every, keep_best, checkpoint_dir, epochs)
        self._open_checkpoints(checkpoint_dir, resume)
        self._check_resume_matches(source)
        self._stop_requested = False
        self._eval_plan = plan
        try:
            with ctrl_c_requests_stop(self), self._scopes("run"):
                while self.epoch < epochs and not self._stop_requested:
                    record = self._run_epoch(source, epochs)
                    if record is None or self.checkpoint_path is None:
                        continue
                    plan.keep_if_best(self, record)  # first: last.pt then carries the new best record
                    if self.epoch % checkpoint_every == 0 or self.epoch == epochs or self._stop_requested:
                        self.save(self.checkpoint_path)
        finally:
            self._eval_plan = None
        return self.history

    def evaluate(self, data: Any, batch_size: int | None = None, generate: bool = False) -> dict[str, float]:
        """Loss and token accuracy (and, with ``generate=True``, exact match) of the model on ``data``.

        In eval mode, without gradients, under the trainer's precision, with the averaged
        weights when :class:`~hlbd_fast.strategies.EMA` is on; the model's mode, weights and
        every RNG are left as they were. One host sync (more with ``generate=True``). See
        :func:`hlbd_fast.evaluation.evaluate`.
        """
        self._check_open("evaluate")
        check_bool("generate", generate)
        return evaluate(self, data, batch_size, generate)

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
            figures = self.read_figures()  # the epoch's one sync
        seconds = time.perf_counter() - t0
        if stopped_early:
            if self.checkpoint_path is not None:
                self._write(self.checkpoint_path, mid_epoch=True)
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
        """Reset the figures, or restore them and fast-forward the batches of a mid-epoch resume."""
        if resume is None:
            self.meter.reset()
            self._epoch_state = {"start_rng": rng_state(), "micro": 0, "steps": 0}
            return 0
        skip = int(resume["micro_batch_in_epoch"])
        set_rng_state(resume["epoch_start_rng"])  # same batch order, same RNG stream as the interrupted run
        for _ in itertools.islice(batches, skip):
            pass  # re-fetching draws what the interrupted run drew
        set_rng_state(resume["rng"])
        self.meter.load_state_dict(resume["meter"])
        self._epoch_state = {"start_rng": resume["epoch_start_rng"], "micro": skip, "steps": int(resume.get("steps_in_epoch", 0))}
        return skip

    def _finish_epoch(self, epoch: int, figures: Figures, seconds: float) -> EpochRecord:
        state = self._epoch_state
        record = EpochRecord.from_figures(epoch + 1, figures, seconds, steps=state["steps"], micro_batches=state["micro"])
        record.lr = _current_lr(self.optimizer)
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

    # ------------------------------------------------------------------ stopping
    def request_stop(self) -> None:
        """Stop ``fit`` after the current optimizer step (a checkpoint is written if configured)."""
        self._stop_requested = True

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The whole training state: model, optimizer, strategies, counters, RNG states, history."""
        return trainer_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (or a checkpoint's state): checked whole before anything is applied.

        Raises:
            CheckpointError: it does not fit this trainer (model shapes, optimizer class,
                accumulation, loss normalisation, stateful strategies); nothing was changed.
        """
        self._apply(state, None)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a checkpoint atomically (with a checksum); never one holding non-finite weights."""
        self._write(Path(path), mid_epoch=False)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore a checkpoint written by :meth:`save` (or by ``fit``); see :meth:`load_state_dict`."""
        path = Path(path)
        self._apply(read_checkpoint(path), path)

    def _apply(self, state: dict[str, Any], path: Path | None) -> None:
        mid = apply_trainer_state(self, state, path)
        self._resume = None if mid is None else {"rng": state["rng"], **mid}

    def _write(self, path: Path, mid_epoch: bool) -> None:
        mid = None
        if mid_epoch:
            self.read_figures()  # never checkpoint after a non-finite loss or gradient (a collective under DDP)
            mid = mid_epoch_state(self, self._epoch_state)
        if self.roles.distribution.is_main:  # one process writes
            write_trainer_checkpoint(self, path, mid)

    def _open_checkpoints(self, checkpoint_dir: str | os.PathLike[str] | None, resume: bool) -> None:
        if checkpoint_dir is None:
            if resume:
                raise ValueError("resume=True needs checkpoint_dir=... to find last.pt in")
            return
        self.checkpoint_path = check_writable_dir(checkpoint_dir, "checkpoint_dir") / CHECKPOINT_NAME
        check_checkpoint_files(self.checkpoint_path.parent, (CHECKPOINT_NAME, BEST_NAME))
        if resume and self.checkpoint_path.exists():
            self.load(self.checkpoint_path)

    def _check_resume_matches(self, source: DataSource) -> None:
        if self._resume is not None:
            check_resume(self._resume, source, self.roles.distribution)


# ---------------------------------------------------------------------------- helpers
def _default_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is None:
        p = next(itertools.chain(model.parameters(), model.buffers()), None)
        return p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available here; use device='cpu'")
    return device


def _seed(seed: int | None) -> int:
    if seed is None:
        # follows torch.manual_seed without drawing from the RNG (dropout streams stay as they were)
        return torch.initial_seed() % (2**62)
    torch.manual_seed(seed)
    return int(seed)


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


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    lr = optimizer.param_groups[0].get("lr", float("nan"))
    return float(lr)  # a tensor lr (CUDA graphs): one read at the epoch's end


def _check_forward_override(cls: type, roles: Roles) -> None:
    """A subclass that runs the model itself and a strategy that replaces the forward cannot both act."""
    if cls.forward_logits is not FastTrainer.forward_logits and type(roles.forward).logits is not Forward.logits:
        raise StrategyConflictError(
            f"{cls.__name__}.forward_logits runs the model itself, so {roles.forward!r}, which replaces the model's "
            "forward and the loss positions, would never run; drop the strategy, or return "
            "super().forward_logits(model, batch) for the batches it can run"
        )


def _refuse_forward_loss_override(cls: type) -> None:
    """``forward_loss`` is built on ``forward_logits``; overriding it would leave evaluation on the other seam."""
    if cls.forward_loss is not FastTrainer.forward_loss:
        raise TypeError(
            f"{cls.__name__} overrides forward_loss; override forward_logits(self, model, batch) -> (logits, targets) "
            "instead (and count_tokens for other batch formats): training, evaluate, fit(eval_data=...), the doctor "
            "and tune all call it, and the token loss and accuracy follow from it"
        )
