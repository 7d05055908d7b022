"""Where the micro-batches come from: the whole dataset on the device, or worker processes.

Both strategies fill the ``batches`` role and yield the plain loop's batches in the plain
loop's order (:func:`hlbd_fast.batches.epoch_order`, a host permutation from the seed and
the epoch, cut into micro-batches by the distribution role, so both shard under DDP),
so they change the speed of the loop, not what it computes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, Sampler, TensorDataset, default_collate

from .._validation import check_bool, check_positive_int
from ..packing import packed_sizes
from .base import BatchSource
from .needs import Capability, Context, Declaration, Need
from .padding import row_lengths

if TYPE_CHECKING:  # pragma: no cover
    from ..batches import DataSource
    from ..trainer import FastTrainer

__all__ = ["DevicePreload", "DataLoaderWorkers"]

log = logging.getLogger("hlbd_fast")

_LAST_BATCH = ("keep", "drop", "pad")


def _draw_like_a_dataloader() -> None:
    """Advance torch's global RNG as creating a DataLoader iterator does (one int64 draw).

    The plain loop builds a DataLoader over a Dataset every epoch, and each one draws its
    base seed from the global RNG; drawing the same here keeps dropout's random stream,
    hence the results, identical to the plain loop's.
    """
    torch.empty((), dtype=torch.int64).random_()


def _plain_loop_draws_seed(source: "DataSource") -> bool:
    """Does the plain loop's ``host_batches`` draw a DataLoader seed from the global RNG each epoch?"""
    if source.dataset is not None:
        return True
    return source.loader is not None and source.loader.generator is None


def _source_key(source: "DataSource") -> tuple[Any, ...]:
    """Identifies the data of a source; in-place changes to tensors change the key."""
    if source.tensors is not None:
        s, t = source.tensors
        return ("tensors", id(s), s._version, id(t), t._version, source.batch_size, source.shuffle)
    if source.dataset is not None:
        return ("dataset", id(source.dataset), source.batch_size, source.shuffle)
    loader = source.loader
    assert loader is not None
    # by its dataset and batching, so a new DataLoader over the same data each epoch reuses it
    sampler = type(loader.sampler).__name__
    return ("loader", id(loader.dataset), loader.batch_size, sampler, id(loader.collate_fn))


def _source_owner(source: "DataSource") -> Any:
    return source.tensors if source.tensors is not None else source.dataset if source.dataset is not None else source.loader


# ---------------------------------------------------------------------------- DevicePreload
@dataclass
class _Preloaded:
    """A source's data, read once and placed on the trainer's device."""

    key: tuple[Any, ...]  # _source_key of the source it came from
    owner: Any  # the user's data object, kept alive so the ids in ``key`` stay valid
    src: torch.Tensor  # [N, S] on the device
    tgt: torch.Tensor  # [N, T] on the device
    src_len: torch.Tensor  # [N] on the host: last non-pad column + 1 of each source
    tgt_len: torch.Tensor  # [N] on the host: same for each target
    src_packed: torch.Tensor  # [N] on the host: source positions a padding-free packing keeps (packing.packed_sizes)
    tgt_packed: torch.Tensor  # [N] on the host: decoder positions it scores
    batch_size: int  # rows per micro-batch
    shuffle: bool  # shuffle each epoch with trainer.epoch_order
    draws_seed: bool  # mirror the plain loop's DataLoader seed draw each epoch


def _read_dataset(dataset: Any, collate: Callable[[list[Any]], Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read every item of a map-style dataset once and collate them into one (src, tgt) pair."""
    items = [dataset[i] for i in range(len(dataset))]
    try:
        batch = collate(items)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise ValueError(
            f"DevicePreload could not stack the Dataset's {len(items)} items into tensors ({type(e).__name__}: {e}); "
            "its items must be (src, tgt) token tensors of one length each (pad them in the Dataset, as PairDataset does)"
        ) from e
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch)):
        raise ValueError(
            f"DevicePreload needs Dataset items that are (src, tgt) pairs of token tensors; they collate to a {type(batch).__name__}"
            + (f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else "")
        )
    return batch[0], batch[1]


class DevicePreload(BatchSource):
    """Keep the whole dataset on the device and batch it there: no DataLoader, no per-batch copy.

    Fills the ``batches`` role. On a CPU device the data stays where it is and only the
    per-batch DataLoader work is saved.

    At the first epoch of a ``fit`` the data is read once (tensors as they are; a Dataset by
    reading every item once and collating them; a DataLoader through its map-style
    ``dataset``), validated once on the host and moved to the trainer's device once (left
    on the host when the device is the CPU). Each epoch the order is
    :meth:`FastTrainer.epoch_order` — the plain loop's host permutation — copied to the
    device once, cut into micro-batches by the distribution role (under DDP each process
    gathers its own shard), and every micro-batch is gathered there with ``index_select``:
    no host sync per batch. The same data in a later ``fit`` is not read again; tensors changed in
    place are (their version counter changes).

    With tensors or a Dataset and ``last_batch="keep"`` the batches are exactly the plain
    loop's, so training computes exactly what it computes (dropout included: the global
    RNG is advanced as the plain loop's DataLoader would). A DataLoader's own sampler,
    ``drop_last`` and workers are not used: its ``batch_size`` and ``collate_fn`` are, the
    order comes from ``epoch_order`` (shuffled when it has a ``RandomSampler``), and a
    warning says so.

    The micro-batch lengths are known on the host (``trainer.known_lengths``), so
    :class:`TrimPadding` cuts padding and :class:`Unpad` packs the real tokens without any sync.

    Args:
        last_batch: the last, partial micro-batch of an epoch: ``"keep"`` it smaller (the
            plain loop's batches), ``"drop"`` it, or ``"pad"`` it to full size so every
            batch has one shape. Pad rows repeat the source of the epoch's first samples and
            have a target of its first token (BOS) followed by padding: they hold no target
            token, so they add nothing to the loss, the token count or the gradients under
            either loss normalisation, and no row is all padding (no NaN in attention). The
            results equal ``"keep"`` up to float rounding when dropout is off (a larger batch
            draws a different dropout mask). Under DDP "drop" and "pad" apply to the global
            batch (``batch_size`` x processes).
    """

    prevalidated = True  # every batch is cut from data validated once at preload

    def declare(self, context: Context) -> Declaration:
        return Declaration(provides=(Need(Capability.DEVICE_BATCHES, "the data is placed on the device once"),))

    def __init__(self, last_batch: str = "keep") -> None:
        if last_batch not in _LAST_BATCH:
            raise ValueError(
                f"DevicePreload(last_batch={last_batch!r}) must be one of {_LAST_BATCH}: 'keep' the smaller last batch "
                "(the plain loop), 'drop' it, or 'pad' it to full size with rows that hold no target token"
            )
        self.last_batch = last_batch
        self._loads = 0
        self._data: _Preloaded | None = None

    @property
    def loads(self) -> int:
        """How many times data was read and placed on the device (once per data, again after in-place changes)."""
        return self._loads

    @property
    def preloaded(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The ``(src, tgt)`` tensors held on the device now, or ``None`` before the first epoch."""
        return None if self._data is None else (self._data.src, self._data.tgt)

    # ------------------------------------------------------------------ preload
    def _preload(self, trainer: "FastTrainer", source: "DataSource") -> _Preloaded:
        key = _source_key(source)
        if self._data is not None and self._data.key == key:
            return self._data
        self._data = None  # free the previous data first
        batch_size, shuffle = source.batch_size, source.shuffle
        if source.tensors is not None:
            src, tgt = source.tensors
        elif source.dataset is not None:
            src, tgt = _read_dataset(source.dataset, default_collate)
        else:
            loader = source.loader
            assert loader is not None
            ds = loader.dataset
            if isinstance(ds, IterableDataset) or not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
                raise ValueError(
                    f"DevicePreload needs tensors or a map-style Dataset; this DataLoader reads a {type(ds).__name__}, "
                    "which cannot be indexed. Pass (src, tgt) tensors, or drop DevicePreload to use the DataLoader as it is"
                )
            if loader.batch_size is None:
                raise ValueError(
                    "DevicePreload needs a fixed batch size; this DataLoader uses a batch_sampler. Pass its dataset and batch_size to fit() instead"
                )
            batch_size = loader.batch_size
            shuffle = isinstance(loader.sampler, RandomSampler)
            warnings.warn(
                f"DevicePreload reads the DataLoader's dataset once and batches it on the device itself: batch_size "
                f"{batch_size}, order from trainer.epoch_order (shuffle={shuffle}); the loader's sampler, drop_last and "
                "workers are not used, so the order differs from iterating the loader. Pass the Dataset to fit() to "
                "silence this",
                stacklevel=4,
            )
            src, tgt = _read_dataset(ds, loader.collate_fn)
        trainer.validate_tensors(src, tgt, where="DevicePreload data")  # once, reads values (a sync if on the device)
        n = int(src.shape[0])
        if self.last_batch == "drop" and n < batch_size:
            raise ValueError(
                f"DevicePreload(last_batch='drop'): the data has {n} samples, fewer than batch_size={batch_size}, so every "
                "batch would be dropped; use last_batch='keep' or a smaller batch_size"
            )
        pad = trainer.pad_id
        host_src, host_tgt = src.cpu(), tgt.cpu()  # no-op for host data; one copy back if it was on the device
        src_packed, tgt_packed = packed_sizes(host_src, host_tgt, pad)
        data = _Preloaded(
            key=key,
            owner=_source_owner(source),
            src=src.to(trainer.device),  # the one host-to-device copy of the data
            tgt=tgt.to(trainer.device),
            src_len=row_lengths(host_src, pad),
            tgt_len=row_lengths(host_tgt, pad),
            src_packed=src_packed,
            tgt_packed=tgt_packed,
            batch_size=batch_size,
            shuffle=shuffle,
            draws_seed=_plain_loop_draws_seed(source),
        )
        self._data = data
        self._loads += 1
        log.info("DevicePreload: %d pairs (src %s, tgt %s) read once and placed on %s", n, tuple(src.shape), tuple(tgt.shape), trainer.device)
        return data

    # ------------------------------------------------------------------ batches
    def batches(self, trainer: "FastTrainer", source: "DataSource", epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        data = self._preload(trainer, source)
        n, bs = int(data.src.shape[0]), data.batch_size
        order = trainer.epoch_order(n, epoch) if data.shuffle else torch.arange(n)
        if data.draws_seed:
            _draw_like_a_dataloader()
        order = self._last_batch_order(order, bs * trainer.roles.distribution.world_size)
        chunks = trainer.roles.distribution.batch_indices(trainer, torch.arange(order.shape[0]), bs)
        idx = self._to_device(order, data.src.device)
        for pos in chunks:
            rows = order[pos]
            real = int((pos < n).sum())  # pad rows ("pad") come last in a chunk and hold no target token
            src_len = int(data.src_len[rows].max())
            tgt_len = max(int(data.tgt_len[rows[:real]].max()), 1) if real else 1
            # pad rows score nothing: their targets are blanked below
            packed = (int(data.src_packed[rows].sum()), int(data.tgt_packed[rows[:real]].sum()) if real else 0)
            at = _positions(idx, pos)
            s, t = data.src.index_select(0, at), data.tgt.index_select(0, at)
            if real < len(pos):
                t[real:, 1:] = trainer.pad_id  # pad rows: first target token kept, nothing to predict
            trainer.known_lengths.remember(s, t, src_len, tgt_len, packed)  # TrimPadding cuts, Unpad packs without a sync
            yield s, t

    def _last_batch_order(self, order: torch.Tensor, global_batch: int) -> torch.Tensor:
        """The epoch's order with its last, partial global batch kept, dropped or padded."""
        n = order.shape[0]
        rest = n % global_batch
        if not rest or self.last_batch == "keep":
            return order
        if self.last_batch == "drop":
            return order[: n - rest]
        fill = order.repeat(math.ceil((global_batch - rest) / n))[: global_batch - rest]
        return torch.cat([order, fill])

    def num_batches(self, trainer: "FastTrainer", source: "DataSource") -> int | None:
        """Micro-batches per epoch of this process (the data is preloaded first, once)."""
        data = self._preload(trainer, source)
        n = int(data.src.shape[0])
        global_batch = data.batch_size * trainer.roles.distribution.world_size
        full, rest = divmod(n, global_batch)
        return full + (1 if rest and self.last_batch != "drop" else 0)

    @staticmethod
    def _to_device(order: torch.Tensor, device: torch.device) -> torch.Tensor:
        # once per epoch; an asynchronous copy from pageable memory is staged by the driver
        # without waiting for the device (a no-op on the CPU)
        return order.to(device, non_blocking=True)


def _positions(idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``idx[pos]`` on ``idx``'s device: a view when ``pos`` is a contiguous run (it always is for the built-in shardings)."""
    first, count = int(pos[0]), pos.shape[0]
    if int(pos[-1]) - first + 1 == count:
        return idx[first : first + count]
    return idx.index_select(0, pos.to(idx.device, non_blocking=True))


# ---------------------------------------------------------------------------- DataLoaderWorkers
class _EpochBatches(Sampler[list[int]]):
    """A batch sampler whose batches are set before each epoch, so one persistent DataLoader follows them.

    The main process iterates the batch sampler afresh at the start of every epoch (workers
    only receive indices), so setting ``batches`` before ``iter(loader)`` is enough.
    """

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class _Workers:
    key: tuple[Any, ...]  # _source_key of the source it serves
    owner: Any  # the user's data object, kept alive so the ids in ``key`` stay valid
    loader: DataLoader  # built once; persistent workers survive between epochs
    sampler: _EpochBatches
    n: int
    draws_seed: bool


def _datasets_within(dataset: Any) -> Iterator[Any]:
    """``dataset`` and the datasets it wraps (Subset.dataset, ConcatDataset.datasets)."""
    yield dataset
    inner = getattr(dataset, "dataset", None)
    if isinstance(inner, Dataset):
        yield from _datasets_within(inner)
    for d in getattr(dataset, "datasets", None) or ():
        if isinstance(d, Dataset):
            yield from _datasets_within(d)


def _check_tokenizers(dataset: Any) -> None:
    """Refuse a dataset whose tokenizer can still grow; warn when it cannot be told."""
    for ds in _datasets_within(dataset):
        tok = getattr(ds, "tokenizer", None)
        if tok is None:
            continue
        frozen = getattr(tok, "is_frozen", None)
        if frozen is None:
            warnings.warn(
                f"DataLoaderWorkers: {type(ds).__name__}.tokenizer ({type(tok).__name__}) has no is_frozen attribute, so "
                "it cannot be told whether encoding grows its vocabulary. If it does, every worker process grows its own "
                "copy and the ids differ between workers and from the main process (loss stuck near ln(vocab)). "
                "Build the vocabulary once before training and encode in the Dataset's __init__",
                stacklevel=5,
            )
        elif not frozen:
            raise ValueError(
                f"DataLoaderWorkers: {type(ds).__name__}.tokenizer can still grow its vocabulary (is_frozen is False). "
                "Each worker process would grow its own copy: the ids would differ between workers and the main process "
                "would never see them. Build the vocabulary once from all texts before training (CharTokenizer.from_texts) "
                "and encode in the Dataset's __init__ (PairDataset does), or use DataLoaderWorkers(num_workers=0)"
            )


def default_workers() -> int:
    """Worker processes for this machine: one core stays with the training process, at most 4 workers."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(4, cores - 1))


class DataLoaderWorkers(BatchSource):
    """Load batches in worker processes, pinned, for data that stays on the host (role ``batches``).

    Builds one DataLoader per data (a ``TensorDataset`` for tensors, the Dataset as it is)
    whose batch sampler follows the plain loop's micro-batches every epoch, so the batches
    are exactly the plain loop's (sharded per process under DDP); with
    ``persistent_workers`` the workers start once and serve every epoch and every later
    ``fit`` or ``train_epoch`` on the same data. The global RNG is advanced as the plain
    loop's DataLoader would, so dropout draws the same masks. The workers stop when a
    run ends with an error, when other data comes, or at :meth:`close`.

    A Dataset whose ``tokenizer`` has ``is_frozen`` False is refused (each worker would
    grow its own vocabulary); one without ``is_frozen`` is used with a warning. A
    DataLoader given to ``fit`` is refused: this strategy builds its own.

    Args:
        num_workers: worker processes (0: load in the main process); ``None``: one per
            core but one, at most 4 (:func:`default_workers`; 1 on a 2-core machine).
        pin_memory: pin batches so copies to the GPU overlap compute; only used when the
            trainer's device is CUDA (pinning is pointless for a CPU device).
        persistent_workers: keep the workers between epochs (ignored with 0 workers).
    """

    def __init__(self, num_workers: int | None = None, pin_memory: bool = True, persistent_workers: bool = True) -> None:
        owner = "DataLoaderWorkers"
        if num_workers is None:
            num_workers = default_workers()
        self.num_workers = check_positive_int("num_workers", num_workers, owner, minimum=0)
        self.pin_memory = check_bool("pin_memory", pin_memory, owner)
        self.persistent_workers = check_bool("persistent_workers", persistent_workers, owner)
        self._pin = False
        self._workers: _Workers | None = None

    def setup(self, trainer: "FastTrainer") -> None:
        self._pin = self.pin_memory and trainer.device.type == "cuda"

    @property
    def workers_running(self) -> bool:
        """Whether a DataLoader (and its worker processes, if any) is kept for the next epoch."""
        return self._workers is not None

    def _loader_for(self, source: "DataSource") -> _Workers:
        key = _source_key(source)
        if self._workers is not None and self._workers.key == key:
            return self._workers
        self.close()
        if source.loader is not None:
            raise ValueError(
                "DataLoaderWorkers builds its own DataLoader; pass the Dataset (loader.dataset) or the (src, tgt) tensors "
                "to fit() instead, or drop DataLoaderWorkers and set num_workers/pin_memory on your DataLoader"
            )
        if source.tensors is not None:
            dataset: Any = TensorDataset(*source.tensors)
        else:
            dataset = source.dataset
            if self.num_workers > 0:
                _check_tokenizers(dataset)
        sampler = _EpochBatches()
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self._pin,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            generator=torch.Generator(),  # worker seeds from here, not from the global RNG (see draws_seed)
        )
        self._workers = _Workers(key, _source_owner(source), loader, sampler, len(dataset), _plain_loop_draws_seed(source))
        return self._workers

    def batches(self, trainer: "FastTrainer", source: "DataSource", epoch: int) -> Iterator[Any]:
        w = self._loader_for(source)
        order = trainer.epoch_order(w.n, epoch) if source.shuffle else torch.arange(w.n)
        w.sampler.batches = [i.tolist() for i in trainer.roles.distribution.batch_indices(trainer, order, source.batch_size)]
        if w.draws_seed:
            _draw_like_a_dataloader()
        yield from w.loader

    @contextlib.contextmanager
    def _stop_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.close()  # a failed run may have left workers mid-epoch
            raise

    def run_scope(self, trainer: "FastTrainer") -> ContextManager[Any]:
        """Workers outlive a run that ends normally (the next run reuses them); an error stops them."""
        return self._stop_on_error()

    def close(self) -> None:
        """Stop the worker processes (a later epoch starts new ones); idempotent.

        The DataLoader is dropped: its iterator, referenced from nowhere else, shuts its
        workers down as it is freed (torch's own clean-up, no private call).
        """
        self._workers = None
