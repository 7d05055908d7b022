"""FastTrainer: the plain seq2seq training loop, with speed-ups as pluggable strategies.

The loop reads top to bottom in :meth:`FastTrainer.train_epoch` and
:meth:`FastTrainer.default_train_step`; :mod:`hlbd_fast.strategies.base` draws where
each strategy hook is called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .history import EpochRecord, History
from .strategies.base import EXCLUSIVE_HOOKS, Strategy, StrategyConflictError

__all__ = ["FastTrainer", "DataSource", "EpochMeter", "NonFiniteLossError", "CHECKPOINT_NAME", "load_weights"]

log = logging.getLogger("hlbd_fast")

#: File name of the rolling checkpoint written in ``checkpoint_dir``.
CHECKPOINT_NAME = "last.pt"
_CHECKPOINT_FORMAT = "hlbd_fast.checkpoint/1"
_NORMALISATIONS = ("tokens", "micro_batch")
_BAR_REFRESH_S = 0.5  # the default bar reads the loss back at most this often


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""

    def __init__(self, message: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step


# ---------------------------------------------------------------------------- data
@dataclass
class DataSource:
    """The training data of a ``fit`` call, normalised; strategies read it in ``make_batches``.

    Exactly one of ``tensors``, ``dataset`` or ``loader`` is set.
    """

    tensors: tuple[torch.Tensor, torch.Tensor] | None  # (src [N, S], tgt [N, T]) integer tensors
    dataset: Dataset | None  # a map-style Dataset yielding (src, tgt) or custom items
    loader: DataLoader | None  # a DataLoader, used as it is
    batch_size: int  # micro-batch size (ignored for ``loader``)
    shuffle: bool  # shuffle each epoch (ignored for ``loader``)

    def __len__(self) -> int:
        """Number of samples (for a loader: of its dataset, when it has a length)."""
        if self.tensors is not None:
            return int(self.tensors[0].shape[0])
        ds = self.dataset if self.dataset is not None else self.loader.dataset  # type: ignore[union-attr]
        return len(ds)  # type: ignore[arg-type]

    def num_batches(self) -> int | None:
        """Micro-batches per epoch, when known."""
        if self.loader is not None:
            try:
                return len(self.loader)
            except TypeError:
                return None
        return math.ceil(len(self) / self.batch_size)


# ---------------------------------------------------------------------------- meter
class EpochMeter:
    """The epoch's running figures, kept on the device so reading them is the only sync.

    All updates are in place, so a captured CUDA graph can replay them.
    """

    # layout of ``values``: index -> meaning
    LOSS_SUM, TOKENS, MB_LOSS_SUM, EMPTY, SKIPPED, FIRST_BAD = range(6)

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.values = torch.zeros(6, dtype=torch.float64, device=device)
        self.step_index = torch.zeros((), dtype=torch.float64, device=device)  # global step, on device
        self.micro_batches = 0
        self.steps = 0
        self.reset()

    def reset(self) -> None:
        """Start a new epoch."""
        self.values.zero_()
        self.values[self.FIRST_BAD] = -1.0
        self.micro_batches = 0
        self.steps = 0

    def add_micro(self, loss_sum: torch.Tensor, n_tokens: torch.Tensor) -> None:
        """Add one micro-batch: its summed token loss and its non-pad token count."""
        loss_sum = loss_sum.detach().to(torch.float64)
        n = n_tokens.to(torch.float64)
        mean = loss_sum / n.clamp(min=1.0)
        upd = torch.stack([loss_sum, n, mean, (n == 0).to(torch.float64)])
        self.values[:4].add_(upd)
        bad = ~torch.isfinite(loss_sum)
        first = self.values[self.FIRST_BAD]
        self.values[self.FIRST_BAD].copy_(torch.where(bad & (first < 0), self.step_index, first))
        self.micro_batches += 1

    def add_step(self, skipped: torch.Tensor | bool) -> None:
        """Count one optimizer step; ``skipped`` may stay on the device."""
        if isinstance(skipped, torch.Tensor):
            self.values[self.SKIPPED].add_(skipped.to(self.values.dtype))
        elif skipped:
            self.values[self.SKIPPED].add_(1.0)
        self.step_index.add_(1.0)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "values": self.values.detach().cpu(),
            "step_index": self.step_index.detach().cpu(),
            "micro_batches": self.micro_batches,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values.copy_(state["values"])
        self.step_index.copy_(state["step_index"])
        self.micro_batches = int(state["micro_batches"])
        self.steps = int(state["steps"])


# ---------------------------------------------------------------------------- trainer
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
            signatures or batch formats: subclass and override :meth:`forward_loss`
            (and :meth:`count_tokens`).
        strategies: speed-ups, e.g. ``[GradientAccumulation(8), DeferredLossSync()]``.
        optimizer: used as given; default ``torch.optim.Adam(params, lr=lr)``.
        lr: learning rate of the default optimizer.
        pad_id: target id ignored by the loss.
        max_grad_norm: gradients are clipped to this norm before every step; ``None`` off.
        loss_normalization: ``"tokens"`` divides a step's summed token loss by the
            non-pad token count of the whole step, so micro-batch size and accumulation
            are pure speed knobs; ``"micro_batch"`` reproduces the classic loop: the mean
            per micro-batch, divided by the accumulation steps.
        device: where to train; default the model's device.
        seed: seeds the shuffling order, and torch's global RNG (dropout) once here.
        progress: show a tqdm bar per epoch.
        batch_size: default micro-batch size of :meth:`fit` and :meth:`train_epoch`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        strategies: Sequence[Strategy] = (),
        optimizer: torch.optim.Optimizer | None = None,
        lr: float = 5e-5,
        pad_id: int = 0,
        max_grad_norm: float | None = 1.0,
        loss_normalization: str = "tokens",
        device: str | torch.device | None = None,
        seed: int | None = None,
        progress: bool = True,
        batch_size: int = 32,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_normalization not in _NORMALISATIONS:
            raise ValueError(
                f"loss_normalization={loss_normalization!r} is not one of {_NORMALISATIONS}; "
                "use 'tokens' (exact under any batch split) or 'micro_batch' (the classic loop)"
            )
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr={lr!r} must be a positive number")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r} must be positive, or None to disable clipping")
        _check_positive_int("batch_size", batch_size)
        strategies = tuple(strategies)
        for s in strategies:
            if not isinstance(s, Strategy):
                raise TypeError(
                    f"strategies must be Strategy instances; got {s!r} ({type(s).__name__}). "
                    "Did you pass the class instead of an instance, e.g. GradientAccumulation instead of GradientAccumulation(8)?"
                )

        self.model = model
        self.strategies: tuple[Strategy, ...] = strategies
        self.lr = float(lr)
        self.pad_id = int(pad_id)
        self.max_grad_norm = max_grad_norm
        self.loss_normalization = loss_normalization
        self.progress = progress
        self.batch_size = batch_size
        self.non_blocking = False  # host-to-device copies; DeferredLossSync turns it on
        self.history = History()
        self.epoch = 0  # completed epochs
        self.global_step = 0  # optimizer steps taken
        self.checkpoint_path: Path | None = None  # where fit's checkpoints go, when set
        self.loss_reads = 0  # host syncs spent reading the running loss back (all epochs)
        self.writes_checkpoints = True  # False on processes that must not write (DDP: ranks other than 0)

        if device is None:
            p = next(itertools.chain(model.parameters(), model.buffers()), None)
            device = p.device if p is not None else torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but CUDA is not available here; use device='cpu'")
        model.to(self.device)

        if seed is None:
            # follows torch.manual_seed without drawing from the RNG (dropout streams stay as they were)
            seed = torch.initial_seed() % (2**62)
        else:
            torch.manual_seed(seed)
        self.seed = int(seed)

        self._owners = self._resolve_owners(strategies)
        if optimizer is not None and "build_optimizer" in self._owners:
            raise StrategyConflictError(
                f"an optimizer ({type(optimizer).__name__}) was given to FastTrainer and strategy "
                f"{self._owners['build_optimizer']!r} builds one too; keep one of them"
            )
        self.vocab_size = _infer_vocab_size(model)
        self._validated_device_batches = False  # the first device batch was checked (one sync)
        self._batches_prevalidated = False  # the data was checked whole; skip per-batch checks
        self._stop_requested = False
        self._resume: dict[str, Any] | None = None  # set by load() when resuming mid-epoch
        self._epoch_start_rng: torch.Tensor | None = None
        self._bar: Any = None
        self._last_read = 0.0

        for s in strategies:
            s.setup(self)
        wrapped = model
        for s in sorted(strategies, key=lambda s: s.order):
            wrapped = s.wrap_model(wrapped)
        self.train_model: nn.Module = wrapped  # what the loop calls; ``self.model`` holds the weights

        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no trainable parameters (all requires_grad=False)")
        if optimizer is None:
            owner = self._owners.get("build_optimizer")
            optimizer = owner.build_optimizer(self.params, self) if owner else torch.optim.Adam(self.params, lr=self.lr)
        else:
            mine = {id(p) for p in model.parameters()}
            theirs = [p for g in optimizer.param_groups for p in g["params"]]
            if not theirs or any(id(p) not in mine for p in theirs):
                raise ValueError(
                    "optimizer does not hold this model's parameters; build it from model.parameters() "
                    "after moving the model to its device"
                )
        self.optimizer = optimizer
        self.accumulation = int(self._owners["accumulation_steps"].accumulation_steps()) if "accumulation_steps" in self._owners else 1
        self.meter = EpochMeter(self.device)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_preset(cls, model: nn.Module, preset: Any, **kwargs: Any) -> "FastTrainer":
        """Build a trainer from a :class:`~hlbd_fast.presets.Preset` or a preset name.

        The preset supplies strategies, micro-batch size, loss normalisation and lr;
        keyword arguments override them (``strategies=`` is appended to the preset's).
        """
        from .presets import Preset, get_preset

        if not isinstance(preset, Preset):
            device = kwargs.get("device")
            if device is None:  # the trainer's own default: the model's device
                p = next(itertools.chain(model.parameters(), model.buffers()), None)
                device = p.device if p is not None else torch.device("cpu")
            preset = get_preset(preset, device=device)
        extra = tuple(kwargs.pop("strategies", ()))
        kwargs.setdefault("batch_size", preset.batch_size)
        kwargs.setdefault("loss_normalization", preset.loss_normalization)
        kwargs.setdefault("lr", preset.lr)
        return cls(model, strategies=tuple(preset.strategies) + extra, **kwargs)

    @staticmethod
    def _resolve_owners(strategies: Sequence[Strategy]) -> dict[str, Strategy]:
        owners: dict[str, Strategy] = {}
        for s in strategies:
            for hook in sorted(s.owned_hooks()):
                if hook not in EXCLUSIVE_HOOKS:
                    raise ValueError(f"{s!r} claims unknown hook {hook!r}; exclusive hooks are {EXCLUSIVE_HOOKS}")
                if hook in owners:
                    raise StrategyConflictError(
                        f"strategies {owners[hook]!r} and {s!r} both own the hook '{hook}'; keep one of them"
                    )
                owners[hook] = s
        return owners

    def owner(self, hook: str) -> Strategy | None:
        """The strategy that owns exclusive ``hook``, or ``None`` (the default runs)."""
        return self._owners.get(hook)

    def strategy(self, kind: type) -> Strategy | None:
        """The first strategy that is an instance of ``kind``, or ``None``."""
        return next((s for s in self.strategies if isinstance(s, kind)), None)

    # ------------------------------------------------------------------ the loss
    def forward_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward one micro-batch; return ``(summed token loss, non-pad token count)``.

        Override for other model signatures or batch formats (override
        :meth:`count_tokens` too). Both results are 0-d tensors on the device. Token ids
        are checked against the vocabulary only for ``(src, tgt)`` tuple batches; a
        subclass with another batch format checks its own (e.g. in :meth:`to_device`
        with :meth:`validate_tensors`).
        """
        src, tgt = batch[0], batch[1]
        tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
        logits = self.extract_logits(self.train_model(src, tgt_in), src, tgt_in)
        loss_sum = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1), ignore_index=self.pad_id, reduction="sum"
        )
        return loss_sum, self.count_tokens(batch)

    def count_tokens(self, batch: Any) -> torch.Tensor:
        """Non-pad target tokens of a micro-batch (0-d tensor on the device)."""
        return (batch[1][:, 1:] != self.pad_id).sum()

    def extract_logits(self, out: Any, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Pull ``[B, T, V]`` logits out of a model's output and check their shape (no sync)."""
        if isinstance(out, dict):
            if "logits" not in out:
                raise ValueError(f"model returned a dict without 'logits' (keys: {sorted(out)}); return the logits under 'logits'")
            out = out["logits"]
        elif isinstance(out, (tuple, list)):
            if not out:
                raise ValueError("model returned an empty tuple; return logits [B, T, V] first")
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"model must return logits [B, T, V]; it returned {type(out).__name__}")
        b, t = tgt_in.shape[0], tgt_in.shape[1]
        if out.dim() != 3 or out.shape[0] != b or out.shape[1] != t:
            raise ValueError(
                f"model returned shape {tuple(out.shape)}; expected logits [B, T, V] = [{b}, {t}, vocab] "
                "for model(src, tgt[:, :-1]). A model that returns [T, B, V] needs batch_first=True"
            )
        if not out.is_floating_point():
            raise ValueError(f"model returned {out.dtype} logits; expected floating point")
        return out

    def _normalise(self, loss_sum: torch.Tensor, n_tokens: torch.Tensor, step_tokens: torch.Tensor) -> torch.Tensor:
        if self.loss_normalization == "tokens":
            # only a zero count is replaced: a global_token_count owner may return a divisor below 1 (DDP: tokens / W)
            return loss_sum / torch.where(step_tokens > 0, step_tokens, torch.ones_like(step_tokens))
        # the classic loop: mean per micro-batch, divided by the accumulation steps
        return loss_sum / n_tokens.clamp(min=1) / self.accumulation

    # ------------------------------------------------------------------ the step
    def default_train_step(self, micro_batches: list[Any]) -> None:
        """One optimizer step over ``micro_batches``: the plain loop, hooks included."""
        local = torch.stack([self.count_tokens(b) for b in micro_batches]).sum()
        owner = self._owners.get("global_token_count")
        step_tokens = owner.global_token_count(local) if owner else local
        backward = self._owners.get("backward")
        last = len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            with contextlib.ExitStack() as micro:
                for s in self.strategies:
                    micro.enter_context(s.micro_step_context(i == last))
                with contextlib.ExitStack() as fwd:
                    for s in self.strategies:
                        fwd.enter_context(s.forward_context())
                    loss_sum, n_tokens = self.forward_loss(batch)
                    loss = self._normalise(loss_sum, n_tokens, step_tokens)
                if backward is not None:
                    backward.backward(loss)
                else:
                    loss.backward()
            self.meter.add_micro(loss_sum, n_tokens)
            self.maybe_read_loss("micro_batch")
        self.meter.add_step(self.clip_and_step())

    def clip_and_step(self) -> torch.Tensor | bool:
        """Unscale (strategies), clip, step the optimizer, clear gradients; return ``skipped``."""
        for s in self.strategies:
            s.before_clip(self.optimizer)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        owner = self._owners.get("optimizer_step")
        if owner is not None:
            skipped = owner.optimizer_step(self.optimizer)
        else:
            self.optimizer.step()
            skipped = False
        self.optimizer.zero_grad(set_to_none=True)
        return skipped

    # ------------------------------------------------------------------ data
    def make_source(self, data: Any, batch_size: int | None = None, shuffle: bool = True) -> DataSource:
        """Normalise ``data`` (tensors pair, Dataset or DataLoader) and check it."""
        batch_size = self.batch_size if batch_size is None else batch_size
        _check_positive_int("batch_size", batch_size)
        if isinstance(data, DataLoader):
            src = DataSource(None, None, data, batch_size, shuffle)
        elif isinstance(data, Dataset):
            src = DataSource(None, data, None, batch_size, shuffle)
        elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
            self.validate_tensors(data[0], data[1], where="data")
            src = DataSource((data[0], data[1]), None, None, batch_size, shuffle)
        else:
            raise TypeError(
                f"data must be a (src, tgt) pair of integer tensors, a Dataset or a DataLoader; got {type(data).__name__}"
            )
        try:
            n = len(src)
        except TypeError:
            n = None
        if n == 0:
            raise ValueError("data is empty: there is nothing to train on")
        return src

    def validate_tensors(self, src: Any, tgt: Any, where: str = "batch") -> None:
        """Check a ``(src, tgt)`` pair: 2-D integer tensors, same rows, ids in the vocabulary.

        Reads values, so call it on host tensors (or once) to avoid device syncs.
        """
        for name, t in (("src", src), ("tgt", tgt)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: {name} must be a tensor of token ids, got {type(t).__name__}")
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise TypeError(f"{where}: {name} has dtype {t.dtype}; token ids must be an integer tensor (use .long())")
            if t.dim() != 2:
                raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}; expected 2-D [batch, length]")
        if src.shape[0] != tgt.shape[0]:
            raise ValueError(f"{where}: src has {src.shape[0]} rows but tgt has {tgt.shape[0]}; they must pair up row by row")
        if tgt.shape[1] < 2:
            raise ValueError(
                f"{where}: tgt has length {tgt.shape[1]}; targets need at least 2 tokens "
                "(the model reads tgt[:, :-1] and predicts tgt[:, 1:]); add a bos token"
            )
        if src.numel() == 0 or tgt.numel() == 0:
            return
        for name, t in (("src", src), ("tgt", tgt)):
            lo, hi = int(t.min()), int(t.max())
            if lo < 0:
                raise ValueError(f"{where}: {name} holds token id {lo}; ids must be >= 0")
            if self.vocab_size is not None and hi >= self.vocab_size:
                raise ValueError(
                    f"{where}: {name} holds token id {hi} but the model's vocabulary has {self.vocab_size} ids; "
                    "build the model with a larger vocab_size or re-encode the data with its tokenizer"
                )

    def mark_batches_validated(self) -> None:
        """Batches come from data already validated on the host: skip the per-batch checks.

        A ``make_batches`` owner that checked its data once (``validate_tensors``) calls
        this, so no batch is checked again (on a device, that check would be a sync).
        """
        self._batches_prevalidated = True

    def to_device(self, batch: Any) -> Any:
        """Move a batch (tensor, tuple, list or dict of them) to the device; check host pairs first."""
        if self._batches_prevalidated:
            return _move(batch, self.device, self.non_blocking)
        if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor) and isinstance(batch[1], torch.Tensor):
            on_host = batch[0].device.type == "cpu" and batch[1].device.type == "cpu"
            if on_host or not self._validated_device_batches:
                # host tensors: free to check; device tensors: checked once (one sync)
                self.validate_tensors(batch[0], batch[1])
                self._validated_device_batches = self._validated_device_batches or not on_host
        return _move(batch, self.device, self.non_blocking)

    def epoch_order(self, n: int, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch``: a permutation on the host from (seed, epoch) alone."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63 - 1))
        return torch.randperm(n, generator=g)

    def host_batches(self, source: DataSource, epoch: int) -> Iterator[Any]:
        """The plain loop's micro-batches of one epoch, on the host (default ``make_batches``)."""
        if source.loader is not None:
            yield from source.loader
            return
        n = len(source)
        order = self.epoch_order(n, epoch) if source.shuffle else torch.arange(n)
        if source.tensors is not None:
            s, t = source.tensors
            for i in range(0, n, source.batch_size):
                idx = order[i : i + source.batch_size]
                yield s[idx], t[idx]
        else:
            yield from DataLoader(source.dataset, batch_size=source.batch_size, sampler=order.tolist())  # type: ignore[arg-type]

    def _epoch_batches(self, source: DataSource, epoch: int) -> Iterator[Any]:
        owner = self._owners.get("make_batches")
        if owner is None and source.tensors is not None:
            self._batches_prevalidated = True  # make_source checked the whole tensors once
        raw: Iterable[Any] = owner.make_batches(self, source, epoch) if owner else self.host_batches(source, epoch)
        for batch in raw:
            batch = self.to_device(batch)
            for s in self.strategies:
                batch = s.prepare_batch(batch)
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
    ) -> History:
        """Train until ``epochs`` epochs are complete (counting epochs already done).

        Args:
            data: ``(src, tgt)`` integer tensors ``[N, S]``/``[N, T]``, a Dataset of
                ``(src, tgt)`` items, or a DataLoader (used as it is).
            epochs: total epochs; a resumed trainer runs only the ones left.
            batch_size: micro-batch size; default the trainer's ``batch_size``.
            shuffle: reshuffle every epoch (order from ``seed`` and the epoch number).
            checkpoint_dir: write ``last.pt`` there every ``checkpoint_every`` epochs and
                when training is interrupted (Ctrl-C); writes are atomic.
            resume: load ``checkpoint_dir/last.pt`` first, when it exists.

        Returns:
            The trainer's :class:`History` (all epochs so far).

        Raises:
            NonFiniteLossError: the loss became NaN/inf; the last checkpoint is untouched.
            KeyboardInterrupt: after writing a checkpoint, when one is configured.
        """
        _check_positive_int("epochs", epochs)
        _check_positive_int("checkpoint_every", checkpoint_every)
        source = self.make_source(data, batch_size, shuffle)
        self._batches_prevalidated = False
        if checkpoint_dir is not None:
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            self.checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME
            if resume and self.checkpoint_path.exists():
                self.load(self.checkpoint_path)
        elif resume:
            raise ValueError("resume=True needs checkpoint_dir=... to find last.pt in")
        self._check_resume_matches(source)

        self._stop_requested = False
        with self._sigint_stops():
            try:
                while self.epoch < epochs and not self._stop_requested:
                    record = self._run_epoch(source, epochs)
                    if record is not None and self.checkpoint_path is not None and (
                        self.epoch % checkpoint_every == 0 or self.epoch == epochs or self._stop_requested
                    ):
                        self.save(self.checkpoint_path)
            finally:
                for s in self.strategies:
                    s.teardown(self)
        return self.history

    def train_epoch(self, data: Any, batch_size: int | None = None, shuffle: bool = True) -> float:
        """Train one epoch and return its mean loss: the drop-in for a hand-written ``train_epoch``.

        ``data`` as in :meth:`fit`; a DataLoader is used as it is.
        """
        source = self.make_source(data, batch_size, shuffle)
        self._batches_prevalidated = False
        self._stop_requested = False
        record = self._run_epoch(source, None)
        return record.loss if record is not None else float("nan")

    def _run_epoch(self, source: DataSource, total_epochs: int | None) -> EpochRecord | None:
        epoch = self.epoch
        resume, self._resume = self._resume, None
        self.train_model.train()
        if resume is None:
            self.meter.reset()
            self._epoch_start_rng = torch.get_rng_state()
            skip = 0
        else:  # mid-epoch resume: same batch order, same RNG stream as the interrupted run
            torch.set_rng_state(resume["epoch_start_rng"])
            self._epoch_start_rng = resume["epoch_start_rng"]
            skip = int(resume["micro_batch_in_epoch"])
        for s in self.strategies:
            s.on_epoch_start(self, epoch)

        t0 = time.perf_counter()
        batches: Iterator[Any] = self._epoch_batches(source, epoch)
        if resume is not None:
            batches = _advance(batches, skip)  # creating the iterator drew the loader's seed
            _set_rng_state(resume["rng"])
            self.meter.load_state_dict(resume["meter"])
        count = getattr(self._owners.get("make_batches"), "num_batches", None)  # a sharding owner knows its share
        total = count(source) if count is not None else source.num_batches()
        desc = f"epoch {epoch + 1}/{total_epochs}" if total_epochs else f"epoch {epoch + 1}"
        self._bar = tqdm(total=total, initial=skip, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True, unit="batch")
        self._last_read = time.perf_counter()
        step_owner = self._owners.get("train_step")
        stopped_early = False
        try:
            chunks = _chunks(batches, self.accumulation)
            for micro_batches in chunks:
                if step_owner is not None:
                    step_owner.train_step(self, micro_batches)
                else:
                    self.default_train_step(micro_batches)
                self.global_step += 1
                self._bar.update(len(micro_batches))
                for s in self.strategies:
                    s.on_step_end(self)
                self.maybe_read_loss("step")
                if self._stop_requested:
                    stopped_early = next(chunks, None) is not None  # anything left of this epoch?
                    break
        finally:
            self._bar.close()
        if self.meter.micro_batches == 0 and resume is None:
            raise ValueError("data yielded no batches this epoch; check the DataLoader or the data")
        figures = self._read_meter(epoch)  # the epoch's one sync
        seconds = time.perf_counter() - t0
        if stopped_early:
            if self.checkpoint_path is not None:
                self._save(self.checkpoint_path, mid_epoch=True)
            return None
        record = EpochRecord(
            epoch=epoch + 1,
            loss=figures["loss"],
            seconds=seconds,
            tokens_per_second=figures["tokens"] / seconds if seconds > 0 else 0.0,
            optimizer_steps=self.meter.steps,
            skipped_steps=int(figures["skipped"]),
            micro_batches=self.meter.micro_batches,
            empty_micro_batches=int(figures["empty"]),
            tokens=int(figures["tokens"]),
        )
        if record.empty_micro_batches:
            log.warning("epoch %d: %d micro-batches had only padding targets; they contributed nothing", record.epoch, record.empty_micro_batches)
        for s in self.strategies:
            s.on_epoch_end(self, record)
        self.history.records.append(record)
        self.epoch += 1
        return record

    def maybe_read_loss(self, event: str) -> None:
        """Read the running loss back for the bar if the sync policy says so (one host sync)."""
        owner = self._owners.get("should_sync_loss")
        if owner is not None:
            read = owner.should_sync_loss(self, event)
        else:  # default: at step ends, only when the bar would redraw
            # with a reduce_metrics owner each read is a collective that every process must make at the
            # same step; a clock differs between processes, so the default then reads at the epoch end only
            read = (
                event == "step"
                and self.progress
                and "reduce_metrics" not in self._owners
                and time.perf_counter() - self._last_read >= _BAR_REFRESH_S
            )
        if read:
            figures = self._read_meter(self.epoch)  # waits for the device, like loss.item()
            if self._bar is not None:
                self._bar.set_postfix(loss=f"{figures['loss']:.4f}", refresh=False)
            self._last_read = time.perf_counter()

    def _read_meter(self, epoch: int) -> dict[str, float]:
        values = self.meter.values
        owner = self._owners.get("reduce_metrics")
        if owner is not None:
            values = owner.reduce_metrics(values.clone())
        v = values.tolist()  # host sync: waits for the device
        self.loss_reads += 1
        m = EpochMeter
        if v[m.FIRST_BAD] >= 0:
            where = f"; the last checkpoint {self.checkpoint_path} is untouched" if self.checkpoint_path else ""
            step = int(v[m.FIRST_BAD]) + 1
            raise NonFiniteLossError(
                f"loss became NaN or inf at epoch {epoch + 1}, optimizer step {step} (counted over the run){where}. "
                "Lower lr, keep max_grad_norm on, or check the data for ids the model cannot embed",
                epoch=epoch + 1,
                step=step,
            )
        if self.loss_normalization == "tokens":
            loss = v[m.LOSS_SUM] / max(v[m.TOKENS], 1.0)
        else:
            loss = v[m.MB_LOSS_SUM] / max(self.meter.micro_batches, 1)
        return {"loss": loss, "tokens": v[m.TOKENS], "skipped": v[m.SKIPPED], "empty": v[m.EMPTY]}

    # ------------------------------------------------------------------ stopping
    def request_stop(self) -> None:
        """Stop ``fit`` after the current optimizer step (a checkpoint is written if configured)."""
        self._stop_requested = True

    @contextlib.contextmanager
    def _sigint_stops(self) -> Iterator[None]:
        """During fit, Ctrl-C finishes the step, writes a checkpoint, then raises KeyboardInterrupt."""
        if self.checkpoint_path is None or threading.current_thread() is not threading.main_thread():
            yield
            return
        interrupted = False

        def handler(signum: int, frame: Any) -> None:
            nonlocal interrupted
            if interrupted:  # a second Ctrl-C: stop at once
                raise KeyboardInterrupt
            interrupted = True
            self.request_stop()

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
        if interrupted:
            raise KeyboardInterrupt(f"training interrupted; checkpoint written to {self.checkpoint_path}")

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a checkpoint atomically: model, optimizer, strategies, counters, RNG states, history."""
        self._save(Path(path), mid_epoch=False)

    def _save(self, path: Path, mid_epoch: bool) -> None:
        if mid_epoch:
            self._read_meter(self.epoch)  # never checkpoint weights after a non-finite loss
        if not self.writes_checkpoints:
            return  # another process writes it (every process still made the read above: a collective under DDP)
        state: dict[str, Any] = {
            "format": _CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "strategies": [{"type": type(s).__name__, "state": s.state_dict()} for s in self.strategies],
            "epoch": self.epoch,
            "global_step": self.global_step,
            "seed": self.seed,
            "loss_normalization": self.loss_normalization,
            "rng": _get_rng_state(),
            "history": self.history.to_dict(),
            "model_config": _model_config(self.model),
            "mid_epoch": None,
        }
        if mid_epoch:
            state["mid_epoch"] = {
                "micro_batch_in_epoch": self.meter.micro_batches,
                "meter": self.meter.state_dict(),
                "epoch_start_rng": self._epoch_start_rng,
            }
        _atomic_save(state, path)
        log.info("checkpoint written to %s (epoch %d, step %d)", path, self.epoch, self.global_step)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore a checkpoint written by :meth:`save` (or by ``fit``) into this trainer.

        The trainer must be built like the one that saved it (same strategies, in order).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            raise ValueError(f"checkpoint {path} could not be read ({e}); it is not a hlbd_fast checkpoint or is damaged") from e
        if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint {path} is not a hlbd_fast checkpoint (format {state.get('format') if isinstance(state, dict) else None!r})")
        # strategy states are matched by type and position among strategies of that type;
        # a strategy without state (a logger, a sync policy) may be added or dropped
        mine: dict[str, list[Strategy]] = {}
        for s in self.strategies:
            mine.setdefault(type(s).__name__, []).append(s)
        seen: dict[str, int] = {}
        pending = []
        for entry in state["strategies"]:
            k = seen[entry["type"]] = seen.get(entry["type"], -1) + 1
            if not entry["state"]:
                continue
            candidates = mine.get(entry["type"], [])
            if k >= len(candidates):
                saved = [e["type"] for e in state["strategies"]]
                raise ValueError(
                    f"checkpoint {path} holds the state of strategy {entry['type']} but this trainer has none "
                    f"(saved with {saved}, now {[type(s).__name__ for s in self.strategies]}); "
                    "build the trainer with the same strategies"
                )
            pending.append((candidates[k], entry["state"]))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for strategy, st in pending:
            strategy.load_state_dict(st)
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.seed = int(state["seed"])
        self.history = History.from_dict(state["history"])
        self.meter.step_index.fill_(float(self.global_step))
        _set_rng_state(state["rng"])
        mid = state.get("mid_epoch")
        self._resume = None if mid is None else {**mid, "rng": state["rng"]}

    def _check_resume_matches(self, source: DataSource) -> None:
        if self._resume is not None and source.loader is None and source.num_batches() is not None:
            if self._resume["micro_batch_in_epoch"] > (source.num_batches() or 0):
                raise ValueError("the checkpoint stopped mid-epoch further in than this data has batches; resume with the same data and batch_size")


# ---------------------------------------------------------------------------- helpers
def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Load only the model weights of a checkpoint into ``model`` (inference; no trainer needed).

    Returns the model configuration stored with the checkpoint (``model.config`` as a dict,
    when the model had a dataclass ``config``), or ``None``. Touches no RNG state.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a hlbd_fast checkpoint")
    model.load_state_dict(state["model"])
    return state.get("model_config")


def _model_config(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "config", None)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type) else None


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")


def _infer_vocab_size(model: nn.Module) -> int | None:
    """The model's vocabulary: ``model.vocab_size``, else its largest embedding table."""
    v = getattr(model, "vocab_size", None)
    if isinstance(v, int):
        return v
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(sizes) if sizes else None


def _move(batch: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: _move(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_move(v, device, non_blocking) for v in batch) if not hasattr(batch, "_fields") else type(batch)(*(_move(v, device, non_blocking) for v in batch))
    return batch


def _chunks(it: Iterable[Any], k: int) -> Iterator[list[Any]]:
    it = iter(it)
    while chunk := list(itertools.islice(it, k)):
        yield chunk


def _advance(it: Iterator[Any], n: int) -> Iterator[Any]:
    for _ in range(n):
        next(it, None)
    return it


def _get_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "python_gauss": random.getstate()[2],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[-1], tuple(py[:-1]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file beside ``path``, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
