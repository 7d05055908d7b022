"""Where a training step's time goes, measured on *your* model.

:func:`diagnose` trains a copy of a model for a few steps with :class:`FastTrainer` and
measures, in separate passes so that one measurement does not distort the next:

1. **warm-up** (``warmup`` steps): one-off costs (allocator, compilation, CUDA graph
   capture) and the padding of the batches. A step role that captures each step shape
   (:class:`~hlbd_fast.strategies.CUDAGraphStep`: a shape is captured after
   ``warmup_steps`` eager runs of it, and TrimPadding buckets make several shapes) is
   then warmed up by whole epochs until an epoch runs on captured graphs only (at most
   ``warmup_steps + 2`` epochs), so that no capture happens in a measured pass.
2. **clean pass** (``steps`` steps): the honest wall time of a step, nothing added.
3. **timed pass** (``steps`` steps): the split of a step into data, forward (the
   model's forward), backward (the loss and its backward), optimizer (clip + step +
   zero_grad), loss read-back and other; and every module's *self* time: the time
   inside its ``forward`` minus the time of the modules it called, so containers and
   the root do not hide the culprit. On CUDA this pass synchronises the device at every
   boundary (a diagnostic may: otherwise host timestamps say nothing about queued GPU
   work), so its shares are those of a serialised step; the step time reported comes
   from the clean pass. When a step role replaces the step (CUDAGraphStep), nothing of
   the doctor runs inside it — no forward hook, no timestamp, no sync: a sync inside a
   step being captured would make the capture fail — and the step is timed whole, from
   :meth:`~hlbd_fast.strategies.Strategy.on_step_start` to ``on_step_end``.
4. **sync pass** (up to 5 steps): every host-device synchronisation (``.item()``,
   ``float()``/``bool()`` of a tensor, ``.tolist()``, ``.cpu()``, boolean-mask
   indexing, ``nonzero``...), attributed to the innermost module running, with the
   line of code that asked for it. On CUDA the device itself reports them
   (``torch.cuda.set_sync_debug_mode("warn")``); on CPU there is no device to wait
   for, so the operations that would wait on a GPU are counted instead.
5. **profiler pass** (up to 5 steps): ``torch.profiler``'s busiest operators, and on
   CUDA the device's busy time per step against the wall time (host-bound or not).

The doctor watches the plain :class:`FastTrainer` through its public seams only: a
private strategy (the probe, listed first) marks the step's boundaries with the
strategy hooks, forward hooks on the module the loop calls time the forward, and the
trainer's ``loss_read_seconds`` times the read-backs.

It then writes recommendations ordered by the share of the step they address, each
based on the numbers above. ``str(diagnosis)`` is the report; ``diagnosis.to_dict()``
is the same as JSON-ready data. From the shell: ``hlbd-fast doctor``.

The package: :mod:`.report` (the results and their text), :mod:`.probe` (the probe
strategy, forward hooks, sync counting), :mod:`.passes` (:func:`diagnose` and its passes),
:mod:`.rules` (the recommendations) and :mod:`.cli` (``hlbd-fast doctor``).
"""

from __future__ import annotations

from .cli import add_arguments, main, run
from .passes import diagnose
from .report import ClassTime, Diagnosis, DoctorError, ModuleTime, OpTime, Recommendation, SyncSource

__all__ = [
    "Diagnosis",
    "DoctorError",
    "ClassTime",
    "ModuleTime",
    "OpTime",
    "Recommendation",
    "SyncSource",
    "add_arguments",
    "diagnose",
    "main",
    "run",
]
