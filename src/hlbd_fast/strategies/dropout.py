"""FastDropout: CPU dropout masks drawn from the same generator with fewer random draws.

On a CPU, torch's dropout (``F.dropout``, ``nn.Dropout``, and ``dropout_p`` of
``F.scaled_dot_product_attention``) draws its mask with ``bernoulli_(1 - p)``. Where
that kernel is torch's default one, it runs on one core and takes two 32-bit draws of
the CPU generator (Mersenne Twister) per element: in the HLBD ``fastest`` step it took
about a fifth of the time, more than any kernel but the matrix products. (Where
torch's build draws the mask with MKL's parallel generator instead, FastDropout
detects it and leaves dropout to torch.)

FastDropout replaces only that draw: while an epoch trains (from its first micro-batch
to its end) it registers its own CPU kernel for ``aten::bernoulli_.float``
(a float ``p``), which fills the mask from torch's CPU generator. Everything else (the scaling
by ``1/(1-p)``, the product, its gradient) is torch's own dropout, and
``torch.manual_seed`` and the trainer's checkpoints govern the masks as before.

* ``FastDropout()``: one 32-bit draw per element. An element is kept with probability
  ``1 - p`` rounded up to a multiple of ``2**-32`` (0.9 becomes 0.9 + 1.4e-10): the
  same distribution as torch's dropout, a different random stream. With dropout off
  (``p == 0`` or ``model.eval()``) nothing is drawn and nothing changes.
* ``FastDropout(exact=True)``: the same draws torch makes, turned into the very mask
  torch's kernel would have drawn (checked once per process against torch's own
  ``bernoulli_``): training is the plain loop's bit for bit, with dropout on. Less of
  a gain, as the draws themselves are most of the cost.

Because the kernel is registered for forward *and* backward, activation checkpointing
(ours or ``torch.utils.checkpoint`` inside the model) recomputes the same masks. While
it is registered, every ``bernoulli_(p)`` with a float ``p`` on a CPU tensor in the
process goes through it (same distribution; with ``exact=True``, same values).

As a context manager for a hand-written loop (around the whole loop: each registration
costs about 30 us and keeps about 100 bytes in torch's dispatcher, so enter it once,
not once per step)::

    with fast_dropout():
        for src, tgt in loader:
            loss = loss_fn(model(src, tgt[:, :-1]), tgt[:, 1:])
            loss.backward()
            ...
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import warnings
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, ContextManager

import torch

from .base import Strategy
from .needs import Capability, Computes, Context, Declaration, Need

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import FastTrainer

__all__ = ["FastDropout", "DropoutReport", "fast_dropout", "torch_draws_dropout_serially"]

log = logging.getLogger("hlbd_fast")

_LOW_53 = (1 << 53) - 1  # torch's bernoulli_ keeps the low 53 bits of each 64-bit draw
_lock = threading.Lock()
_registered = 0  # kernels of ours registered now (the probe must not run under one)


def _keep_mask(like: torch.Tensor, p: float, generator: torch.Generator | None, exact: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """Mask shaped like ``like``: 1 (True) with probability ``p``, drawn from ``generator`` (default CPU).

    Written into ``out`` (any dtype, ``like``'s shape) when given, else a new bool tensor.
    """
    if exact:
        # torch's default kernel keeps element i iff (draw_i & (2**53-1)) * 2**-53 < p, one 64-bit
        # draw per element in memory order; random_() on int64 makes the same draws (their low 63
        # bits), and empty_like keeps ``like``'s strides, hence its memory order
        words = torch.empty_like(like, dtype=torch.int64).random_(generator=generator)
        return torch.lt(words.bitwise_and_(_LOW_53), math.ceil(p * 2.0**53), out=out)  # p * 2**53 is exact in double
    threshold = math.ceil(p * 2.0**32) - 2**31  # keep iff u32 < ceil(p * 2**32), compared as signed int32
    if threshold >= 2**31:  # p above 1 - 2**-32: every element is kept
        return out.fill_(1) if out is not None else torch.ones(like.shape, dtype=torch.bool)
    n = like.numel()
    # one full-range 64-bit draw gives two 32-bit numbers: half the draws of torch's kernel
    words = torch.empty((n + 1) // 2, dtype=torch.int64).random_(-(2**63), None, generator=generator)
    # the comparison writes the mask straight into ``out`` (dropout's float noise): no bool mask, no copy
    return torch.lt(words.view(torch.int32)[:n].view(like.shape), threshold, out=out)


class _BernoulliKernel:
    """Registers a CPU kernel for ``aten::bernoulli_.float`` while entered (re-entrant, nestable)."""

    def __init__(self, exact: bool) -> None:
        self.exact = exact
        self.calls = 0  # masks drawn through this kernel (tests and reports read it)
        self._libs: list[Any] = []

    def _bernoulli_(self, tensor: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
        if not 0.0 <= p <= 1.0:
            raise RuntimeError(f"bernoulli_ expects p to be in [0, 1], but got p={p}")
        self.calls += 1
        if tensor.numel() == 0:
            return tensor
        return _keep_mask(tensor, p, generator, self.exact, out=tensor)

    def __enter__(self) -> "_BernoulliKernel":
        global _registered
        with warnings.catch_warnings():
            # torch warns once per process that a kernel is overridden: that is the point here
            warnings.simplefilter("ignore", UserWarning)
            lib = torch.library.Library("aten", "IMPL")
            lib.impl("bernoulli_.float", self._bernoulli_, "CPU")
        self._libs.append(lib)
        with _lock:
            _registered += 1
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        global _registered
        lib = self._libs.pop()
        destroy = getattr(lib, "_destroy", None)
        if destroy is not None:
            destroy()  # torch's previous kernel is the one in force again
        with _lock:
            _registered -= 1


@functools.lru_cache(maxsize=None)
def _probe() -> bool:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(20261128)
        theirs = torch.empty(4096).bernoulli_(0.9)
        torch.manual_seed(20261128)
        mine = _keep_mask(theirs, 0.9, None, exact=True).to(theirs.dtype)
    return torch.equal(theirs, mine)


def torch_draws_dropout_serially() -> bool:
    """Whether torch's CPU ``bernoulli_`` (dropout's mask) is its default serial kernel here.

    Decided once per process by drawing a mask both ways from the same generator state
    (the generator is left as it was). ``False`` where torch draws CPU masks with MKL's
    parallel generator instead: there FastDropout leaves dropout to torch.
    """
    if _registered and _probe.cache_info().currsize == 0:
        raise RuntimeError("torch_draws_dropout_serially() cannot decide while FastDropout's kernel is registered")
    return _probe()


def fast_dropout(exact: bool = False) -> ContextManager[Any]:
    """A context in which CPU dropout masks are drawn as :class:`FastDropout` draws them.

    Enter it around the training loop (forward and backward inside). Where torch already draws CPU masks in
    parallel (:func:`torch_draws_dropout_serially` is ``False``) it changes nothing.

    Raises:
        ValueError: ``exact`` is not a bool.
    """
    if not isinstance(exact, bool):
        raise ValueError(f"fast_dropout(exact={exact!r}): exact must be True or False")
    if not torch_draws_dropout_serially():
        return contextlib.nullcontext()
    return _BernoulliKernel(exact)


@dataclass(frozen=True)
class DropoutReport:
    """What :class:`FastDropout` did in the run."""

    active: bool  # masks went through FastDropout (False on CUDA, or where torch draws them in parallel)
    masks_drawn: int  # masks drawn through it so far


class FastDropout(Strategy):
    """Draw CPU dropout masks with one 32-bit draw per element, or torch's exact masks faster.

    Covers every dropout of the model on CPU tensors in training mode (``nn.Dropout``,
    ``F.dropout``, ``dropout_p`` of ``scaled_dot_product_attention``). Its kernel is
    registered for each epoch (:meth:`epoch_scope`) and removed when the epoch ends, by an
    error or a stop too, in ``fit`` and ``train_epoch`` alike; activation checkpointing's
    recomputation in backward draws the same masks, and any ``bernoulli_(p)`` on a CPU
    tensor during the epoch goes through it.

    * ``FastDropout()``: the same distribution as torch's dropout (keep probability
      ``1-p`` rounded up to a multiple of ``2**-32``), a different random stream:
      training with dropout on follows another, equally likely path; with dropout off
      it is the plain loop exactly.
    * ``FastDropout(exact=True)``: torch's own masks, bit for bit.

    Nothing changes (said once in the ``hlbd_fast`` log) on CUDA, where dropout is one
    fused kernel already, or where torch's build draws CPU masks with MKL's parallel
    generator. Not with :class:`~hlbd_fast.strategies.Compile`, which generates its
    own dropout kernels.

    Args:
        exact: reproduce torch's masks bit for bit instead of drawing half the bits.
    """

    def __init__(self, exact: bool = False) -> None:
        if not isinstance(exact, bool):
            raise ValueError(f"FastDropout(exact={exact!r}): exact must be True or False")
        self.exact = exact
        self._active = False
        self._kernel = _BernoulliKernel(exact)

    @property
    def active(self) -> bool:
        """Whether the trainer's dropout masks go through FastDropout (known after set-up)."""
        return self._active

    @property
    def masks_drawn(self) -> int:
        """Masks drawn through FastDropout so far (0 when it is not active)."""
        return self._kernel.calls

    def declare(self, context: Context) -> Declaration:
        why = "FastDropout replaces torch's CPU bernoulli kernel, which a compiled model's generated dropout never calls"
        computes = Computes.EXACT if self.exact else Computes.RANDOM_STREAM
        return Declaration(provides=(Need(Capability.KERNEL_OVERRIDE, why),), computes=computes)

    def report(self) -> "DropoutReport":
        """Whether the masks go through FastDropout, and how many it drew."""
        return DropoutReport(self._active, self.masks_drawn)

    def setup(self, trainer: "FastTrainer") -> None:
        if trainer.device.type != "cpu":
            log.info("FastDropout: %s dropout is one fused kernel already; FastDropout changes nothing there", trainer.device.type)
            self._active = False
        elif not torch_draws_dropout_serially():
            log.info("FastDropout: this torch draws CPU dropout masks in parallel (MKL); FastDropout leaves dropout to torch")
            self._active = False
        else:
            self._active = True

    def epoch_scope(self, trainer: "FastTrainer", epoch: int) -> ContextManager[Any]:
        """The kernel is registered for the epoch (one registration, not one per micro-batch) and removed on every exit."""
        return self._kernel if self._active else contextlib.nullcontext()
