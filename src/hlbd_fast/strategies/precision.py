"""MixedPrecision: autocast forward and loss in bf16 or fp16; fp16 with one GradScaler per run.

The plain functions below are the same logic for a hand-written loop::

    dtype = resolve_dtype("auto", device)                  # "bf16", "fp16" or "fp32" (autocast off)
    scaler = make_grad_scaler(device) if dtype == "fp16" else None   # once, before the epochs
    ...
    with autocast_context(device, dtype):
        loss = criterion(model(src, tgt_in), tgt_out)
    if scaler is None:                                     # bf16: the plain step
        loss.backward(); clip_grad_norm_(model.parameters(), 1.0); optimizer.step()
    else:                                                  # fp16
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        clip_grad_norm_(model.parameters(), 1.0)
        skipped = scaler_step(scaler, optimizer)           # 0-d bool tensor, stays on the device
    optimizer.zero_grad(set_to_none=True)

``find_gradient_hooks(model)`` lists the hooks that would see scaled fp16 gradients.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager

import torch
from torch import nn

from .._validation import check_number, check_positive_int
from .base import Precision
from .needs import Capability, Computes, Context, Declaration, Need

if TYPE_CHECKING:  # pragma: no cover
    from ..history import EpochRecord
    from ..trainer import FastTrainer

__all__ = [
    "MixedPrecision",
    "PrecisionReport",
    "PRECISIONS",
    "resolve_dtype",
    "cpu_has_native_bf16",
    "autocast_context",
    "make_grad_scaler",
    "scaler_step",
    "find_gradient_hooks",
]

#: The ``dtype`` values :class:`MixedPrecision` accepts.
PRECISIONS: tuple[str, ...] = ("bf16", "fp16", "auto")
_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: What "auto" resolves to where no reduced precision pays: autocast off.
_FP32 = "fp32"

#: An epoch that skips more than this fraction of its steps (and at least
#: ``_SKIP_WARN_MIN`` of them) draws a warning. A healthy run skips a few steps while the
#: scaler calibrates its first scale (each such skip halves it; those are not counted),
#: then about one per ``growth_interval`` steps.
_SKIP_WARN_FRACTION = 0.25
_SKIP_WARN_MIN = 5
#: A loss scale below this means the gradients overflow even unscaled: fp16 cannot hold them.
_COLLAPSED_SCALE = 1.0


# ---------------------------------------------------------------------------- functions
def _cuda_bf16(device: torch.device, including_emulation: bool) -> bool:
    """Whether the CUDA ``device`` runs bf16 (natively, or also emulated)."""
    with torch.cuda.device(device):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=including_emulation))
        except TypeError:  # older torch: no emulation argument
            return bool(torch.cuda.is_bf16_supported())


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles).

    Without either, CPU bf16 matmuls are emulated: on an AVX2-only machine a bf16
    ``linear`` of the reference model's size measured 9x slower than fp32.
    """
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if callable(check))


def resolve_dtype(dtype: str, device: str | torch.device) -> str:
    """The precision ``dtype`` ("bf16", "fp16" or "auto") means on ``device``: "bf16", "fp16" or "fp32".

    ``"auto"`` is bf16 on CUDA devices that support it natively, fp16 on other CUDA
    devices, bf16 on CPUs with native bf16 (:func:`cpu_has_native_bf16`), and "fp32"
    (autocast off) on other CPUs, where bf16 would be emulated and slower than fp32.

    Raises:
        ValueError: an unknown ``dtype``; fp16 on the CPU (use "bf16"); bf16 on a CUDA
            device without bf16 support (use "fp16").
    """
    if dtype not in PRECISIONS:
        raise ValueError(f"dtype={dtype!r} is not one of {PRECISIONS}; use 'bf16', 'fp16' or 'auto'")
    device = torch.device(device)
    if dtype == "auto":
        if device.type == "cuda":
            return "bf16" if _cuda_bf16(device, including_emulation=False) else "fp16"
        return "bf16" if cpu_has_native_bf16() else _FP32
    if dtype == "fp16" and device.type == "cpu":
        raise ValueError(
            "MixedPrecision(dtype='fp16') on the cpu: CPU autocast is meant for bf16 and fp16 needs a GradScaler "
            "there for nothing; use MixedPrecision('bf16') (or 'auto') on the cpu"
        )
    if dtype == "bf16" and device.type == "cuda" and not _cuda_bf16(device, including_emulation=True):
        raise ValueError(
            f"MixedPrecision(dtype='bf16'): the CUDA device {device} does not support bfloat16; use MixedPrecision('fp16') or MixedPrecision('auto')"
        )
    return dtype


def autocast_context(device: str | torch.device, dtype: str) -> ContextManager[Any]:
    """``torch.autocast`` for ``device`` in ``dtype`` ("bf16"/"fp16"; "auto" is resolved first)."""
    device = torch.device(device)
    resolved = resolve_dtype(dtype, device)
    if resolved == _FP32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_TORCH_DTYPE[resolved])


def make_grad_scaler(device: str | torch.device, init_scale: float = 2.0**16, growth_interval: int = 2000) -> torch.amp.GradScaler:
    """A :class:`torch.amp.GradScaler` for fp16 training on ``device``: create ONE per run.

    A scaler created anew (every epoch, say) forgets the scale it found and starts again
    from ``init_scale``, skipping steps and never settling.
    """
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, init_scale=init_scale, growth_interval=growth_interval)


def scaler_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """``scaler.step(optimizer)`` then ``scaler.update()``; return whether the step was skipped.

    The answer is a 0-d bool tensor on the parameters' device, computed there from the
    loss scale before and after ``update()`` (public ``scaler.scale``, no host read), so
    returning it adds no host-device sync. (``GradScaler.step`` itself reads its inf/NaN
    check back on the host before stepping a non-fused optimizer; a fused one, such as
    :class:`~hlbd_fast.strategies.optim.FusedAdamW` on CUDA, skips on the device without
    that sync.)
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    one = torch.ones((), device=params[0].device if params else None)
    before = scaler.scale(one)  # the loss scale now, as a new tensor on the device (a disabled scaler: 1)
    scaler.step(optimizer)
    scaler.update()
    after = scaler.scale(one)
    # update() multiplies the scale by backoff_factor (< 1, GradScaler requires it) exactly when the step found
    # inf/NaN gradients and skipped; otherwise it keeps the scale or grows it (only to a finite value). A scale of
    # 0 or inf/NaN makes every gradient non-finite after unscaling: every such step is skipped.
    return (after < before) | (before == 0) | ~torch.isfinite(before)


def find_gradient_hooks(model: nn.Module) -> list[str]:
    """Describe every gradient hook visible on ``model``: one string per hook owner.

    Finds hooks on parameters (``Tensor.register_hook``,
    ``register_post_accumulate_grad_hook``), module backward hooks
    (``register_full_backward_hook``, ``register_full_backward_pre_hook``) and global
    module backward hooks. Hooks on intermediate tensors created inside ``forward``
    cannot be seen before they run.
    """
    found: list[str] = []
    for name, p in model.named_parameters():
        kinds = []
        if getattr(p, "_backward_hooks", None):
            kinds.append("register_hook")
        if getattr(p, "_post_accumulate_grad_hooks", None):
            kinds.append("register_post_accumulate_grad_hook")
        if kinds:
            found.append(f"parameter '{name}' ({', '.join(kinds)})")
    for name, m in model.named_modules():
        kinds = []
        if getattr(m, "_backward_hooks", None):
            kinds.append("backward hook")
        if getattr(m, "_backward_pre_hooks", None):
            kinds.append("backward pre-hook")
        if kinds:
            found.append(f"module '{name or type(m).__name__}' ({', '.join(kinds)})")
    from torch.nn.modules import module as _module

    if getattr(_module, "_global_backward_hooks", None) or getattr(_module, "_global_backward_pre_hooks", None):
        found.append("a global module backward hook (torch.nn.modules.module.register_module_full_backward_hook)")
    return found


# ---------------------------------------------------------------------------- strategy
@dataclass(frozen=True)
class PrecisionReport:
    """What :class:`MixedPrecision` asked for and what it uses on the trainer's device."""

    dtype: str  # asked for: "bf16", "fp16" or "auto"
    precision: str  # used: "bf16", "fp16" or "fp32" (autocast off)


class MixedPrecision(Precision):
    """Run forward and loss under autocast in bf16 or fp16 (role ``precision``).

    * ``"bf16"``: autocast only. bf16 has fp32's exponent range, so gradients do not
      overflow and no scaler is needed: backward and the step are the plain loop's.
    * ``"fp16"`` (CUDA only): autocast plus ONE :class:`torch.amp.GradScaler` created in
      ``setup`` for the whole run and saved in checkpoints: the backward is scaled, the
      gradients are unscaled before clipping, and ``scaler.step`` + ``scaler.update``
      step the optimizer, reporting skipped steps on the device; they appear as
      ``EpochRecord.skipped_steps``. Each epoch's final scale is ``record.extra["loss_scale"]``.
    * ``"auto"``: bf16 on CUDA devices that support it natively, fp16 on other CUDA
      devices, bf16 on CPUs with native bf16 (AVX512-BF16 or AMX), and fp32 (autocast
      off, said once in the log) on other CPUs, where emulated bf16 is slower than fp32.
      Explicit ``"bf16"`` on such a CPU warns once.

    The dtype actually used depends on the trainer's device, so it is resolved in
    :meth:`setup`: ``dtype`` keeps what was asked, ``resolved`` what is used, and
    :meth:`report` gives both.

    Not bit-exact: autocast rounds matmul inputs to 8 (bf16) or 11 (fp16) mantissa
    bits. The tests bound the final loss against fp32 from the same weights and order.

    Fails loudly: fp16 on the CPU is a ``ValueError``; under fp16, gradient hooks on the
    model draw a warning naming them (they see scaled gradients, and a hook that zeroes
    inf/NaN hides overflows from the scaler, which then never backs off); an epoch that
    skips many steps, or a scale that collapsed below 1, draws a warning.

    Args:
        dtype: ``"bf16"``, ``"fp16"`` or ``"auto"``.
        init_scale: fp16 only: the scaler's first loss scale.
        growth_interval: fp16 only: steps without overflow before the scale doubles.
    """

    def __init__(self, dtype: str = "auto", *, init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        if dtype not in PRECISIONS:
            raise ValueError(f"MixedPrecision(dtype={dtype!r}): dtype must be one of {PRECISIONS}, e.g. MixedPrecision('bf16')")
        self.dtype = dtype
        self.resolved: str | None = None  # "bf16", "fp16" or "fp32" (auto, autocast off), set by setup()
        self.init_scale = check_number("init_scale", init_scale, "MixedPrecision", hint=", e.g. 2.0**16")
        self.growth_interval = check_positive_int("growth_interval", growth_interval, "MixedPrecision", hint=", e.g. 2000")
        self._device: torch.device | None = None
        self._scaler: torch.amp.GradScaler | None = None
        self._warned: set[str] = set()
        self._hooks_checked_at_fit = False
        self._calibrating = True  # the run's first epoch from init_scale: its back-offs are expected

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The run's GradScaler (fp16), or ``None`` (bf16, or before ``setup``)."""
        return self._scaler

    def declare(self, context: Context) -> Declaration:
        """Lower precision (fp32 where ``"auto"`` keeps it); under fp16 the host decides whether to step."""
        resolved = resolve_dtype(self.dtype, context.device)
        provides: tuple[Need, ...] = ()
        if resolved == "fp16":
            why = "fp16's GradScaler reads the gradients back and decides on the host whether the optimizer steps"
            provides = (Need(Capability.HOST_STEP_DECISION, why),)
        return Declaration(provides=provides, computes=Computes.EXACT if resolved == _FP32 else Computes.PRECISION)

    def report(self) -> "PrecisionReport | None":
        """The dtype asked for and the one used (``None`` before the trainer is built)."""
        return None if self.resolved is None else PrecisionReport(self.dtype, self.resolved)

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: "FastTrainer") -> None:
        """Resolve the dtype on the trainer's device; under fp16 create the run's one scaler."""
        resolved = resolve_dtype(self.dtype, trainer.device)
        self.resolved = resolved
        self._device = trainer.device
        self._warned = set()
        self._hooks_checked_at_fit = False
        self._calibrating = True
        # one scaler for the whole run: a new one per epoch would forget the scale it found
        self._scaler = make_grad_scaler(trainer.device, self.init_scale, self.growth_interval) if resolved == "fp16" else None
        if resolved == _FP32:
            logging.getLogger("hlbd_fast").info(
                "MixedPrecision('auto'): this CPU has no native bf16 (AVX512-BF16/AMX); bf16 would be emulated and slower than fp32, so autocast stays off"
            )
        elif resolved == "bf16" and trainer.device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn(
                "MixedPrecision('bf16') on a CPU without native bf16 (no AVX512-BF16/AMX): bf16 matmuls are emulated "
                "and run several times slower than fp32 here; use MixedPrecision('auto'), which keeps fp32 on such CPUs",
                RuntimeWarning,
                stacklevel=2,
            )
        if self._scaler is not None:
            self._warn_hooks(trainer.model)

    def _warn_hooks(self, model: nn.Module) -> None:
        hooks = [h for h in find_gradient_hooks(model) if h not in self._warned]
        if not hooks:
            return
        self._warned.update(hooks)
        warnings.warn(
            f"MixedPrecision('fp16'): gradient hooks found on {'; '.join(hooks)}. Under fp16 they see gradients "
            f"multiplied by the loss scale (starting at {self.init_scale:g}), and a hook that replaces inf/NaN "
            "gradients hides overflows from the GradScaler, which then never lowers its scale nor skips a bad step. "
            "Remove these hooks, make them divide by the scale, or use MixedPrecision('bf16'), which needs no scaler",
            RuntimeWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------ the step
    def forward_context(self, trainer: "FastTrainer") -> ContextManager[Any]:
        """Autocast in the resolved dtype on the trainer's device."""
        if self.resolved is None or self._device is None:
            raise RuntimeError(f"{self!r} is used before setup(trainer); pass it to FastTrainer(strategies=[...])")
        if self.resolved == _FP32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self._device.type, dtype=_TORCH_DTYPE[self.resolved])

    def backward(self, trainer: "FastTrainer", loss: torch.Tensor) -> None:
        """fp16: backward of the scaled loss; otherwise the plain backward."""
        if self._scaler is not None:
            self._scaler.scale(loss).backward()
        else:
            loss.backward()

    def unscale_gradients(self, trainer: "FastTrainer") -> None:
        """fp16: unscale the gradients in place, so clipping sees their true norm."""
        if self._scaler is not None:
            self._scaler.unscale_(trainer.optimizer)

    def optimizer_step(self, trainer: "FastTrainer") -> torch.Tensor | bool:
        """fp16: ``scaler.step`` + ``scaler.update``; the skipped flag stays on the device."""
        if self._scaler is not None:
            return scaler_step(self._scaler, trainer.optimizer)
        trainer.optimizer.step()
        return False

    # ------------------------------------------------------------------ bookkeeping
    def on_epoch_start(self, trainer: "FastTrainer", epoch: int) -> None:
        """fp16: look for gradient hooks added after the trainer was built (once per run)."""
        if self._scaler is not None and not self._hooks_checked_at_fit:
            self._hooks_checked_at_fit = True
            self._warn_hooks(trainer.model)

    def on_epoch_end(self, trainer: "FastTrainer", record: "EpochRecord") -> None:
        """fp16: record the loss scale; warn once when many steps skip or the scale collapsed."""
        if self._scaler is None:
            return
        scale = self._scaler.get_scale()  # host sync: one read per epoch, after the epoch's own read-back
        record.extra["loss_scale"] = scale
        calibration = 0
        if self._calibrating:  # first epoch from init_scale: each calibration skip halved the scale once
            self._calibrating = False
            calibration = max(0, round(math.log2(self.init_scale / scale))) if scale > 0 else record.skipped_steps
        excess = record.skipped_steps - calibration
        steps = max(record.optimizer_steps, 1)
        if "skips" not in self._warned and excess >= _SKIP_WARN_MIN and excess / steps > _SKIP_WARN_FRACTION:
            self._warned.add("skips")
            warnings.warn(
                f"MixedPrecision('fp16'): epoch {record.epoch} skipped {record.skipped_steps} of "
                f"{record.optimizer_steps} optimizer steps because fp16 gradients overflowed (loss scale now {scale:g}). "
                "Those steps trained nothing. Use MixedPrecision('bf16') where the device supports it, lower lr, "
                "or keep max_grad_norm on",
                RuntimeWarning,
                stacklevel=2,
            )
        if "collapse" not in self._warned and scale < _COLLAPSED_SCALE:
            self._warned.add("collapse")
            warnings.warn(
                f"MixedPrecision('fp16'): the loss scale collapsed to {scale:g} (< {_COLLAPSED_SCALE:g}) by epoch "
                f"{record.epoch}: gradients overflow fp16 even unscaled, so most steps are skipped. "
                "Use MixedPrecision('bf16'), or look for a loss or activation that blows up",
                RuntimeWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """fp16: the scaler's state (scale, growth tracker); bf16: nothing."""
        if self._scaler is None:
            return {}
        return {"resolved": self.resolved, "scaler": self._scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the scaler's state into this run's scaler (fp16); bf16 ignores it."""
        if self._scaler is not None and state.get("scaler"):
            self._scaler.load_state_dict(state["scaler"])
            self._calibrating = False  # the saved scale was calibrated already
