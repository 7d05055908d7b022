"""The training data of a run: normalised, checked once, cut into the plain loop's micro-batches.

``fit`` accepts ``(src, tgt)`` integer tensors, a map-style Dataset or a DataLoader;
:func:`make_source` turns any of them into a :class:`DataSource`. Every batch source
(the plain one here, device preload, worker processes) takes its sample order from
:func:`epoch_order` and its micro-batches from the distribution role's
``batch_indices``, so they all yield the same batches in the same order.
"""

from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ._validation import check_positive_int, check_token_dtype, replace_pair, token_pair

if TYPE_CHECKING:  # pragma: no cover
    from .strategies.base import Distribution
    from .trainer import FastTrainer

__all__ = ["DataSource", "KnownLengths", "make_source", "epoch_order", "host_batches", "validate_tensors", "check_batch", "move", "chunks", "blank_targets"]


@dataclass
class DataSource:
    """The training data of a ``fit`` call, normalised; batch sources read it.

    Exactly one of ``tensors``, ``dataset`` or ``loader`` is set.
    """

    tensors: tuple[torch.Tensor, torch.Tensor] | None  # (src [N, S], tgt [N, T]) int64 tensors, checked whole
    dataset: Dataset | None  # a map-style Dataset yielding (src, tgt) or custom items
    loader: DataLoader | None  # a DataLoader, used as it is
    batch_size: int  # micro-batch size per process (ignored for ``loader``)
    shuffle: bool  # shuffle each epoch (ignored for ``loader``)

    def __len__(self) -> int:
        """Number of samples (for a loader: of its dataset, when it has a length)."""
        if self.tensors is not None:
            return int(self.tensors[0].shape[0])
        ds = self.dataset if self.dataset is not None else self.loader.dataset  # type: ignore[union-attr]
        return len(ds)  # type: ignore[arg-type]

    def num_batches(self, distribution: "Distribution | None" = None) -> int | None:
        """Micro-batches per epoch of this process, when known."""
        if self.loader is not None:
            try:
                return len(self.loader)
            except TypeError:
                return None
        world = distribution.world_size if distribution is not None else 1
        return math.ceil(len(self) / (self.batch_size * world))

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        """This epoch's sample order: :func:`epoch_order` when shuffling, else ``0..N-1``."""
        n = len(self)
        return epoch_order(seed, epoch, n) if self.shuffle else torch.arange(n)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The sample order of ``epoch``: a host permutation of ``range(n)`` from ``(seed, epoch)`` alone."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63 - 1))
    return torch.randperm(n, generator=g)


def validate_tensors(src: Any, tgt: Any, vocab_size: int | None, where: str = "batch") -> None:
    """Check a ``(src, tgt)`` pair: 2-D int64 tensors, same rows, ids in ``[0, vocab_size)``.

    Reads values, so call it on host tensors (or once) to avoid device syncs.
    """
    for name, t in (("src", src), ("tgt", tgt)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a tensor of token ids, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}; expected 2-D [batch, length]")
        check_token_dtype(name, t, where)
    if src.shape[0] != tgt.shape[0]:
        raise ValueError(f"{where}: src has {src.shape[0]} rows but tgt has {tgt.shape[0]}; they must pair up row by row")
    if tgt.shape[1] < 2:
        raise ValueError(
            f"{where}: tgt has length {tgt.shape[1]}; targets need at least 2 tokens (the model reads tgt[:, :-1] and predicts tgt[:, 1:]); add a bos token"
        )
    if src.numel() == 0 or tgt.numel() == 0:
        return
    for name, t in (("src", src), ("tgt", tgt)):
        lo, hi = torch.stack([t.min(), t.max()]).tolist()  # one read of both (a sync on a device)
        if lo < 0:
            raise ValueError(f"{where}: {name} holds token id {lo}; ids must be >= 0")
        if vocab_size is not None and hi >= vocab_size:
            raise ValueError(
                f"{where}: {name} holds token id {hi} but the model's vocabulary has {vocab_size} ids; "
                "build the model with a larger vocab_size or re-encode the data with its tokenizer"
            )


def make_source(data: Any, batch_size: int, shuffle: bool, vocab_size: int | None) -> DataSource:
    """Normalise ``data`` (a tensors pair, a Dataset or a DataLoader); tensors are checked whole, once."""
    check_positive_int("batch_size", batch_size)
    if isinstance(data, DataLoader):
        source = DataSource(None, None, data, batch_size, shuffle)
    elif isinstance(data, Dataset):
        source = DataSource(None, data, None, batch_size, shuffle)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        validate_tensors(data[0], data[1], vocab_size, where="data")
        source = DataSource((data[0], data[1]), None, None, batch_size, shuffle)
    else:
        raise TypeError(f"data must be a (src, tgt) pair of int64 tensors, a Dataset or a DataLoader; got {type(data).__name__}")
    try:
        n = len(source)
    except TypeError:
        n = None
    if n == 0:
        raise ValueError("data is empty: there is nothing to train on")
    return source


def host_batches(trainer: "FastTrainer", source: DataSource, epoch: int) -> Iterator[Any]:
    """The plain loop's micro-batches of one epoch, on the host (the default batch source)."""
    if source.loader is not None:
        yield from trainer.roles.distribution.iterate_loader(trainer, source.loader, epoch)
        return
    indices = trainer.roles.distribution.batch_indices(trainer, source.order(trainer.seed, epoch), source.batch_size)
    if source.tensors is not None:
        s, t = source.tensors
        for idx in indices:
            yield s[idx], t[idx]
    else:  # a DataLoader per epoch, as the plain loop builds one (it draws a base seed from the global RNG)
        yield from DataLoader(source.dataset, batch_sampler=[i.tolist() for i in indices])  # type: ignore[arg-type]


def check_batch(batch: Any, vocab_size: int | None) -> None:
    """Check a host ``(src, tgt)`` batch; other formats are left to a ``forward_loss`` that knows them."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and all(isinstance(t, torch.Tensor) for t in batch[:2]):
        validate_tensors(batch[0], batch[1], vocab_size)


def move(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or a tuple, list, namedtuple or dict of them) on ``device``.

    Host-to-device copies are asynchronous: torch stages pageable memory, so this is safe
    and lets the host queue the step while the copy runs.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        items = [move(v, device) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


def chunks(it: Iterable[Any], k: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``k`` items (the last may be shorter)."""
    it = iter(it)
    while chunk := list(itertools.islice(it, k)):
        yield chunk


def blank_targets(batch: Any, pad_id: int) -> Any:
    """A copy of a ``(src, tgt, ...)`` batch whose targets after the first token are all ``pad_id``: zero tokens."""
    src, tgt = token_pair(batch, "a zero-token stand-in batch")
    tgt = tgt.clone()
    tgt[:, 1:] = pad_id
    return replace_pair(batch, src, tgt)


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place version counter (``None`` for an inference tensor, which has none)."""
    try:
        return int(t._version)
    except RuntimeError:
        return None


@dataclass(frozen=True)
class _Known:
    src: "weakref.ref[torch.Tensor]"  # the batch's tensors, not kept alive from here
    tgt: "weakref.ref[torch.Tensor]"
    versions: tuple[int | None, int | None]  # their version counters when remembered: changed in place since, unknown
    lengths: tuple[int, int]  # longest (src, tgt) row: last non-pad column + 1
    packed: tuple[int, int] | None  # source and target positions an Unpad packing keeps (packing.packed_sizes), if known


class KnownLengths:
    """What the host knows of the batches in hand, so that trimming or packing them needs no sync.

    Whoever makes a batch and already knows its lengths on the host (``DevicePreload``
    from preload time, evaluation from its host tensors) :meth:`remember` s them: the longest
    ``(src, tgt)`` row, and optionally the positions a padding-free packing keeps
    (:func:`hlbd_fast.packing.packed_sizes` summed over the batch). A strategy that needs
    them asks :meth:`lookup` (``TrimPadding``) or :meth:`packed` (``Unpad``), which answer only
    for the very tensors remembered, unchanged in place since (another batch, or one changed,
    gets ``None``: its lengths must be read from the device). A strategy that cuts only
    all-padding columns passes them on with :meth:`carry`.

    Every batch of an optimizer step is in hand at once (accumulation fetches them all
    before the step), so several are remembered; the tensors themselves are not kept alive
    from here (weak references).
    """

    _LIMIT = 1024  # remembered batches at most (the oldest are forgotten first)

    def __init__(self) -> None:
        self._known: dict[int, _Known] = {}  # by id of the source tensor

    def remember(self, src: torch.Tensor, tgt: torch.Tensor, src_len: int, tgt_len: int, packed: tuple[int, int] | None = None) -> None:
        """Record the longest rows of the batch ``(src, tgt)`` about to be used (and what a packing of it keeps)."""
        self._prune()
        packed = None if packed is None else (int(packed[0]), int(packed[1]))
        self._known[id(src)] = _Known(weakref.ref(src), weakref.ref(tgt), (_version(src), _version(tgt)), (int(src_len), int(tgt_len)), packed)

    def lookup(self, batch: Any) -> tuple[int, int] | None:
        """``(src, tgt)`` lengths of ``batch`` when it holds tensors remembered (unchanged since), else ``None``."""
        known = self._find(batch)
        return None if known is None else known.lengths

    def packed(self, batch: Any) -> tuple[int, int] | None:
        """The source and target positions a packing of ``batch`` keeps, when remembered with them, else ``None``."""
        known = self._find(batch)
        return None if known is None else known.packed

    def carry(self, batch: Any, src: torch.Tensor, tgt: torch.Tensor) -> None:
        """``(src, tgt)`` is ``batch`` with only all-padding columns cut: it has the same lengths (if ``batch``'s are known)."""
        known = self._find(batch)
        if known is not None:
            self.remember(src, tgt, *known.lengths, packed=known.packed)

    def forget(self) -> None:
        """Drop every remembered batch."""
        self._known.clear()

    def _find(self, batch: Any) -> _Known | None:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            return None
        src, tgt = batch[0], batch[1]
        known = self._known.get(id(src))
        if known is None or known.src() is not src or known.tgt() is not tgt:
            return None
        if known.versions != (_version(src), _version(tgt)):
            return None  # changed in place since: the host's lengths may be wrong
        return known

    def _prune(self) -> None:
        for key in [k for k, known in self._known.items() if known.src() is None or known.tgt() is None]:
            del self._known[key]
        while len(self._known) >= self._LIMIT:
            del self._known[next(iter(self._known))]
