"""FusedAdamW: AdamW updating all parameters in one fused kernel (or bitsandbytes' 8-bit AdamW).

As a plain function for a hand-written loop::

    optimizer = fused_adamw(model.parameters(), lr=5e-5)
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from .._validation import check_bool, check_number
from .base import OptimizerFactory

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import FastTrainer

__all__ = ["FusedAdamW", "fused_adamw"]

log = logging.getLogger("hlbd_fast")

_BNB_HINT = "pip install hlbd-fast[bnb]  (or: pip install bitsandbytes)"


def _import_bnb() -> Any:
    """bitsandbytes, or an ImportError saying how to install it."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as e:
        raise ImportError(
            f"FusedAdamW(eight_bit=True) needs bitsandbytes, which is not installed ({e}); {_BNB_HINT}, or use FusedAdamW() without eight_bit"
        ) from e


def _fused_supported(device: torch.device) -> bool:
    """Whether ``torch.optim.AdamW(fused=True)`` accepts parameters on ``device``."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return device.type in _get_fused_kernels_supported_devices()
    except ImportError:  # older torch: fused AdamW was CUDA-only
        return device.type == "cuda"


def fused_adamw(
    params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
    lr: float = 5e-5,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    capturable: bool = False,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with the fastest implementation the parameters' device has.

    ``fused=True`` where torch has a fused AdamW kernel for the device (CUDA; the CPU
    too in recent torch), else ``foreach=True`` (one multi-tensor kernel per operation),
    said once in the ``hlbd_fast`` log. Both compute AdamW's update; they differ from the
    per-parameter loop only by float rounding.

    Raises:
        ValueError: ``capturable=True`` for parameters that are not on a CUDA device.
    """
    params = list(params)
    first = params[0]["params"][0] if params and isinstance(params[0], dict) else (params[0] if params else None)
    device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    if capturable and device.type != "cuda":
        raise ValueError(f"FusedAdamW(capturable=True) is for capturing the step in a CUDA graph; the parameters are on {device}. Use capturable=False there")
    kwargs: dict[str, Any] = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if capturable:
        kwargs["capturable"] = True
    if _fused_supported(device):
        log.info("FusedAdamW: fused AdamW kernel on %s", device)
        return torch.optim.AdamW(params, fused=True, **kwargs)
    log.info("FusedAdamW: torch has no fused AdamW kernel for %s; using the foreach (multi-tensor) AdamW", device)
    return torch.optim.AdamW(params, foreach=True, **kwargs)


class FusedAdamW(OptimizerFactory):
    """Build the optimizer as AdamW with one fused kernel per step instead of a loop over parameters.

    Fills the ``optimizer`` role: ``torch.optim.AdamW(params, fused=True)`` on CUDA (and on
    the CPU where torch has the fused kernel), else the ``foreach`` implementation,
    said once in the ``hlbd_fast`` log. With the defaults (``weight_decay=0``) AdamW is
    Adam, so ``FusedAdamW()`` computes the plain loop's default ``Adam(lr)`` update, up
    to float rounding. A fused optimizer also lets an fp16 GradScaler skip overflowed
    steps on the device, without reading its inf check back on the host.

    ``eight_bit=True`` uses bitsandbytes' ``AdamW8bit`` (optimizer state in 8 bits:
    less memory, not the same numbers); bitsandbytes must be installed
    (``pip install hlbd-fast[bnb]``).

    Giving FastTrainer an ``optimizer=`` as well is a configuration error.

    Args:
        lr: learning rate; ``None`` uses the trainer's ``lr``.
        betas: Adam's moment decay rates.
        eps: Adam's denominator term.
        weight_decay: decoupled weight decay (0: plain Adam).
        eight_bit: bitsandbytes' 8-bit AdamW instead of torch's.
        capturable: keep the step count on the device so the step can be captured in a
            CUDA graph (CUDA only; not with ``eight_bit``).
    """

    def __init__(
        self,
        lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        eight_bit: bool = False,
        capturable: bool = False,
    ) -> None:
        owner = "FusedAdamW"
        if lr is not None:
            check_number("lr", lr, owner, hint=", or None to use the trainer's lr")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"FusedAdamW(betas={betas!r}): betas must be a pair (beta1, beta2), e.g. (0.9, 0.999)")
        for i, b in enumerate(betas):
            check_number(f"betas[{i}]", b, owner, low_inclusive=True, high=1.0, hint=", e.g. betas=(0.9, 0.999)")
        check_number("eps", eps, owner, hint=", e.g. 1e-8")
        check_number("weight_decay", weight_decay, owner, low_inclusive=True, hint=" (0 for plain Adam)")
        check_bool("eight_bit", eight_bit, owner)
        check_bool("capturable", capturable, owner)
        if eight_bit and capturable:
            raise ValueError("FusedAdamW(eight_bit=True, capturable=True): bitsandbytes' 8-bit AdamW cannot be captured; drop one of them")
        if eight_bit:
            _import_bnb()  # fail at construction, not when the trainer is half built
        self.lr = None if lr is None else float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.eight_bit = eight_bit
        self.capturable = capturable

    def build_optimizer(self, trainer: "FastTrainer", params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """AdamW over ``params``: fused, foreach, or bitsandbytes' 8-bit."""
        lr = trainer.lr if self.lr is None else self.lr
        if self.eight_bit:
            bnb = _import_bnb()
            log.info("FusedAdamW: bitsandbytes AdamW8bit")
            return bnb.optim.AdamW8bit(params, lr=lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)
        return fused_adamw(params, lr=lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay, capturable=self.capturable)
