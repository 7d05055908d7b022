"""DistributedDataParallel: one process per device under ``torchrun``, computing the one-process loop.

Each process trains on its own slice of every global batch; gradients are averaged
across processes by :class:`torch.nn.parallel.DistributedDataParallel`. With the
trainer's ``loss_normalization="tokens"`` the token count a step is divided by is summed
over all processes, so ``W`` processes at micro-batch ``B`` compute what one process at
micro-batch ``B × W`` computes, sample for sample (up to float rounding).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import TYPE_CHECKING, Any, ContextManager, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as TorchDDP
from torch.utils.data import DataLoader, DistributedSampler

from .base import Strategy

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import DataSource, FastTrainer

__all__ = ["DistributedDataParallel", "shard_batches"]

log = logging.getLogger("hlbd_fast")

_BACKENDS = ("nccl", "gloo")
_LAUNCH = "launch with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"

# meter layout (hlbd_fast.trainer.EpochMeter); repeated here to avoid an import cycle
_LOSS_SUM, _TOKENS, _MB_LOSS_SUM, _EMPTY, _SKIPPED, _FIRST_BAD = range(6)


def shard_batches(order: torch.Tensor, batch_size: int, world_size: int, rank: int) -> list[torch.Tensor]:
    """The sample indices of rank ``rank``'s micro-batches for one epoch.

    Global batch ``i`` is ``order[i*B*W : (i+1)*B*W]`` (``B = batch_size``, ``W =
    world_size``) and rank ``r`` takes its ``r``-th contiguous chunk, so the chunks of
    all ranks, concatenated in rank order, are the global batch: the one-process loop at
    micro-batch ``B × W`` sees the same samples in the same steps. The last, partial
    global batch of ``m`` samples is split as evenly as possible (the first ``m % W``
    ranks take one more), so every rank has the same number of micro-batches. When
    ``m < W`` the ranks ``r >= m`` get an empty index tensor for it.

    Args:
        order: the epoch's sample order (a permutation of ``range(n)``).
        batch_size: micro-batch size per process.
        world_size: number of processes.
        rank: this process, ``0 <= rank < world_size``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must satisfy 0 <= rank < world_size={world_size}")
    n, glob = int(order.numel()), batch_size * world_size
    out = []
    for start in range(0, n, glob):
        m = min(glob, n - start)
        size, extra = divmod(m, world_size)
        lo = start + rank * size + min(rank, extra)
        out.append(order[lo : lo + size + (1 if rank < extra else 0)])
    return out


class _ErrorsOnly(logging.Filter):
    """Lets only errors of the ``hlbd_fast`` logger through (processes other than rank 0)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_QUIET = _ErrorsOnly()


class DistributedDataParallel(Strategy):
    """Train with one process per device under ``torchrun``; equal to one process at ``B × W``.

    When the process was started by ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set), or a
    process group is already initialised, the strategy:

    * initialises the default process group if needed (``nccl`` on CUDA, ``gloo`` on
      CPU), moves the model to ``cuda:LOCAL_RANK`` when the trainer trains on CUDA, and
      makes every process use rank 0's ``seed`` (the sample order depends only on it);
    * wraps the model in :class:`torch.nn.parallel.DistributedDataParallel` (``order``
      50: after in-place surgery, before compilation), which starts every process from
      rank 0's weights;
    * shards the data (see :func:`shard_batches`): ``batch_size`` stays per process and
      the global batch is ``batch_size × world_size × accumulation steps``. A DataLoader
      is used as it is and must shard itself with a
      :class:`~torch.utils.data.DistributedSampler` (its ``set_epoch`` is called). When
      the last global batch has fewer samples than processes, a process without a
      sample runs one stand-in row (a copy of a real row whose targets are all
      ``pad_id``): zero tokens, zero loss, zero gradient, not counted in the figures;
    * skips the gradient all-reduce on every micro-batch but the last of a step;
    * sums the step's non-pad token count over processes, so the averaged gradient is
      the gradient of the global batch (``loss_normalization="tokens"``);
      ``"micro_batch"`` keeps the classic DDP loop: the mean of the processes' means;
    * sums the epoch's figures over processes, so ``History`` holds global figures;
      ``micro_batches`` and ``optimizer_steps`` are per process (equal on every rank:
      one micro-batch per process per global batch);
    * shows the progress bar, logs (below ERROR) and writes ``fit``'s checkpoints on
      rank 0 only.

    Without ``RANK``/``WORLD_SIZE`` it does nothing and owns no hook (one log line), so
    the same script runs as one process.

    Every read of the running loss is a collective: all processes must read at the
    same steps. ``DeferredLossSync(every=N)`` and ``EagerLossSync`` read at fixed steps;
    without a loss-sync strategy the trainer reads at the epoch's end only (its default
    clock-driven reads differ between processes), and rank 0's bar shows the loss then.

    A ``Ctrl-C`` under torchrun ends every process; resume from the last epoch checkpoint.

    Put ``DistributedDataParallel()`` first among the strategies: it may move the model
    to another device in its set-up, and set-ups run in the order given.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; ``None`` picks ``nccl`` when training on CUDA,
            ``gloo`` on CPU. Ignored when a process group is already initialised.
        find_unused_parameters: passed to :class:`torch.nn.parallel.DistributedDataParallel`;
            needed when some parameters get no gradient in a step.

    Raises:
        ValueError: only one of ``RANK``/``WORLD_SIZE`` is set or they are out of range;
            ``MASTER_ADDR``/``MASTER_PORT`` are missing (no rendezvous); ``nccl`` without
            CUDA; a model already wrapped in DDP; a DataLoader without a
            DistributedSampler; an unknown backend.
    """

    order = 50

    def __init__(self, backend: str | None = None, find_unused_parameters: bool = False) -> None:
        if backend is not None and backend not in _BACKENDS:
            raise ValueError(
                f"DistributedDataParallel(backend={backend!r}): backend must be one of {_BACKENDS}, "
                "or None (nccl on CUDA, gloo on CPU)"
            )
        self.backend = backend
        self.find_unused_parameters = bool(find_unused_parameters)
        self._active = _launched()
        self._rank = 0
        self._world = 1
        self._device: torch.device | None = None
        self._ddp: TorchDDP | None = None
        self._trainer: FastTrainer | None = None
        self._dummy_at: int | None = None  # index in the epoch of this rank's stand-in micro-batch

    # ------------------------------------------------------------------ public state
    @property
    def active(self) -> bool:
        """Whether this process is one of several (launched by torchrun or a process group)."""
        return self._active

    @property
    def rank(self) -> int:
        """This process's rank (0 when not distributed)."""
        return self._rank

    @property
    def world_size(self) -> int:
        """Number of processes (1 when not distributed)."""
        return self._world

    @property
    def is_main(self) -> bool:
        """True on rank 0: the process that logs and writes checkpoints."""
        return self._rank == 0

    def owned_hooks(self) -> frozenset[str]:
        """The data, token count and metric hooks when distributed; none otherwise."""
        return super().owned_hooks() if self._active else frozenset()

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: "FastTrainer") -> None:
        if isinstance(trainer.model, TorchDDP):
            raise ValueError(
                "the model given to FastTrainer is already a torch DistributedDataParallel; "
                "pass the bare module (model.module): DistributedDataParallel() wraps it"
            )
        if not self._active:
            if dist.is_available() and dist.is_initialized():
                raise ValueError(
                    "a process group was initialised after DistributedDataParallel() was built; "
                    "build the strategy after init_process_group (or let it initialise the group)"
                )
            log.info("DistributedDataParallel: RANK/WORLD_SIZE not set (not launched by torchrun); training in one process")
            batches = trainer.owner("make_batches")
            if batches is not None:
                warnings.warn(
                    f"{type(batches).__name__} decides the batches, and DistributedDataParallel shards them under "
                    "torchrun, so there the two are refused together (StrategyConflictError); "
                    f"drop {type(batches).__name__} from distributed runs",
                    stacklevel=3,
                )
            return
        device = _local_device(trainer.device)
        if dist.is_initialized():
            backend = str(dist.get_backend())
        else:
            backend = self.backend or ("nccl" if device.type == "cuda" else "gloo")
        if backend == "nccl" and device.type != "cuda":
            why = "this machine has no CUDA device" if not torch.cuda.is_available() else f"the trainer's device is {device}"
            raise ValueError(
                f"backend 'nccl' needs CUDA tensors, but {why}; use backend='gloo' "
                "(or None: nccl on CUDA, gloo on CPU), or train on CUDA"
            )
        if device.type == "cuda":
            torch.cuda.set_device(device)  # nccl binds each process to the current device
        if not dist.is_initialized():
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
            if missing:
                raise ValueError(
                    f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} is set but {' and '.join(missing)} "
                    f"{'is' if len(missing) == 1 else 'are'} not: the processes cannot find each other; "
                    f"{_LAUNCH}, or set MASTER_ADDR and MASTER_PORT to rank 0's host and a free port"
                )
            dist.init_process_group(backend=backend)
        self._rank, self._world = dist.get_rank(), dist.get_world_size()
        self._device = device
        trainer.model.to(device)
        trainer.device = device  # the optimizer and the meter are built after set-up
        seed = torch.tensor([trainer.seed], dtype=torch.int64, device=device)
        dist.broadcast(seed, src=0)
        trainer.seed = int(seed.item())  # host sync, once at set-up: every rank uses rank 0's order
        self._trainer = trainer
        trainer.writes_checkpoints = self._rank == 0  # fit's and save()'s checkpoints: rank 0 only
        if self._rank != 0:
            trainer.progress = False
            if _QUIET not in log.filters:
                log.addFilter(_QUIET)
        log.info(
            "DistributedDataParallel: %d processes, backend %s, rank 0 on %s; global batch = batch_size x %d x accumulation steps",
            self._world, backend, device, self._world,
        )

    def wrap_model(self, model: nn.Module) -> nn.Module:
        if isinstance(model, TorchDDP):
            raise ValueError(
                "the model is already wrapped in torch DistributedDataParallel; pass the bare module "
                "and let DistributedDataParallel() wrap it once"
            )
        if not self._active:
            return model
        assert self._device is not None
        ids = [self._device] if self._device.type == "cuda" else None
        self._ddp = TorchDDP(model, device_ids=ids, find_unused_parameters=self.find_unused_parameters)
        return self._ddp

    # ------------------------------------------------------------------ data
    def make_batches(self, trainer: "FastTrainer", source: "DataSource", epoch: int) -> Iterator[Any]:
        if source.loader is not None:
            yield from self._loader_batches(source.loader, epoch)
            return
        n = len(source)
        order = trainer.epoch_order(n, epoch) if source.shuffle else torch.arange(n)
        chunks = shard_batches(order, source.batch_size, self._world, self._rank)
        tail = n - (len(chunks) - 1) * source.batch_size * self._world
        # every rank builds the stand-in when the tail is short, so a bad format fails on all ranks
        stand_in = self._stand_in(trainer, source, order[n - tail : n - tail + 1], tail) if tail < self._world else None
        self._dummy_at = len(chunks) - 1 if len(chunks[-1]) == 0 else None
        real = chunks[:-1] if self._dummy_at is not None else chunks
        if source.tensors is not None:
            s, t = source.tensors
            for idx in real:
                yield s[idx], t[idx]
        else:
            yield from DataLoader(source.dataset, batch_sampler=[c.tolist() for c in real])  # type: ignore[arg-type]
        if self._dummy_at is not None:
            yield stand_in

    def num_batches(self, source: "DataSource") -> int | None:
        """Micro-batches this process runs per epoch (the number of global batches), when known."""
        if source.loader is not None or not self._active:
            return source.num_batches()
        return -(-len(source) // (source.batch_size * self._world))

    def _stand_in(self, trainer: "FastTrainer", source: "DataSource", idx: torch.Tensor, tail: int) -> Any:
        """One real row whose targets (after the first token) are all ``pad_id``: zero tokens."""
        if source.tensors is not None:
            batch: Any = (source.tensors[0][idx], source.tensors[1][idx])
        else:
            batch = next(iter(DataLoader(source.dataset, batch_sampler=[idx.tolist()])))  # type: ignore[arg-type]
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and all(isinstance(x, torch.Tensor) for x in batch[:2]) and batch[1].dim() == 2):
            raise ValueError(
                f"the last global batch has {tail} samples, fewer than the {self._world} processes, and the "
                "Dataset's items are not (src, tgt) tensor pairs, so no zero-token stand-in row can be built; "
                f"use a sample count whose remainder modulo batch_size x world_size is 0 or >= {self._world}"
            )
        tgt = batch[1].clone()
        tgt[:, 1:] = trainer.pad_id
        items = [batch[0], tgt, *batch[2:]]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)

    def _loader_batches(self, loader: DataLoader, epoch: int) -> Iterator[Any]:
        sampler = loader.sampler if isinstance(loader.sampler, DistributedSampler) else getattr(loader.batch_sampler, "sampler", None)
        if not isinstance(sampler, DistributedSampler):
            raise ValueError(
                "fit got a DataLoader, which is used as it is, so under DistributedDataParallel it must shard "
                "itself: build it with sampler=DistributedSampler(dataset), or pass the (src, tgt) tensors or "
                "the Dataset and let DistributedDataParallel shard them"
            )
        if sampler.num_replicas != self._world or sampler.rank != self._rank:
            raise ValueError(
                f"the DataLoader's DistributedSampler has num_replicas={sampler.num_replicas}, rank={sampler.rank} "
                f"but this process is rank {self._rank} of {self._world}; build it after the process group exists"
            )
        sampler.set_epoch(epoch)
        self._dummy_at = None
        yield from loader

    # ------------------------------------------------------------------ the step
    def micro_step_context(self, last: bool) -> ContextManager[Any]:
        if self._ddp is None or last:
            return contextlib.nullcontext()
        return self._ddp.no_sync()  # accumulate locally; the step's last backward all-reduces

    def global_token_count(self, local_tokens: torch.Tensor) -> torch.Tensor:
        assert self._trainer is not None
        if self._trainer.loss_normalization != "tokens":
            return local_tokens  # "micro_batch" divides by each micro-batch's own count
        total = local_tokens.detach().clone()
        dist.all_reduce(total)  # SUM over ranks; queued on the device, no host sync
        # DDP averages gradients over W ranks: dividing each rank's summed loss by total / W
        # makes that average the gradient of (sum over all tokens) / total
        return total / self._world

    # ------------------------------------------------------------------ figures
    def reduce_metrics(self, values: torch.Tensor) -> torch.Tensor:
        trainer = self._trainer
        assert trainer is not None
        local_mb = trainer.meter.micro_batches
        dummy = 1 if self._dummy_at is not None and local_mb > self._dummy_at else 0
        # a small host-to-device copy; the trainer reads the result back right after anyway
        sums = torch.cat([values[:4], values.new_tensor([local_mb - dummy])])
        sums[_EMPTY] -= dummy
        dist.all_reduce(sums)
        first_bad = values[_FIRST_BAD]
        neg_first = torch.where(first_bad >= 0, -first_bad, torch.full_like(first_bad, float("-inf")))
        maxes = torch.stack([values[_SKIPPED], neg_first])
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX)  # skipped: same on all ranks; first bad: earliest
        out = values.clone()
        out[:4] = sums[:4]
        # the trainer divides by this rank's micro-batch count; make that the mean over all ranks'
        out[_MB_LOSS_SUM] = sums[_MB_LOSS_SUM] * local_mb / sums[4].clamp(min=1)
        out[_SKIPPED] = maxes[0]
        out[_FIRST_BAD] = torch.where(torch.isinf(maxes[1]), torch.full_like(maxes[1], -1.0), -maxes[1])
        return out

    def on_epoch_start(self, trainer: "FastTrainer", epoch: int) -> None:
        self._dummy_at = None


def _launched() -> bool:
    """Whether this process is part of a distributed run; checks the torchrun variables."""
    if dist.is_available() and dist.is_initialized():
        return True
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None and world is None:
        return False
    if rank is None or world is None:
        have, lack = ("WORLD_SIZE", "RANK") if rank is None else ("RANK", "WORLD_SIZE")
        raise ValueError(f"{have}={os.environ[have]} is set but {lack} is not; {_LAUNCH}")
    try:
        r, w = int(rank), int(world)
    except ValueError:
        raise ValueError(f"RANK={rank!r} and WORLD_SIZE={world!r} must be integers; {_LAUNCH}") from None
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"RANK={r} and WORLD_SIZE={w} must satisfy 0 <= RANK < WORLD_SIZE; {_LAUNCH}")
    if not dist.is_available():
        raise ValueError("WORLD_SIZE is set but this PyTorch build has no torch.distributed support")
    return True


def _local_device(device: torch.device) -> torch.device:
    """``cuda:LOCAL_RANK`` when training on CUDA, else the trainer's device."""
    local = os.environ.get("LOCAL_RANK")
    if device.type != "cuda":
        return device
    if local is None:  # a group started by the user: keep their device, with an index
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    i, count = int(local), torch.cuda.device_count()
    if i >= count:
        raise ValueError(
            f"LOCAL_RANK={i} but this process sees {count} CUDA device(s); start at most one process per GPU "
            "(torchrun --nproc_per_node <= GPUs per machine) and do not narrow CUDA_VISIBLE_DEVICES per process"
        )
    return torch.device("cuda", i)
