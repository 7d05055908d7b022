"""Unpad: only the real tokens reach the matrix products.

:class:`TrimPadding` cuts the columns that are padding in *every* row of a micro-batch,
but a batch of 32 still carries the padding of its short rows up to its longest row. With
:class:`Unpad` the model runs on packed ``[real tokens, d_model]`` rows: embeddings,
projections, feed-forward, layer norms, the output head and the loss see real positions
only, and attention runs per sequence (unpacked to ``[B, L]`` inside attention, padded
keys masked). See :mod:`hlbd_fast.packing` for the protocol a model follows.

Models built from torch's ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``
(``nn.Transformer`` among them) with key padding masks run their layers packed instead, by
module surgery (:mod:`hlbd_fast.strategies.unpad_layers`); their embeddings and output
head keep the padded batch.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator

import torch
from torch import nn

from .._validation import check_bool, check_positive_int, extract_logits, token_loss_sum, token_pair
from ..packing import UnpadBatch
from .base import Forward
from .needs import ON_REFUSAL, Capability, Computes, Context, Declaration, Need, leave_out, refusal
from .padding import tf32_off
from .unpad_layers import check_layers, packable_layers, packed_layers

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import FastTrainer

__all__ = ["Unpad", "UnpadCheck", "verify_unpad", "supports_unpad", "unpad_mode"]

#: Packed rows are rounded up to these multiples under autocast (see :class:`Unpad`).
_AUTOCAST_MULTIPLE = {"cpu": 32, "cuda": 8}

_PROTOCOL = (
    "the model's forward must accept unpad=UnpadBatch (hlbd_fast.packing) and return logits [N, V] for the packed "
    "target positions unpad.target, as hlbd_fast.models.Seq2SeqTransformer does, or the model must be built from "
    "nn.TransformerEncoderLayer / nn.TransformerDecoderLayer (nn.Transformer) with key padding masks "
    "(README: 'Padding-free models')"
)


def supports_unpad(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes the ``unpad`` keyword of the padding-free protocol."""
    try:
        return "unpad" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False


def unpad_mode(model: nn.Module) -> str | None:
    """How :class:`Unpad` runs ``model``: ``"protocol"`` (its forward takes ``unpad``), ``"layers"``
    (its torch transformer layers run packed) or ``None`` (it cannot)."""
    if supports_unpad(model):
        return "protocol"
    return "layers" if packable_layers(model) else None


@dataclass(frozen=True)
class UnpadCheck:
    """What :func:`verify_unpad` measured on one batch."""

    padded_positions: int  # positions of the padded batch that the packed run skipped
    max_logit_diff: float  # largest |padded - packed| logit at the scored positions, over max(1, max |logit|)
    loss_diff: float  # |padded - packed| mean token loss, over max(1, |loss|)


def verify_unpad(model: nn.Module, batch: Any, pad_id: int = 0, tol: float = 1e-5, multiple_of: int = 1) -> UnpadCheck:
    """Check that running ``model`` on the real tokens only gives its padded logits and loss.

    Runs the model on the batch padded and packed (``model(src, tgt[:, :-1], unpad=...)``
    for the protocol; its torch transformer layers packed, see :func:`unpad_mode`) in fp32
    with TF32 off (:func:`~hlbd_fast.strategies.padding.tf32_off`: restored after) and eval
    mode (the mode is restored), and compares the logits at the scored positions
    and the mean token loss. ``multiple_of`` packs with filler rows as :class:`Unpad` does,
    so that the proof covers them.

    Raises:
        ValueError: the model cannot run unpadded, returns the wrong shape, or its packed
            logits differ beyond ``tol`` (it lets padding reach real positions).
    """
    mode = unpad_mode(model)
    if mode is None:
        raise ValueError(f"verify_unpad: {type(model).__name__} does not run unpadded: {_PROTOCOL}")
    src, tgt = token_pair(batch, "verify_unpad")
    net = copy.deepcopy(model).float() if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()) else model
    was_training = net.training
    net.eval()
    try:
        with torch.autocast(src.device.type, enabled=False), tf32_off():
            run = _runs_protocol if mode == "protocol" else _runs_layers
            ref, packed, targets, skipped = run(net, src, tgt, pad_id, multiple_of)
    finally:
        net.train(was_training)
    return _compare(ref.float(), packed.float(), targets, pad_id, skipped, tol)


def _runs_protocol(net: nn.Module, src: torch.Tensor, tgt: torch.Tensor, pad_id: int, multiple_of: int) -> tuple[torch.Tensor, ...]:
    """(padded logits at the packed rows, packed logits, their targets, positions skipped)."""
    unpad = UnpadBatch.of(src, tgt, pad_id, multiple_of)
    with torch.no_grad():
        full = net(src, tgt[:, :-1])
        packed = net(src, tgt[:, :-1], unpad=unpad)
    _check_packed_shape(packed, unpad, full.shape[-1], "verify_unpad")
    skipped = src.numel() + tgt[:, 1:].numel() - unpad.source.tokens - unpad.target.tokens
    return unpad.target.pack(full), packed, unpad.targets(tgt, pad_id), skipped


def _runs_layers(net: nn.Module, src: torch.Tensor, tgt: torch.Tensor, pad_id: int, multiple_of: int) -> tuple[torch.Tensor, ...]:
    """The same for packed torch layers: both runs padded logits, compared where targets are real."""
    # with grad enabled: nn.TransformerEncoder would otherwise take torch's own nested-tensor path
    with torch.enable_grad(), packed_layers(net) as packer:
        saved = packer.enabled, packer.multiple
        packer.multiple = lambda device: multiple_of
        try:
            rows, length = tgt.shape[0], tgt.shape[1] - 1
            packer.enabled = False
            full = extract_logits(net(src, tgt[:, :-1]), rows, length, None).detach()
            packer.enabled = True
            packed = extract_logits(net(src, tgt[:, :-1]), rows, length, None).detach()
        finally:
            packer.enabled, packer.multiple = saved
    targets = tgt[:, 1:]
    real = targets.ne(pad_id)
    skipped = int(src.eq(pad_id).sum()) + int(tgt[:, :-1].eq(pad_id).sum())
    return full[real], packed[real], targets[real], skipped


def _compare(ref: torch.Tensor, packed: torch.Tensor, targets: torch.Tensor, pad_id: int, skipped: int, tol: float) -> UnpadCheck:
    logit_diff = float((ref - packed).abs().max() / ref.abs().max().clamp(min=1.0)) if ref.numel() else 0.0
    n = max(int(targets.ne(pad_id).sum()), 1)
    la, lb = float(token_loss_sum(ref, targets, pad_id)) / n, float(token_loss_sum(packed, targets, pad_id)) / n
    loss_diff = abs(la - lb) / max(1.0, abs(la))
    if not (logit_diff <= tol and loss_diff <= tol):  # also catches NaN
        raise ValueError(
            f"verify_unpad: running only the real tokens changed the model's logits at scored positions by "
            f"{logit_diff:.2e} and its loss by {loss_diff:.2e} (relative; tolerance {tol:.0e}). The model lets padding "
            "reach real positions (for example it does not mask padded source keys), or its packed forward differs "
            "from its padded one"
        )
    return UnpadCheck(skipped, logit_diff, loss_diff)


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
    (:class:`~hlbd_fast.models.Seq2SeqTransformer` does). A model built from torch's
    ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (``nn.Transformer``)
    that passes key padding masks runs those layers packed instead (module surgery, for
    each ``fit``, ``train_epoch`` and ``evaluate``, removed at their end; its embeddings
    and output head stay padded). Any other model is refused when the trainer is built.
    ``check=True`` (the default, and in every preset) proves the model on the first batch
    (:func:`verify_unpad`: packed against padded logits, once) and refuses it when
    padding reaches its real positions.

    The packed rows are rounded up to ``multiple_of`` with filler rows that attention
    never reads and the loss ignores. Under autocast on a CPU, the default rounds to 32:
    oneDNN compiles its bf16 matrix products once per shape, and without rounding every
    micro-batch brings new shapes (measured on the HLBD ``fastest`` epoch: bf16 4.02 s
    unrounded and 2.59 s rounded to 32, against 2.87 s in fp32). Under CUDA autocast it
    rounds to 8 (tensor-core friendly sizes); in fp32 it does not round.

    Host syncs: how many positions each side packs must be known on the host. With
    :class:`DevicePreload` (any batch source that records them in ``trainer.known_lengths``),
    :class:`TrimPadding` or not, they are, and packing makes no host sync. Otherwise they
    are counted on the device and read back: two syncs per micro-batch on CUDA (sources and
    targets; none on a CPU). A model run in mode ``"layers"`` packs at each key padding mask
    its layers receive and reads each one's count back (two or three per micro-batch for an
    encoder-decoder, known lengths or not). Every micro-batch packs to its own shapes, so
    the step cannot be captured: ``CUDAGraphStep`` and ``Compile`` are refused with it.

    Args:
        check: prove the model on the first batch (two extra forwards, once).
        on_refusal: ``"raise"`` (default) when the proof fails, or ``"leave out"``: run the
            model padded for the rest of the trainer's runs, with one warning and an entry in
            ``history.left_out`` (how presets bring it).
        multiple_of: round the packed rows up to a multiple of this; ``None`` (default):
            32 under CPU autocast, 8 under CUDA autocast, 1 otherwise.
    """

    def __init__(self, check: bool = True, multiple_of: int | None = None, on_refusal: str = "raise") -> None:
        self.check = check_bool("check", check, "Unpad")
        if on_refusal not in ON_REFUSAL:
            raise ValueError(f"Unpad(on_refusal={on_refusal!r}) must be one of {ON_REFUSAL}")
        self._left_out = False
        self._packer: Any = None
        if multiple_of is not None:
            check_positive_int("multiple_of", multiple_of, "Unpad", hint=" (1: no filler rows; None: by precision)")
        self.multiple_of = multiple_of
        self.on_refusal = on_refusal
        self._mode: str | None = None
        self._proof: UnpadCheck | None = None
        self._verify: Callable[["FastTrainer", Any, int], None] = self._verify_batch

    @property
    def mode(self) -> str | None:
        """How the model runs unpadded: ``"protocol"`` or ``"layers"`` (see :func:`unpad_mode`); set when the trainer is built."""
        return self._mode

    def declare(self, context: Context) -> Declaration:
        """Varying shapes (every micro-batch packs to its own row count); in mode ``"layers"`` the layers' forward."""
        provides = [Need(Capability.VARYING_SHAPES, "every micro-batch packs to its own number of real tokens")]
        forbids: list[Need] = []
        mode, unsupported = unpad_mode(context.model), None
        if mode is None:
            unsupported = f"Unpad cannot run {type(context.model).__name__} on its real tokens: {_PROTOCOL}"
        elif mode == "layers":
            try:
                check_layers(context.model)
            except ValueError as e:
                unsupported = str(e)
            why = "Unpad packs the rows of the model's torch transformer layers by replacing their forward"
            provides.append(Need(Capability.LAYER_FORWARD, why))
            forbids.append(Need(Capability.LAYER_FORWARD, why))
        return Declaration(tuple(provides), (), tuple(forbids), Computes.ROUNDING, self.check, unsupported)

    def setup(self, trainer: "FastTrainer") -> None:
        self._mode = unpad_mode(trainer.model)  # the declaration refused a model without one
        self._proof = None
        self._left_out = False
        self._verify = self._verify_batch if self.check else _no_check

    def report(self) -> UnpadCheck | None:
        """What the proof measured on the first batch (``None`` before it ran, or unchecked)."""
        return self._proof

    def rows_multiple(self, device: torch.device) -> int:
        """The multiple the packed rows are rounded up to now: ``multiple_of``, or chosen by the autocast in force."""
        if self.multiple_of is not None:
            return self.multiple_of
        if not _autocast_on(device.type):
            return 1
        return _AUTOCAST_MULTIPLE.get(device.type, 1)

    def run_scope(self, trainer: "FastTrainer") -> ContextManager[Any]:
        """Torch transformer layers (mode ``"layers"``) run packed for the whole call, and are restored after."""
        return self._packed(trainer) if self.mode == "layers" and not self._left_out else contextlib.nullcontext()

    @contextlib.contextmanager
    def _packed(self, trainer: "FastTrainer") -> Iterator[None]:
        with packed_layers(trainer.model, self.rows_multiple) as packer:
            self._packer = packer
            try:
                yield
            finally:
                self._packer = None

    def eval_scope(self, trainer: "FastTrainer") -> ContextManager[Any]:
        """The same around ``evaluate``."""
        return self.run_scope(trainer)

    def logits(self, trainer: "FastTrainer", model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Protocol: logits ``[length, V]`` at the packed target positions and their targets ``[length]``
        (fillers: padding). Layers: the padded logits and targets, the layers packed inside."""
        src, tgt = token_pair(batch, "Unpad")
        multiple = self.rows_multiple(src.device)
        self._verify(trainer, batch, multiple)
        if self.mode == "layers" or self._left_out:
            return super().logits(trainer, model, batch)
        # sizes known on the host (DevicePreload): packed on the device with no sync; else counted there and read back
        unpad = UnpadBatch.of(src, tgt, trainer.pad_id, multiple, trainer.known_lengths.packed(batch))
        out = _check_packed_shape(model(src, tgt[:, :-1], unpad=unpad), unpad, trainer.vocab_size, "Unpad")
        return out, unpad.targets(tgt, trainer.pad_id)

    def _verify_batch(self, trainer: "FastTrainer", batch: Any, multiple_of: int) -> None:
        try:
            self._proof = verify_unpad(trainer.model, batch, trainer.pad_id, multiple_of=multiple_of)
        except ValueError as e:
            measured = str(e).split(". The model", 1)[0].removeprefix("verify_unpad: ")
            if self.on_refusal == "raise":
                raise ValueError(refusal("Unpad", measured)) from None
            self._left_out = True
            if self._packer is not None:
                self._packer.enabled = False  # the layers run padded from here on
            leave_out(trainer, "Unpad", measured)
        self._verify = _no_check  # proven, or left out, once


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` here (torch < 2.4 has one function per device)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # pragma: no cover - torch < 2.4
        return bool(torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled())


def _no_check(trainer: Any, batch: Any, multiple_of: int) -> None:
    """The disabled check."""
