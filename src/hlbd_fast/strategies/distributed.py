"""DistributedTraining: one process per device under ``torchrun``, computing the one-process loop.

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
from typing import TYPE_CHECKING, Any, ContextManager, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as TorchDDP
from torch.utils.data import DataLoader, DistributedSampler

from .._validation import is_token_pair
from ..batches import blank_targets
from .base import Distribution
from .needs import Capability, Computes, Context, Declaration, Need

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import FastTrainer

__all__ = ["DistributedTraining", "shard_batches", "local_device"]

log = logging.getLogger("hlbd_fast")

_BACKENDS = ("nccl", "gloo")
_LAUNCH = "launch with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX} if dist.is_available() else {}


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


class DistributedTraining(Distribution):
    """Train with one process per device under ``torchrun``; equal to one process at ``B × W`` (role ``distribution``).

    When the process was started by ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set), or a
    process group is already initialised, the strategy:

    * decides the device before the model moves anywhere: ``cuda:LOCAL_RANK`` (set as the
      current device first, as torch's DDP tutorial does), or ``cuda:0`` when each process
      sees one GPU (``CUDA_VISIBLE_DEVICES`` set per process, as under SLURM);
      initialises the default process group if needed (``nccl`` on CUDA, ``gloo`` on CPU)
      and makes every process use rank 0's ``seed`` (the sample order depends only on it);
    * wraps the model in torch's :class:`torch.nn.parallel.DistributedDataParallel`
      (``order`` 50: after in-place surgery, before compilation), which starts every
      process from rank 0's weights;
    * shards every epoch's micro-batches (see :func:`shard_batches`) for any batch source
      (the plain one, :class:`~hlbd_fast.strategies.DevicePreload`,
      :class:`~hlbd_fast.strategies.DataLoaderWorkers`): ``batch_size`` stays per process
      and the global batch is ``batch_size × world_size × accumulation steps``. A
      DataLoader given to ``fit`` is used as it is and must shard itself with a
      :class:`~torch.utils.data.DistributedSampler` (its ``set_epoch`` is called). When
      the last global batch has fewer samples than processes, a process without a sample
      runs one stand-in row (a copy of a real row whose targets are all ``pad_id``): zero
      tokens, zero loss, zero gradient, not counted in the figures;
    * skips the gradient all-reduce on every micro-batch but the last of a step;
    * sums the step's non-pad token count over processes, so the averaged gradient is
      the gradient of the global batch (``loss_normalization="tokens"``);
      ``"micro_batch"`` keeps the classic DDP loop: the mean of the processes' means;
    * combines the epoch's figures over processes, so ``History`` holds global figures;
      ``micro_batches`` and ``optimizer_steps`` are per process (equal on every rank);
    * shows the progress bar, logs (below ERROR) and writes checkpoints on rank 0 only.

    Without ``RANK``/``WORLD_SIZE`` it is the one-process default (one log line), so the
    same script runs as one process.

    Every read of the running loss is a collective: all processes must read at the
    same steps. ``DeferredLossSync(every=N)`` and ``EagerLossSync`` read at fixed steps;
    the default read-back policy reads at the epoch's end only (its clock-driven reads
    would differ between processes).

    A ``Ctrl-C`` under torchrun ends every process; resume from the last epoch checkpoint.
    Launched, it brings collectives into the step, which :class:`CUDAGraphStep` refuses.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; ``None`` picks ``nccl`` when training on CUDA,
            ``gloo`` on CPU. Ignored when a process group is already initialised.
        find_unused_parameters: passed to torch's DistributedDataParallel; needed when
            some parameters get no gradient in a step.

    Raises:
        ValueError: only one of ``RANK``/``WORLD_SIZE`` is set or they are out of range;
            ``MASTER_ADDR``/``MASTER_PORT`` are missing (no rendezvous); ``nccl`` without
            CUDA; a model already wrapped in torch's DistributedDataParallel; a DataLoader
            without a DistributedSampler; an unknown backend.
    """

    order = 50

    def __init__(self, backend: str | None = None, find_unused_parameters: bool = False) -> None:
        if backend is not None and backend not in _BACKENDS:
            raise ValueError(f"DistributedTraining(backend={backend!r}): backend must be one of {_BACKENDS}, or None (nccl on CUDA, gloo on CPU)")
        self.backend = backend
        self.find_unused_parameters = bool(find_unused_parameters)
        self._active = _launched()
        self._rank = 0
        self._world = 1
        self._device: torch.device | None = None
        self._ddp: TorchDDP | None = None
        self._stand_in_at: int | None = None  # index in the epoch of this rank's stand-in micro-batch
        self._seen = 0  # micro-batches prepared this epoch
        self._stand_ins = 0  # stand-ins prepared this epoch

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

    # ------------------------------------------------------------------ set-up
    def declare(self, context: Context) -> Declaration:
        if not self._active:
            return Declaration()
        why = "DistributedTraining all-reduces token counts and gradients inside every step"
        return Declaration(provides=(Need(Capability.COLLECTIVES_IN_STEP, why),), computes=Computes.ROUNDING)

    def resolve_device(self, device: torch.device) -> torch.device:
        """This process's device, set current before anything moves there; the process group is joined here."""
        if not self._active:
            return device
        device = local_device(device)
        backend = str(dist.get_backend()) if dist.is_initialized() else self.backend or ("nccl" if device.type == "cuda" else "gloo")
        if backend == "nccl" and device.type != "cuda":
            why = "this machine has no CUDA device" if not torch.cuda.is_available() else f"the trainer's device is {device}"
            raise ValueError(f"backend 'nccl' needs CUDA tensors, but {why}; use backend='gloo' (or None: nccl on CUDA, gloo on CPU), or train on CUDA")
        if device.type == "cuda":
            torch.cuda.set_device(device)  # before any CUDA work: nccl binds each process to the current device
        if not dist.is_initialized():
            _check_rendezvous()
            dist.init_process_group(backend=backend)
        self._rank, self._world = dist.get_rank(), dist.get_world_size()
        self._device = device
        return device

    def setup(self, trainer: "FastTrainer") -> None:
        if isinstance(trainer.model, TorchDDP):
            raise ValueError(
                "the model given to FastTrainer is already wrapped in torch's DistributedDataParallel; "
                "pass the bare module (model.module): DistributedTraining() wraps it"
            )
        if not self._active:
            if dist.is_available() and dist.is_initialized():
                raise ValueError(
                    "a process group was initialised after DistributedTraining() was built; "
                    "build the strategy after init_process_group (or let it initialise the group)"
                )
            log.info("DistributedTraining: RANK/WORLD_SIZE not set (not launched by torchrun); training in one process")
            return
        seed = torch.tensor([trainer.seed], dtype=torch.int64, device=trainer.device)
        dist.broadcast(seed, src=0)
        trainer.seed = int(seed.item())  # host sync, once at set-up: every rank uses rank 0's order
        if self._rank != 0:
            trainer.progress = False
            if _QUIET not in log.filters:
                log.addFilter(_QUIET)
        log.info(
            "DistributedTraining: %d processes, backend %s, rank 0 on %s; global batch = batch_size x %d x accumulation steps",
            self._world,
            dist.get_backend(),
            trainer.device,
            self._world,
        )

    def wrap_model(self, trainer: "FastTrainer", model: nn.Module) -> nn.Module:
        if isinstance(model, TorchDDP):
            raise ValueError("the model is already wrapped in torch's DistributedDataParallel; pass the bare module and let DistributedTraining() wrap it once")
        if not self._active:
            return model
        assert self._device is not None
        ids = [self._device] if self._device.type == "cuda" else None
        self._ddp = TorchDDP(model, device_ids=ids, find_unused_parameters=self.find_unused_parameters)
        return self._ddp

    # ------------------------------------------------------------------ data
    def on_epoch_start(self, trainer: "FastTrainer", epoch: int) -> None:
        self._stand_in_at, self._seen, self._stand_ins = None, 0, 0

    def batch_indices(self, trainer: "FastTrainer", order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        """This rank's shard of every global batch; an empty shard becomes a one-row stand-in."""
        chunks = shard_batches(order, batch_size, self._world, self._rank)
        if len(chunks[-1]) == 0:  # the last global batch has fewer samples than processes
            tail = order.numel() - (len(chunks) - 1) * batch_size * self._world
            chunks[-1] = order[order.numel() - tail : order.numel() - tail + 1]
            self._stand_in_at = len(chunks) - 1
        return chunks

    def iterate_loader(self, trainer: "FastTrainer", loader: DataLoader, epoch: int) -> Iterator[Any]:
        """A DataLoader given to ``fit`` must shard itself: with a DistributedSampler of this group."""
        if not self._active:
            yield from loader
            return
        sampler = loader.sampler if isinstance(loader.sampler, DistributedSampler) else getattr(loader.batch_sampler, "sampler", None)
        if not isinstance(sampler, DistributedSampler):
            raise ValueError(
                "fit got a DataLoader, which is used as it is, so under DistributedTraining it must shard "
                "itself: build it with sampler=DistributedSampler(dataset), or pass the (src, tgt) tensors or "
                "the Dataset and let DistributedTraining shard them"
            )
        if sampler.num_replicas != self._world or sampler.rank != self._rank:
            raise ValueError(
                f"the DataLoader's DistributedSampler has num_replicas={sampler.num_replicas}, rank={sampler.rank} "
                f"but this process is rank {self._rank} of {self._world}; build it after the process group exists"
            )
        sampler.set_epoch(epoch)
        yield from loader

    def prepare_batch(self, trainer: "FastTrainer", batch: Any) -> Any:
        """Blank the targets of this rank's stand-in micro-batch: zero tokens, nothing learned."""
        index, self._seen = self._seen, self._seen + 1
        if index != self._stand_in_at:
            return batch
        if not is_token_pair(batch):
            raise ValueError(
                f"the last global batch has fewer samples than the {self._world} processes, and the Dataset's items "
                "are not (src, tgt) tensor pairs, so no zero-token stand-in row can be built; use a sample count whose "
                f"remainder modulo batch_size x world_size is 0 or >= {self._world}"
            )
        self._stand_ins += 1
        return blank_targets(batch, trainer.pad_id)

    # ------------------------------------------------------------------ the step
    def gradient_sync(self, trainer: "FastTrainer", last: bool) -> ContextManager[Any]:
        if self._ddp is None or last:
            return contextlib.nullcontext()
        return self._ddp.no_sync()  # accumulate locally; the step's last backward all-reduces

    def global_tokens(self, trainer: "FastTrainer", local: torch.Tensor) -> torch.Tensor:
        if not self._active or trainer.loss_normalization != "tokens":
            return local  # "micro_batch" divides by each micro-batch's own count
        total = local.detach().clone()
        dist.all_reduce(total)  # SUM over ranks; queued on the device, no host sync
        # DDP averages gradients over W ranks: dividing each rank's summed loss by total / W
        # makes that average the gradient of (sum over all tokens) / total
        return total / self._world

    # ------------------------------------------------------------------ figures
    def all_reduce(self, trainer: "FastTrainer", tensor: torch.Tensor, op: str) -> torch.Tensor:
        if not self._active:
            return tensor
        out = tensor.clone()
        dist.all_reduce(out, op=_OPS[op])
        return out

    def stand_ins(self, trainer: "FastTrainer") -> int:
        return self._stand_ins


def _check_rendezvous() -> None:
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} is set but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: the processes cannot find each other; "
            f"{_LAUNCH}, or set MASTER_ADDR and MASTER_PORT to rank 0's host and a free port"
        )


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


def local_device(device: torch.device) -> torch.device:
    """``cuda:LOCAL_RANK`` when training on CUDA, else the trainer's device."""
    local = os.environ.get("LOCAL_RANK")
    if device.type != "cuda":
        return device
    if local is None:  # a group started by the user: keep their device, with an index
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    i, count = int(local), torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)  # one visible device per process (CUDA_VISIBLE_DEVICES set per rank)
    if i >= count:
        raise ValueError(
            f"LOCAL_RANK={i} but this process sees {count} CUDA devices; start at most one process per GPU "
            "(torchrun --nproc_per_node <= GPUs per machine), or give each process one device with CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", i)
