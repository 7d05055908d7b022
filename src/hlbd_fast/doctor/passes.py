"""The measurement: :func:`diagnose`, its passes over the training loop, and the :class:`Diagnosis` they add up to."""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .._validation import check_positive_int
from ..checkpoint import rng_state, set_rng_state
from ..history import reports_dict
from ..strategies.base import Strategy
from ..strategies.unpad import unpad_mode
from ..trainer import FastTrainer
from .pricing import PaddingPrice, price_padding
from .probe import Probe, SyncCounter, forward_hooks
from .report import ClassTime, Diagnosis, DoctorError, ModuleTime, OpTime, SyncSource
from .rules import recommend

log = logging.getLogger("hlbd_fast")

_MAX_DETAIL_STEPS = 5  # steps of the sync and profiler passes (they slow a step down)


# ---------------------------------------------------------------------------- diagnose
def diagnose(
    model: nn.Module,
    data: Any,
    strategies: Sequence[Strategy] = (),
    steps: int = 20,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    *,
    warmup: int = 2,
    preset: Any = None,
    copy_model: bool = True,
    **trainer_kwargs: Any,
) -> Diagnosis:
    """Train a copy of ``model`` for a few steps and measure where a step's time goes.

    Args:
        model: the model, as :class:`FastTrainer` takes it (``model(src, tgt_in)``).
        data: what :meth:`FastTrainer.fit` takes: ``(src, tgt)`` tensors, a Dataset or a
            DataLoader.
        strategies: the speed-ups to diagnose with (copied; the given instances are
            not set up).
        steps: optimizer steps of the clean and timed passes (the sync and profiler
            passes run ``min(steps, 5)``).
        batch_size: micro-batch size; default 32, or the preset's.
        device: where to train; default the model's device.
        warmup: untimed steps first (compilation, allocator, CUDA graph capture); at
            least one more than a strategy's ``warmup_steps``. One-off costs that come
            later (a new input shape compiling or capturing again) land in the timed passes.
        preset: a :class:`~hlbd_fast.presets.Preset` or preset name; its strategies
            come before ``strategies`` and its batch size, loss normalisation and lr
            are the defaults.
        copy_model: train a deep copy (default), so ``model`` is untouched; ``False``
            trains ``model`` itself for ``warmup + ~3 * steps`` steps.
        **trainer_kwargs: more :class:`FastTrainer` arguments (``lr``, ``pad_id``,
            ``loss_normalization``, ``max_grad_norm``, ``seed``...). ``progress`` is
            always off.

    Returns:
        A :class:`Diagnosis`; print it for the report.

    Raises:
        DoctorError: a bad argument (the message names it and the fix).
    """
    _check_arguments(model, steps, warmup, batch_size, copy_model, trainer_kwargs)
    probe = Probe()
    kwargs = _trainer_arguments(probe, strategies, batch_size, device, preset, trainer_kwargs, model)
    if copy_model:
        model = _copy_model(model)
    dynamo_before = _graph_break_counter()
    rng = rng_state()  # the trainer seeds torch's RNG: the caller's stream is put back afterwards
    trainer = FastTrainer(model, **kwargs)
    try:
        measured = _measure(trainer, probe, data, steps, warmup)
        probe.stop()
        price = _price(trainer, probe)
        return _assemble(trainer, probe, measured, steps, dynamo_before, price)  # reads the reports before close
    finally:
        probe.stop()
        trainer.close()  # worker processes, captured graphs
        set_rng_state(rng)


def _check_arguments(model: Any, steps: Any, warmup: Any, batch_size: Any, copy_model: bool, trainer_kwargs: dict[str, Any]) -> None:
    """Refuse bad arguments before anything is built (a :class:`DoctorError` naming the fix)."""
    if not isinstance(model, nn.Module):
        raise DoctorError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        check_positive_int("steps", steps)
        check_positive_int("warmup", warmup, minimum=0)
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
    except ValueError as e:
        raise DoctorError(str(e)) from None
    if "optimizer" in trainer_kwargs and copy_model:
        raise DoctorError(
            "optimizer= holds the parameters of the model you passed, but diagnose trains a copy; "
            "pass copy_model=False to train the given model with that optimizer"
        )


def _trainer_arguments(
    probe: Probe,
    strategies: Sequence[Strategy],
    batch_size: int | None,
    device: str | torch.device | None,
    preset: Any,
    extra: dict[str, Any],
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """:class:`FastTrainer` keyword arguments: the preset's (fitted to ``model``), overridden by the caller's; the probe first."""
    overrides = {k: v for k, v in extra.items() if k != "progress"}
    overrides.setdefault("seed", 0)
    overrides.update(strategies=tuple(strategies), device=device, progress=False)
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    if preset is not None:
        from ..presets import resolve_preset

        kwargs = resolve_preset(preset, device, model).trainer_kwargs(**overrides)
    else:
        kwargs = {"batch_size": 32, **overrides}
    try:
        copied = copy.deepcopy(tuple(kwargs["strategies"]))
    except Exception:  # noqa: BLE001 - a strategy holding something uncopyable: use it as given
        log.info("doctor: strategies could not be copied; using the given instances")
        copied = tuple(kwargs["strategies"])
    # first: its prepare_batch sees the batches before TrimPadding cuts them
    kwargs["strategies"] = (probe, *copied)
    return kwargs


def _copy_model(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise DoctorError(f"the model could not be deep-copied ({e}); pass copy_model=False to train it in place") from e


# ---------------------------------------------------------------------------- the passes
@dataclass
class _Measured:
    """What the passes measured, before it is assembled into a :class:`Diagnosis`."""

    step_s: float  # clean pass, seconds per step
    timed: dict[str, float]  # timed pass, seconds over all its steps per phase (and "total")
    sync_steps: int  # steps of the sync pass; 0: not measured
    ops: list[OpTime]
    device_s: float | None
    kernels: float  # CUDA kernels per step
    compiled: bool
    notes: list[str]


def _run_pass(trainer: FastTrainer, probe: Probe, data: Any, mode: str, steps: int) -> dict[str, float]:
    """Train ``steps`` optimizer steps (as many epochs as that takes) recorded as ``mode``; return the sums."""
    probe.start_pass(trainer, mode, steps)
    while probe.recording:
        before = probe.steps
        trainer.train_epoch(data)
        if probe.steps == before:
            raise DoctorError("data yielded no optimizer step; check the data and batch_size")
    return probe.finish_pass()


def _warmup_steps(trainer: FastTrainer, warmup: int) -> int:
    """``warmup``, at least 1 (the padding is looked at there), and past every strategy's own warm-up.

    A strategy that runs its first steps differently (CUDAGraphStep captures after a few
    eager steps) gets those steps inside the warm-up.
    """
    own = [int(getattr(s, "warmup_steps", 0)) + 1 for s in trainer.strategies] if warmup else []
    return max([warmup, 1] + own)


def _measure(trainer: FastTrainer, probe: Probe, data: Any, steps: int, warmup: int) -> _Measured:
    """Run the five passes (see the package's docstring)."""
    compiled = _is_compiled(trainer)
    eager = not compiled and not probe.replaced_step
    notes: list[str] = []
    if not eager:
        notes.append("the model runs compiled or as a captured step, so modules cannot be timed one by one; diagnose without Compile/CUDAGraphStep to see them")
    run = functools.partial(_run_pass, trainer, probe, data)
    run("warmup", _warmup_steps(trainer, warmup))
    _warm_every_shape(trainer, probe, data, notes)
    run("clean", steps + 1)  # the first step end opens the timing window
    step_s = probe.clean_step_seconds(steps)
    with forward_hooks(trainer, probe, modules=eager):
        timed = run("timed", steps)
    detail_steps = min(steps, _MAX_DETAIL_STEPS)
    sync_steps = _sync_pass(trainer, probe, run, eager, detail_steps, notes)
    ops, device_s, kernels = _profile(run, probe.cuda, detail_steps)
    return _Measured(step_s, timed, sync_steps, ops, device_s, kernels, compiled, notes)


def _warm_every_shape(trainer: FastTrainer, probe: Probe, data: Any, notes: list[str]) -> int:
    """Warm a graph step up by whole epochs until an epoch runs on captured graphs only; return the epochs run.

    A graph step (a step role with ``graphing``, ``graphs`` and ``shapes()``, such as
    CUDAGraphStep) captures a step shape after ``warmup_steps`` eager runs of it, and
    shapes vary (TrimPadding buckets, the epoch's partial last step): the warm-up runs
    epochs, at most ``warmup_steps + 2``, and stops after an epoch that added no graph
    when every shape seen has one. Nothing is recorded meanwhile.
    """
    step: Any = trainer.roles.step
    if not (probe.replaced_step and getattr(step, "graphing", False) and callable(getattr(step, "shapes", None))):
        return 0
    limit = int(getattr(step, "warmup_steps", 0)) + 2
    epochs = 0
    probe.follow("warmup")
    try:
        while epochs < limit and step.graphing:
            before = step.graphs
            trainer.train_epoch(data)
            epochs += 1
            if step.graphs == before and step.graphs == len(step.shapes()):
                break
    finally:
        probe.follow("off")
    shapes = len(step.shapes())
    missing = shapes - step.graphs if step.graphing else 0
    notes.append(
        f"{type(step).__name__}: the warm-up ran {epochs} whole epoch{'s' if epochs != 1 else ''} so that every step "
        f"shape is captured before timing ({step.graphs} graph{'s' if step.graphs != 1 else ''} of {shapes} shapes)"
        + (f"; {missing} shapes were not captured yet: their capture falls in the measured passes" if missing else "")
    )
    return epochs


def _sync_pass(trainer: FastTrainer, probe: Probe, run: Callable[[str, int], Any], eager: bool, steps: int, notes: list[str]) -> int:
    """Count the host syncs of ``steps`` steps; return the steps counted (0: not measurable here)."""
    if not (eager or probe.cuda):
        notes.append("host syncs are counted on CPU only for an eager model; run without Compile to count them")
        return 0
    with forward_hooks(trainer, probe, modules=eager), SyncCounter(probe).active(dispatch=eager):
        run("sync", steps)
    return steps


def _profile(run: Callable[[str, int], Any], cuda: bool, n: int) -> tuple[list[OpTime], float | None, float]:
    """Profiler pass: top operators by self time; device busy time and kernels per step on CUDA."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        run("profile", n)
    ops: list[OpTime] = []
    device_us = 0.0
    kernels = 0.0
    for e in prof.key_averages():
        if getattr(e, "is_user_annotation", False) or e.key.startswith("ProfilerStep"):
            continue
        if e.device_type == DeviceType.CPU:
            dev_self = float(getattr(e, "self_device_time_total", 0.0)) / 1e6 / n if cuda else None
            ops.append(OpTime(e.key, float(e.self_cpu_time_total) / 1e6 / n, dev_self, e.count / n))
        elif cuda:
            device_us += float(e.self_device_time_total)
            kernels += e.count
    ops.sort(key=lambda o: (o.device_s or 0.0) + o.host_s, reverse=True)
    return ops[:15], (device_us / 1e6 / n if cuda else None), kernels / n


def _graph_break_counter() -> dict[str, int]:
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return {}
    return dict(getattr(utils, "counters", {}).get("graph_break", {}))


def _is_compiled(trainer: FastTrainer) -> bool:
    """Whether the module the loop calls contains a ``torch.compile`` wrapper."""
    return any(hasattr(m, "_orig_mod") for m in trainer.train_model.modules())


def _graph_breaks(trainer: FastTrainer, before: dict[str, int], compiled: bool) -> tuple[int | None, list[tuple[str, int]]]:
    after = _graph_break_counter()
    reasons = [(str(k), int(v - before.get(k, 0))) for k, v in after.items() if v - before.get(k, 0) > 0]
    reasons.sort(key=lambda r: r[1], reverse=True)
    info = next((r.graph_breaks for r in trainer.reports().values() if hasattr(r, "graph_breaks")), None)
    compiled = compiled or info is not None
    if isinstance(info, (int, float)) and not isinstance(info, bool):
        count: int | None = int(info)
    elif isinstance(info, dict):
        reasons = reasons or sorted(((str(k), int(v)) for k, v in info.items()), key=lambda r: r[1], reverse=True)
        count = sum(int(v) for v in info.values())
    elif isinstance(info, (list, tuple)):  # Compile: [{"reason", "where", "count"}]
        listed = [
            (f"{r.get('reason')} at {r.get('where')}" if r.get("where") else str(r.get("reason")), int(r.get("count", 1)))
            if isinstance(r, dict)
            else (str(r), 1)
            for r in info
        ]
        reasons = sorted(listed, key=lambda r: r[1], reverse=True) or reasons
        count = sum(c for _, c in listed)
    else:
        count = sum(c for _, c in reasons) if (compiled or reasons) else None
    return count, reasons


# ---------------------------------------------------------------------------- assembling
def _in_use(trainer: FastTrainer, probe: Probe) -> set[str]:
    """The strategies at work, by class name and every base class's (a subclass counts as its base); those left out are not."""
    names = {c.__name__ for s in trainer.strategies if s is not probe for c in type(s).__mro__ if issubclass(c, Strategy)}
    return (names - {"Strategy"}) - set(trainer.history.left_out)


def _price(trainer: FastTrainer, probe: Probe) -> PaddingPrice | None:
    """Prove and price the cut of the padding on the first batch seen, when there is padding to cut and nothing cuts it."""
    if probe.sample is None or {"TrimPadding", "Unpad"} <= _in_use(trainer, probe):
        return None
    try:
        return price_padding(trainer, probe.sample)
    except (TypeError, ValueError) as e:  # a batch format of the user's forward_logits: no price, the rest stands
        log.info("doctor: the padding could not be priced: %s", e)
        return None


def _assemble(trainer: FastTrainer, probe: Probe, m: _Measured, steps: int, dynamo_before: dict[str, int], price: PaddingPrice | None = None) -> Diagnosis:
    """The :class:`Diagnosis` of what the passes measured, with its recommendations."""
    n = max(steps, 1)
    timed_total = m.timed.get("total", 0.0) / n
    top = _module_times(probe, n, timed_total)
    sources, syncs_per_step, locations = _sync_summary(probe, m.sync_steps)
    breaks, reasons = _graph_breaks(trainer, dynamo_before, m.compiled)
    diag = Diagnosis(
        model=type(trainer.model).__name__,
        device=str(trainer.device),
        steps=steps,
        batch_size=trainer.batch_size,
        accumulation=trainer.accumulation,
        strategies=[repr(s) for s in trainer.strategies if s is not probe],
        step_s=m.step_s,
        timed_step_s=timed_total,
        phases=_phases(m.timed, n, timed_total),
        device_s=m.device_s,
        top_modules=top,
        top_classes=_class_times(top),
        syncs_per_step=syncs_per_step,
        sync_sources=sources,
        sync_locations=locations,
        top_ops=m.ops,
        padding=_padding(probe),
        graph_breaks=breaks,
        graph_break_reasons=reasons,
        recommendations=[],
        notes=m.notes + _caveats(trainer, probe),
        run_info=_run_info(trainer),
        padding_price={} if price is None else {**dataclasses.asdict(price), "trim_ratio": price.trim_ratio, "unpad_ratio": price.unpad_ratio},
    )
    diag.recommendations = recommend(diag, m.kernels, unpad_mode(trainer.model) is not None, _in_use(trainer, probe), price)
    return diag


def _phases(timed: dict[str, float], n: int, timed_total: float) -> dict[str, float]:
    """Seconds per step of each phase; 'other' is what a replaced step did plus what no phase holds."""
    phases = {k: timed.get(k, 0.0) / n for k in ("data", "forward", "backward", "optimizer", "loss read-back")}
    phases["other"] = timed.get("step (replaced)", 0.0) / n
    phases["other"] += max(timed_total - sum(phases.values()), 0.0)
    return phases


def _module_times(probe: Probe, n: int, timed_total: float) -> list[ModuleTime]:
    """Every timed module's self time per step, largest first."""
    top = []
    for mid, self_t in probe.mod_self.items():
        qual, cls = probe.names.get(mid, ("?", "?"))
        child_calls = [(c, k) for (p_, k), c in probe.child_calls.items() if p_ == mid]
        most, most_id = max(child_calls, key=lambda x: x[0]) if child_calls else (0, None)
        top.append(
            ModuleTime(
                name=qual,
                cls=cls,
                self_s=self_t / n,
                total_s=probe.mod_total[mid] / n,
                calls=probe.mod_calls[mid] / n,
                share=(self_t / n) / timed_total if timed_total > 0 else 0.0,
                max_child_calls=most / n,
                child=probe.labels.get(most_id, "") if most_id is not None else "",
            )
        )
    top.sort(key=lambda m: m.self_s, reverse=True)
    return top


def _class_times(top: list[ModuleTime]) -> list[ClassTime]:
    """The module times summed per class, largest self time first."""
    classes: dict[str, ClassTime] = {}
    for m in top:
        c = classes.setdefault(m.cls, ClassTime(m.cls, 0, 0.0, 0.0, 0.0))
        c.modules += 1
        c.self_s += m.self_s
        c.total_s += m.total_s
        c.share += m.share
    return sorted(classes.values(), key=lambda c: c.self_s, reverse=True)


def _sync_summary(probe: Probe, sync_steps: int) -> tuple[list[SyncSource], float | None, dict[str, str]]:
    """Sync sources per step (largest first), syncs per step (None: not measured), and their lines of code."""
    if not sync_steps:
        return [], None, {}
    sources = [SyncSource(m, op, c / sync_steps) for (m, op), c in probe.syncs.items()]
    sources.sort(key=lambda s: s.per_step, reverse=True)
    locations = {f"{m} | {op}": ", ".join(w for w, _ in probe.sync_where[(m, op)].most_common(3)) for (m, op) in probe.syncs}
    return sources, sum(s.per_step for s in sources), locations


def _padding(probe: Probe) -> dict[str, float]:
    pad = probe.pad
    if not pad["positions"]:
        return {}
    return {"pad_fraction": pad["pad"] / pad["positions"], "trimmable_fraction": pad["trimmable"] / pad["positions"]}


def _run_info(trainer: FastTrainer) -> dict[str, Any]:
    """The strategies' reports (:meth:`FastTrainer.reports`) as JSON-ready data, by strategy."""
    return reports_dict(trainer.reports())


def _caveats(trainer: FastTrainer, probe: Probe) -> list[str]:
    """The notes every diagnosis of this kind carries."""
    notes = []
    fallback = next((r.fallback for r in trainer.reports().values() if getattr(r, "fallback", None)), None)
    if fallback:
        notes.append(f"CUDAGraphStep ran the eager step instead of graphs ({fallback}): these are the eager step's times")
    if probe.replaced_step:
        notes.append(
            f"{type(trainer.roles.step).__name__} runs the whole step; what it does besides the model's forward and the loss read-backs is under 'other'"
        )
    notes.append("forward is the model's own forward; computing the loss from its output counts under backward")
    if trainer.device.type == "cpu":
        notes.append(
            "on CPU there is no device to wait for: 'syncs' are the operations that would make the host "
            "wait for a GPU; data loading and optimizer-step counters are not counted"
        )
        notes.append("device time: n/a on CPU (everything runs on the host)")
    else:
        notes.append(
            "the timed pass synchronises the device at each step's start and end only: the step runs whole (replayed)"
            if probe.replaced_step
            else "the timed pass synchronises the device at every boundary: its shares are of a serialised step"
        )
    return notes
