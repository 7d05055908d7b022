"""The search of :func:`tune`: the proofs against the plain loop, the timed rounds, the greedy combination."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .._validation import infer_vocab_size
from ..bench import RowResult, RowSpec, _Budget, _Row, _run_interleaved, compare_rows, machine_info
from ..checkpoint import rng_state, set_rng_state
from ..presets import CUDA_BUCKETS, Preset
from ..strategies import AllowTF32, CUDAGraphStep, DeferredLossSync, DevicePreload, FastDropout, FusedAdamW, MixedPrecision, Strategy, TrimPadding, Unpad
from ..strategies.needs import Computes, Context, check_strategies, declarations
from ..strategies.precision import cpu_has_native_bf16
from ..trainer import FastTrainer
from .report import PLAIN, VERDICTS, TuneReport, TuneRow, as_code

__all__ = ["tune", "TuneError", "Candidate", "default_candidates"]

log = logging.getLogger("hlbd_fast")


class TuneError(ValueError):
    """A bad argument to :func:`tune` or ``hlbd-fast tune``; the message names it and the fix."""


@dataclass(frozen=True)
class Candidate:
    """A strategy :func:`tune` may choose: its name in the table and how to build a fresh instance."""

    name: str  # e.g. "trim padding"
    build: Callable[[], Strategy]  # a fresh instance per trainer (a strategy serves one trainer)


def default_candidates(device: str | torch.device) -> tuple[Candidate, ...]:
    """The strategies worth measuring on ``device``: none that only another device can run.

    CPU: device preload, deferred loss sync, fused AdamW, padding trimmed, real tokens only
    (Unpad), fast dropout masks, and bf16 autocast where the CPU computes bf16 natively.
    CUDA: device preload, deferred sync, fused AdamW, padding trimmed to length buckets,
    TF32, bf16 autocast and the whole step as CUDA graphs.
    """
    dev = torch.device(device)
    common = (
        Candidate("device preload", DevicePreload),
        Candidate("deferred sync", DeferredLossSync),
        Candidate("fused adamw", FusedAdamW),
    )
    if dev.type == "cuda":
        return common + (
            Candidate("trim padding", lambda: TrimPadding(buckets=CUDA_BUCKETS, on_refusal="leave out")),
            Candidate("tf32", AllowTF32),
            Candidate("bf16", lambda: MixedPrecision("bf16")),
            Candidate("cuda graphs", CUDAGraphStep),
        )
    cpu = common + (
        Candidate("trim padding", lambda: TrimPadding(multiple_of=1, on_refusal="leave out")),
        Candidate("unpad", lambda: Unpad(on_refusal="leave out")),
        Candidate("fast dropout", FastDropout),
    )
    return cpu + ((Candidate("bf16", lambda: MixedPrecision("bf16")),) if cpu_has_native_bf16() else ())


# ---------------------------------------------------------------------------- tune
@dataclass(frozen=True)
class _Setup:
    """What every row shares: the initial weights, the data, the trainer and its arguments."""

    initial: nn.Module  # the initial weights (on the host, never trained)
    data: tuple[torch.Tensor, torch.Tensor]  # all the pairs (a proof trains on its first steps' worth)
    round_data: tuple[torch.Tensor, torch.Tensor]  # steps_per_round micro-batches' pairs
    device: torch.device
    trainer_class: type[FastTrainer]
    kwargs: dict[str, Any]  # FastTrainer arguments of every row
    has_dropout: bool  # the model draws dropout masks in training
    accept: tuple[str, ...]  # the verdicts a configuration may have to be chosen
    tols: tuple[float, float] = (1e-4, 2e-2)  # rounding_tol, precision_tol
    proof_steps: int = 2  # optimizer steps each proof compares
    steps_per_round: int = 2  # optimizer steps of every row per timing round


def tune(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    device: str | torch.device | None = None,
    batch_size: int = 32,
    lr: float = 5e-5,
    budget_s: float = 120.0,
    candidates: Sequence[Candidate] | None = None,
    proof_steps: int = 2,
    steps_per_round: int = 2,
    accept: Sequence[str] = ("exact", "rounding", "precision", "random stream"),
    rounding_tol: float = 1e-4,
    precision_tol: float = 2e-2,
    seed: int = 0,
    trainer_class: type[FastTrainer] = FastTrainer,
    progress: bool = True,
    **trainer_kwargs: Any,
) -> TuneReport:
    """Measure the strategies on ``model`` and ``data`` and return the fastest configuration within tolerance.

    Args:
        model: the model, as :class:`FastTrainer` takes it; never trained (every row
            trains a copy of its initial weights).
        data: ``(src, tgt)`` token tensors, as :meth:`FastTrainer.fit` takes them.
        device: where to train; default the model's device.
        batch_size: micro-batch size of every row (the plain loop's too).
        lr: learning rate of every row.
        budget_s: wall seconds for the whole run; it ends whole rounds only. Too small
            for two rounds of each stage: a :class:`TuneError` naming the minimum.
        candidates: the strategies to consider (default :func:`default_candidates`).
        accept: the verdicts a chosen configuration may have; e.g. ``("exact", "rounding")``
            for fp32 arithmetic and dropout's own stream only.
        proof_steps: optimizer steps each proof compares with the plain loop.
        steps_per_round: optimizer steps of every row in one timing round.
        rounding_tol: the largest relative loss difference a ``rounding`` verdict allows.
        precision_tol: the same for a strategy declared lower precision (bf16, fp16, TF32).
        seed: the sample order of every row (the trainer's seed).
        trainer_class: the trainer every row uses: a :class:`FastTrainer` subclass with its
            own ``forward_logits`` is measured as it trains.
        progress: a progress bar over the budget.
        **trainer_kwargs: more :class:`FastTrainer` arguments for every row (``pad_id``,
            ``max_grad_norm``, ``loss_normalization``...).

    Raises:
        TuneError: a bad argument, data the model cannot take, a budget too small, or a
            plain loop that cannot train one step (with its error).
    """
    started = time.perf_counter()
    dev = _check_arguments(model, data, device, batch_size, budget_s, proof_steps, steps_per_round, trainer_class, trainer_kwargs)
    setup = _setup(model, data, dev, batch_size, lr, proof_steps, steps_per_round, seed, trainer_class, trainer_kwargs)
    setup = dataclasses.replace(setup, accept=_check_accept(accept), tols=(rounding_tol, precision_tol))
    pool = tuple(candidates) if candidates is not None else default_candidates(dev)
    rng = rng_state()  # every row seeds torch's RNG: the caller's stream is put back afterwards
    try:
        with _progress(budget_s, progress, started) as tick:
            rows, chain = _search(setup, pool, budget_s, started, tick)
    finally:
        set_rng_state(rng)
    chosen, builders = _choose(rows, pool, chain)
    return TuneReport(
        model=type(model).__name__,
        device=str(dev),
        batch_size=batch_size,
        lr=lr,
        rows=rows,
        chosen=chosen,
        budget_s=float(budget_s),
        spent_s=time.perf_counter() - started,
        tolerances={"rounding_tol": rounding_tol, "precision_tol": precision_tol},
        proof_steps=proof_steps,
        steps_per_round=steps_per_round,
        machine=machine_info(dev),
        _builders=builders,
    )


def _search(
    setup: _Setup, pool: Sequence[Candidate], budget_s: float, started: float, tick: Callable[..., None]
) -> tuple[list[TuneRow], list[tuple[str, tuple[Candidate, ...]]]]:
    """The four stages: the plain loop, each candidate alone (proven, then timed), the combinations (proven, then timed)."""
    plain = _prove(setup, (), setup.proof_steps)
    plains = {setup.proof_steps: plain}
    if plain.error is not None:
        raise TuneError(f"the plain loop cannot train one step of this model on this data: {plain.error}")
    tick()
    _check_budget(budget_s, time.perf_counter() - started, plain.step_s, len(pool), setup.proof_steps, setup.steps_per_round)
    rows = [TuneRow(PLAIN, "alone", [], "exact", "the reference: every other row is compared with it", 0.0, 0.0, steps=setup.proof_steps)]
    alone = _alone(setup, pool, plains, rows, tick)
    remaining = budget_s - (time.perf_counter() - started)
    _time_rows(setup, [(PLAIN, ()), *alone], rows, "alone", remaining * 0.45, tick)
    chain = _combine(setup, pool, [c for name, members in alone for c in members if c.name == name], rows, plains, tick)
    remaining = budget_s - (time.perf_counter() - started)
    if chain:
        _time_rows(setup, [(PLAIN, ()), *chain], rows, "combined", remaining, tick)
    return rows, chain


@contextlib.contextmanager
def _progress(budget_s: float, progress: bool, started: float) -> Iterator[Callable[..., None]]:
    """A progress bar over the budget (its ticker yielded), and the library's set-up lines quiet meanwhile."""
    bar = tqdm(total=round(budget_s), desc="tune", unit="s", disable=not progress, leave=False)
    level = log.level
    log.setLevel(max(level, logging.WARNING))  # every row builds trainers: their set-up lines would bury the table
    try:
        yield _Ticker(bar, started)
    finally:
        log.setLevel(level)
        bar.close()


class _Ticker:
    """Moves the progress bar to the seconds spent so far."""

    def __init__(self, bar: Any, started: float) -> None:
        self.bar, self.started = bar, started

    def __call__(self, *_: Any) -> None:
        spent = round(time.perf_counter() - self.started)
        self.bar.update(max(0, min(spent, self.bar.total) - self.bar.n))


# ---------------------------------------------------------------------------- checks
def _check_arguments(
    model: Any, data: Any, device: Any, batch_size: Any, budget_s: Any, proof_steps: Any, steps_per_round: Any, trainer_class: Any, kwargs: dict[str, Any]
) -> torch.device:
    """Refuse what can be refused before anything trains; the device."""
    if not isinstance(model, nn.Module):
        raise TuneError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, FastTrainer)):
        raise TuneError(f"trainer_class must be FastTrainer or a subclass of it, got {trainer_class!r}")
    for name, value in (("batch_size", batch_size), ("proof_steps", proof_steps), ("steps_per_round", steps_per_round)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TuneError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not math.isfinite(budget_s) or budget_s <= 0:
        raise TuneError(f"budget_s must be a positive number of seconds, got {budget_s!r}")
    refused = sorted(set(kwargs) & {"strategies", "batch_size", "lr", "device", "seed", "progress", "optimizer", "scheduler"})
    if refused:
        raise TuneError(
            f"tune sets {', '.join(refused)} itself for every row; pass batch_size=, lr=, device=, seed= to tune, and no strategies, optimizer or scheduler"
        )
    _check_data(model, data)
    try:
        from ..cli import resolve_device

        return resolve_device(device) if device is not None else _model_device(model)
    except ValueError as e:
        raise TuneError(f"device: {e}") from None


def _check_data(model: nn.Module, data: Any) -> None:
    """``(src, tgt)`` integer tensors of as many rows, ids inside the model's vocabulary."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)):
        raise TuneError(f"data must be a (src, tgt) pair of token tensors, got {type(data).__name__}; stack a Dataset's pairs into two tensors")
    src, tgt = data
    if src.dim() != 2 or tgt.dim() != 2 or src.shape[0] != tgt.shape[0] or src.is_floating_point() or tgt.is_floating_point():
        raise TuneError(
            f"data: src and tgt must be 2-D integer tensors with as many rows, got {tuple(src.shape)} {src.dtype} and {tuple(tgt.shape)} {tgt.dtype}"
        )
    if src.shape[0] == 0:
        raise TuneError("data is empty: tune needs pairs to train on")
    vocab = infer_vocab_size(model)
    top = int(max(int(src.max()), int(tgt.max())))
    if vocab is not None and top >= vocab:
        raise TuneError(f"data holds token id {top}, but the model's vocabulary has {vocab} ids (0..{vocab - 1}); encode the data for this model")
    if int(min(int(src.min()), int(tgt.min()))) < 0:
        raise TuneError("data holds negative token ids; encode the data with ids >= 0")


def _check_budget(budget_s: float, spent: float, step_s: float, n: int, proof_steps: int, steps_per_round: int) -> None:
    """Refuse a budget that cannot hold the proofs and two rounds of each stage (estimated from the plain loop's steps).

    The candidates' own times are not known yet: the estimate counts each of their steps
    as long as the plain loop's, and a round as the plain loop's part of it alone, so it
    is a lower bound.
    """
    round_s = step_s * steps_per_round
    minimum = spent + n * step_s * proof_steps + 4 * round_s
    if budget_s < minimum:
        raise TuneError(
            f"budget_s={budget_s:g} is too small for this model here: a step of the plain loop takes about {step_s:.2f} s, and tune "
            f"needs {n} proofs of {proof_steps} steps and two rounds of {steps_per_round} steps in each stage; give budget_s >= {math.ceil(minimum)}"
        )


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _setup(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    dev: torch.device,
    batch_size: int,
    lr: float,
    proof_steps: int,
    steps_per_round: int,
    seed: int,
    trainer_class: type[FastTrainer],
    trainer_kwargs: dict[str, Any],
) -> _Setup:
    src, tgt = data
    initial = copy.deepcopy(model).cpu()
    has_dropout = any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())
    kwargs = {"batch_size": batch_size, "lr": lr, "seed": seed, "progress": False, "device": dev, **trainer_kwargs}
    round_n = min(len(src), steps_per_round * batch_size)
    return _Setup(
        initial,
        (src, tgt),
        (src[:round_n], tgt[:round_n]),
        dev,
        trainer_class,
        kwargs,
        has_dropout,
        VERDICTS[:-1],
        (1e-4, 2e-2),
        proof_steps,
        steps_per_round,
    )


def _check_accept(accept: Any) -> tuple[str, ...]:
    """The accepted verdicts, each one of :data:`VERDICTS` but ``refused``."""
    allowed = VERDICTS[:-1]
    if isinstance(accept, str) or not all(isinstance(v, str) and v in allowed for v in accept) or not accept:
        raise TuneError(f"accept={accept!r} must be a non-empty sequence of verdicts from {allowed}")
    return tuple(accept)


# ---------------------------------------------------------------------------- proofs
class _StepLosses(Strategy):
    """The proof's recorder: the model's dropout off, the running loss read after every step (untimed)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.ends: list[float] = []  # when each step ended (perf_counter)

    def on_epoch_start(self, trainer: FastTrainer, epoch: int) -> None:
        trainer.train_model.eval()  # after the trainer's train(): dropout off, the computation compared alone

    def on_step_end(self, trainer: FastTrainer) -> None:
        self.losses.append(trainer.read_figures().loss)  # one sync per step: proofs are not timed
        self.ends.append(time.perf_counter())


@dataclass
class _Proof:
    """What one proof run measured."""

    losses: list[float] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0  # wall seconds of the whole run, the trainer's construction included
    step_s: float = 0.0  # seconds of a step after the first (the first pays one-off costs); the only step's when one
    error: str | None = None
    left_out: dict[str, str] = field(default_factory=dict)


def _proof_steps(setup: _Setup, strategies: tuple[Strategy, ...]) -> int:
    """The proof's steps, past the warm-up any strategy declares (CUDAGraphStep: its eager runs and capture)."""
    context = Context(setup.initial, setup.device)
    return setup.proof_steps + max((d.warmup_steps for _, d in declarations(strategies, context).values()), default=0)


def _judged(setup: _Setup, name: str, stage: str, strategies: tuple[Strategy, ...], plains: dict[int, _Proof]) -> TuneRow:
    """The row of ``strategies``: proven against the plain loop over as many steps (the plain loop trained once per step count)."""
    steps = _proof_steps(setup, strategies)
    if steps not in plains:
        plains[steps] = _prove(setup, (), steps)
    verdict, reason, loss, weight = _verdict(setup, strategies, plains[steps], _prove(setup, strategies, steps))
    ran = len(plains[steps].losses)
    if ran < steps and steps > setup.proof_steps:
        reason += f"; the data holds {ran} steps, fewer than the {steps} that reach past its declared warm-up: the change itself was not compared"
    return TuneRow(name, stage, [as_code(s) for s in strategies], verdict, reason, loss, weight, steps=ran)


def _prove(setup: _Setup, strategies: tuple[Strategy, ...], steps: int) -> _Proof:
    """Train ``strategies`` for ``steps`` optimizer steps (one epoch of the first pairs) from the initial weights."""
    recorder = _StepLosses()
    n = steps * setup.kwargs["batch_size"]
    src, tgt = setup.data[0][:n], setup.data[1][:n]
    t0 = time.perf_counter()
    model = copy.deepcopy(setup.initial)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a strategy left out says so in history.left_out
            with setup.trainer_class(model, **{**setup.kwargs, "strategies": (*strategies, recorder)}) as trainer:
                trainer.fit((src, tgt), 1)
                left_out = dict(trainer.history.left_out)
    except Exception as e:  # noqa: BLE001 - the row is refused with the error; the others go on
        return _Proof(seconds=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}".splitlines()[0])
    weights = [p.detach().to("cpu", copy=True) for p in model.parameters()]
    ends = recorder.ends
    step_s = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else time.perf_counter() - t0
    return _Proof(recorder.losses, weights, time.perf_counter() - t0, step_s, None, left_out)


def _differences(plain: _Proof, proof: _Proof) -> tuple[float, float]:
    """(largest relative difference of the running loss over the steps, relative L2 distance of all the weights)."""
    if len(proof.losses) != len(plain.losses) or len(proof.weights) != len(plain.weights):
        return math.inf, math.inf
    loss = max((abs(a - b) / max(abs(b), 1e-12) for a, b in zip(proof.losses, plain.losses)), default=0.0)
    apart = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(proof.weights, plain.weights))
    size = sum(float(b.double().pow(2).sum()) for b in plain.weights)
    return loss, math.sqrt(apart / size) if size > 0 else math.sqrt(apart)


def _verdict(setup: _Setup, strategies: tuple[Strategy, ...], plain: _Proof, proof: _Proof) -> tuple[str, str, float | None, float | None]:
    """(verdict, reason, loss difference, weight difference) of a proof run against the plain loop's."""
    tols = setup.tols
    if proof.error is not None:
        return "refused", f"it failed: {proof.error}", None, None
    if proof.left_out:
        name, why = next(iter(proof.left_out.items()))
        return "refused", f"{name} refused this model: {why.split('; the run trains', 1)[0]}", None, None
    loss, weight = _differences(plain, proof)
    declared = _declared(setup, strategies)
    worst = max(loss, weight)
    if worst == 0.0:
        measured, why = "exact", "the same losses and weights, bit for bit"
    elif Computes.PRECISION in declared and worst <= tols[1]:  # lower precision is its verdict, however close it came
        measured, why = "precision", f"losses and weights within {tols[1]:g} relative (lower precision)"
    elif worst <= tols[0]:
        measured, why = "rounding", f"losses and weights within {tols[0]:g} relative (float rounding)"
    else:
        limit = tols[1] if Computes.PRECISION in declared else tols[0]
        what = "running loss" if loss >= weight else "weights"
        return "refused", f"the {what} differ by {worst:.2e} relative over {len(plain.losses)} steps, more than {limit:g}", loss, weight
    if Computes.RANDOM_STREAM in declared and setup.has_dropout:
        measured, why = "random stream", f"dropout masks from another stream (with dropout off: {why})"
    if measured not in setup.accept:
        return "refused", f"{measured} ({why}), and accept={setup.accept} leaves it out", loss, weight
    return measured, why, loss, weight


def _declared(setup: _Setup, strategies: tuple[Strategy, ...]) -> set[Computes]:
    context = Context(setup.initial, setup.device)
    return {d.computes for _, d in declarations(strategies, context).values()}


# ---------------------------------------------------------------------------- stages
def _with_requirements(setup: _Setup, chosen: Sequence[Candidate], pool: Sequence[Candidate]) -> list[Candidate]:
    """``chosen`` plus, first, a candidate of ``pool`` for each requirement that no chosen one provides."""
    context = Context(setup.initial, setup.device)
    built = {c.name: c.build() for c in pool}
    table = {name: s.declare(context) for name, s in built.items()}
    out = list(chosen)
    for c in chosen:
        for need in table[c.name].requires:
            if any(need.what in table[o.name].provided() for o in out):
                continue
            provider = next((o for o in pool if need.what in table[o.name].provided()), None)
            if provider is not None:
                out.insert(0, provider)
    return out


def _unsupported(setup: _Setup, c: Candidate) -> str | None:
    """Why ``c`` cannot run this model on this device, or has nothing to change in it (its declaration), or None."""
    declared = c.build().declare(Context(setup.initial, setup.device))
    if declared.unsupported is None and declared.computes is Computes.RANDOM_STREAM and not setup.has_dropout:
        return "it draws dropout masks from another stream, and the model has no nn.Dropout with p > 0: it would change nothing"
    return declared.unsupported


def _alone(
    setup: _Setup, pool: Sequence[Candidate], plains: dict[int, _Proof], rows: list[TuneRow], tick: Callable[[], None]
) -> list[tuple[str, tuple[Candidate, ...]]]:
    """Prove each candidate alone (with what it requires); the accepted ones (name, members), in the pool's order."""
    accepted: list[tuple[str, tuple[Candidate, ...]]] = []
    for c in pool:
        why_not = _unsupported(setup, c)
        if why_not is not None:
            rows.append(TuneRow(c.name, "alone", [as_code(c.build())], "not tried", why_not))
            continue
        members = _with_requirements(setup, [c], pool)
        strategies = tuple(m.build() for m in members)
        rows.append(_judged(setup, c.name, "alone", strategies, plains))
        if rows[-1].verdict != "refused":
            accepted.append((c.name, tuple(members)))
        tick()
    return accepted


def _combine(
    setup: _Setup,
    pool: Sequence[Candidate],
    alone: Sequence[Candidate],
    rows: list[TuneRow],
    plains: dict[int, _Proof],
    tick: Callable[[], None],
) -> list[tuple[str, tuple[Candidate, ...]]]:
    """Add the accepted candidates fastest-alone first; every combination that its declarations and proof allow."""
    speed = {r.name: r.speedup or 0.0 for r in rows if r.stage == "alone"}
    order = sorted(alone, key=lambda c: speed.get(c.name, 0.0), reverse=True)
    chain: list[Candidate] = []
    combos: list[tuple[str, tuple[Candidate, ...]]] = []
    context = Context(setup.initial, setup.device)
    for c in order:
        if any(c.name == m.name for m in chain):
            continue  # already brought along as another candidate's requirement
        if speed.get(c.name, 0.0) < 0.97 and chain:
            continue  # slower than the plain loop alone: it would not make a combination faster
        members = _with_requirements(setup, [*chain, c], pool)
        strategies = tuple(m.build() for m in members)
        name = " + ".join(m.name for m in members)
        problems = check_strategies(strategies, context)
        if problems:
            rows.append(TuneRow(name, "combined", [as_code(s) for s in strategies], "not tried", problems[0]))
            continue
        rows.append(_judged(setup, name, "combined", strategies, plains))
        tick()
        if rows[-1].verdict != "refused":
            chain = members
            combos.append((name, tuple(members)))
    return combos


def _time_rows(
    setup: _Setup, named: Sequence[tuple[str, tuple[Candidate, ...]]], rows: list[TuneRow], stage: str, budget_s: float, tick: Callable[[], None]
) -> None:
    """Time ``named`` configurations in paired interleaved rounds; their speed-ups over the plain loop into ``rows``."""

    def build(members: tuple[Candidate, ...], name: str) -> RowSpec:
        return RowSpec(Preset(name, tuple(m.build() for m in members), setup.kwargs["batch_size"], lr=setup.kwargs["lr"]))

    kwargs = {k: v for k, v in setup.kwargs.items() if k not in ("batch_size", "lr", "seed", "progress", "device")}
    timed = [_Row(n, lambda m=m, n=n: build(m, n), 10**9, setup.trainer_class, kwargs, verbose=False) for n, m in named]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run_interleaved(timed, setup.round_data, setup.device, _Budget(budget_s), setup.initial, setup.kwargs["seed"], evaluate=False, on_round=tick)
    results = [row.result for row in timed if row.result is not None]
    compare_rows(results, paired=True, base=PLAIN)
    _fill(rows, stage, results)


def _fill(rows: list[TuneRow], stage: str, results: Sequence[RowResult]) -> None:
    """Copy each timed result's speed-up into its row (the plain loop's alone-stage row takes the first)."""
    for r in results:
        row = next((x for x in rows if x.name == r.name and (x.stage == stage or r.name == PLAIN)), None)
        if row is None or (r.name == PLAIN and row.speedup is not None):
            continue
        if r.error is not None:
            row.verdict, row.reason = "refused", f"it failed while timed: {r.error}"
            continue
        row.speedup, row.rounds = r.speedup, r.speedup_rounds
        row.s_per_round = r.s_per_epoch


def _choose(
    rows: list[TuneRow], pool: Sequence[Candidate], chain: Sequence[tuple[str, tuple[Candidate, ...]]]
) -> tuple[str, tuple[Callable[[], Strategy], ...]]:
    """The fastest accepted combination (or single) faster than the plain loop; its builders."""
    members: dict[str, tuple[Candidate, ...]] = {c.name: (c,) for c in pool}
    members.update(dict(chain))
    timed = [r for r in rows if r.accepted and r.name != PLAIN and r.speedup is not None and r.name in members]
    stage = "combined" if any(r.stage == "combined" for r in timed) else "alone"  # combinations are timed against each other
    best = max((r for r in timed if r.stage == stage), key=lambda r: r.speedup or 0.0, default=None)
    if best is None or (best.speedup or 0.0) <= 1.0:
        return PLAIN, ()
    return best.name, tuple(c.build for c in members[best.name])


# ---------------------------------------------------------------------------- the report
