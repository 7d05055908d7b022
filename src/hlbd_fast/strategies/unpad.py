"""Unpad: only the real tokens reach the matrix products.

:class:`TrimPadding` cuts the columns that are padding in *every* row of a micro-batch,
but a batch of 32 still carries the padding of its short rows up to its longest row. With
:class:`Unpad` the model runs on packed ``[real tokens, d_model]`` rows: embeddings,
projections, feed-forward, layer norms, the output head and the loss see real positions
only, and attention runs per sequence (unpacked to ``[B, L]`` inside attention, padded
keys masked). See :mod:`hlbd_fast.packing` for the protocol a model follows.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .._validation import check_bool, check_positive_int, token_loss_sum, token_pair
from ..packing import UnpadBatch
from .base import Forward, StrategyConflictError

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import FastTrainer

__all__ = ["Unpad", "UnpadCheck", "verify_unpad", "supports_unpad"]

#: Packed rows are rounded up to these multiples under autocast (see :class:`Unpad`).
_AUTOCAST_MULTIPLE = {"cpu": 32, "cuda": 8}

_PROTOCOL = (
    "the model's forward must accept unpad=UnpadBatch (hlbd_fast.packing) and return logits [N, V] for the packed "
    "target positions unpad.target, as hlbd_fast.models.Seq2SeqTransformer does (README: 'Padding-free models')"
)


def supports_unpad(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes the ``unpad`` keyword of the padding-free protocol."""
    try:
        return "unpad" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False


@dataclass(frozen=True)
class UnpadCheck:
    """What :func:`verify_unpad` measured on one batch."""

    padded_positions: int  # positions of the padded batch that the packed run skipped
    max_logit_diff: float  # largest |padded - packed| logit at the scored positions, over max(1, max |logit|)
    loss_diff: float  # |padded - packed| mean token loss, over max(1, |loss|)


def verify_unpad(model: nn.Module, batch: Any, pad_id: int = 0, tol: float = 1e-5, multiple_of: int = 1) -> UnpadCheck:
    """Check that running ``model`` on the real tokens only gives its padded logits and loss.

    Runs ``model(src, tgt[:, :-1])`` and ``model(src, tgt[:, :-1], unpad=...)`` on the batch
    in fp32, eval mode (the mode is restored) and without gradients, and compares the
    logits at the scored positions and the mean token loss. ``multiple_of`` packs with
    filler rows as :class:`Unpad` does, so that the proof covers them.

    Raises:
        ValueError: the model does not take ``unpad``, returns the wrong shape, or its
            packed logits differ beyond ``tol`` (it lets padding reach real positions).
    """
    if not supports_unpad(model):
        raise ValueError(f"verify_unpad: {type(model).__name__} does not run unpadded: {_PROTOCOL}")
    src, tgt = token_pair(batch, "verify_unpad")
    net = copy.deepcopy(model).float() if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()) else model
    unpad = UnpadBatch.of(src, tgt, pad_id, multiple_of)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), torch.autocast(src.device.type, enabled=False):
            full = net(src, tgt[:, :-1])
            packed = net(src, tgt[:, :-1], unpad=unpad)
    finally:
        net.train(was_training)
    _check_packed_shape(packed, unpad, full.shape[-1], "verify_unpad")
    ref = unpad.target.pack(full).float()
    targets = unpad.targets(tgt, pad_id)
    logit_diff = float((ref - packed.float()).abs().max() / ref.abs().max().clamp(min=1.0)) if ref.numel() else 0.0
    n = max(int(targets.ne(pad_id).sum()), 1)
    la, lb = float(token_loss_sum(ref, targets, pad_id)) / n, float(token_loss_sum(packed.float(), targets, pad_id)) / n
    loss_diff = abs(la - lb) / max(1.0, abs(la))
    result = UnpadCheck(src.numel() + tgt[:, 1:].numel() - unpad.source.tokens - unpad.target.tokens, logit_diff, loss_diff)
    if not (logit_diff <= tol and loss_diff <= tol):  # also catches NaN
        raise ValueError(
            f"verify_unpad: running only the real tokens changed the model's logits at scored positions by "
            f"{logit_diff:.2e} and its loss by {loss_diff:.2e} (relative; tolerance {tol:.0e}). The model lets padding "
            "reach real positions (for example it does not mask padded source keys), or its packed forward differs "
            "from its padded one"
        )
    return result


def _check_packed_shape(out: Any, unpad: UnpadBatch, vocab: int | None, who: str) -> torch.Tensor:
    n = unpad.target.length
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n or (vocab is not None and out.shape[1] < vocab):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{who}: with unpad= the model returned {shape}; expected logits [{n}, vocab]: {_PROTOCOL}")
    return out


class Unpad(Forward):
    """Run the model on the real tokens only (role ``forward``).

    Each micro-batch's sources and decoder inputs are packed (:class:`~hlbd_fast.packing.UnpadBatch`):
    only non-pad source tokens and the decoder positions whose outputs are scored reach the
    model, which returns logits for those positions; the loss and the token count are the
    padded loop's. For a model that masks padded source keys and decodes causally the
    result equals the padded loop's up to float rounding (the tests bound losses at 1e-6
    and weights at 1e-4 relative over two epochs). With dropout, masks are drawn per real
    element: the same distribution, another random stream.

    The model opts in through its ``forward(src, tgt_in, unpad=None)``
    (:class:`~hlbd_fast.models.Seq2SeqTransformer` does); any other model is refused when
    the trainer is built. ``check=True`` (the default, and in every preset) proves the model
    on the first batch (:func:`verify_unpad`: packed against padded logits, once) and
    refuses it when padding reaches its real positions.

    The packed rows are rounded up to ``multiple_of`` with filler rows that attention
    never reads and the loss ignores. Under autocast on a CPU, the default rounds to 32:
    oneDNN compiles its bf16 matrix products once per shape, and without rounding every
    micro-batch brings new shapes (measured on the HLBD step: bf16 slower than fp32
    unrounded, 15% faster than fp32 rounded to 32). Under CUDA autocast it rounds to 8
    (tensor-core friendly sizes); in fp32 it does not round.

    On CUDA the packing reads each micro-batch's lengths back (one sync per micro-batch),
    and it cannot be captured: ``CUDAGraphStep`` and ``Compile`` are refused with it.

    Args:
        check: prove the model on the first batch (two extra forwards, once).
        multiple_of: round the packed rows up to a multiple of this; ``None`` (default):
            32 under CPU autocast, 8 under CUDA autocast, 1 otherwise.
    """

    def __init__(self, check: bool = True, multiple_of: int | None = None) -> None:
        self.check = check_bool("check", check, "Unpad")
        if multiple_of is not None:
            check_positive_int("multiple_of", multiple_of, "Unpad", hint=" (1: no filler rows; None: by precision)")
        self.multiple_of = multiple_of
        self._verify: Callable[["FastTrainer", Any, int], None] = self._verify_batch

    def setup(self, trainer: "FastTrainer") -> None:
        from .compile import Compile
        from .cuda_graph import CUDAGraphStep

        if not supports_unpad(trainer.model):
            raise ValueError(f"Unpad cannot run {type(trainer.model).__name__} on its real tokens: {_PROTOCOL}")
        other = trainer.strategy(Compile) or (trainer.roles.step if isinstance(trainer.roles.step, CUDAGraphStep) else None)
        if other is not None:
            raise StrategyConflictError(
                f"Unpad cannot be combined with {other!r}: every micro-batch packs to another number of tokens, which "
                "a compiled graph or a captured CUDA graph would have to recompile or recapture; keep one of them"
            )
        self._verify = self._verify_batch if self.check else _no_check

    def rows_multiple(self, device: torch.device) -> int:
        """The multiple the packed rows are rounded up to now: ``multiple_of``, or chosen by the autocast in force."""
        if self.multiple_of is not None:
            return self.multiple_of
        if not torch.is_autocast_enabled(device.type):
            return 1
        return _AUTOCAST_MULTIPLE.get(device.type, 1)

    def logits(self, trainer: "FastTrainer", model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[length, V]`` at the packed target positions and their targets ``[length]`` (fillers: padding)."""
        src, tgt = token_pair(batch, "Unpad")
        multiple = self.rows_multiple(src.device)
        self._verify(trainer, batch, multiple)
        unpad = UnpadBatch.of(src, tgt, trainer.pad_id, multiple)  # on CUDA: reads the lengths back (one sync)
        out = _check_packed_shape(model(src, tgt[:, :-1], unpad=unpad), unpad, trainer.vocab_size, "Unpad")
        return out, unpad.targets(tgt, trainer.pad_id)

    def _verify_batch(self, trainer: "FastTrainer", batch: Any, multiple_of: int) -> None:
        try:
            verify_unpad(trainer.model, batch, trainer.pad_id, multiple_of=multiple_of)
        except ValueError as e:
            raise ValueError(
                f"Unpad refused this model on its first batch: {e}. (Unpad(check=False) skips this proof; use it only "
                "for a model you have checked yourself)"
            ) from None
        self._verify = _no_check  # proven once


def _no_check(trainer: Any, batch: Any, multiple_of: int) -> None:
    """The disabled check."""
