"""What strategies provide, require and forbid: one table, one check.

Strategies never look for each other by class. Each one *declares*, in words of the
loop, what it brings to a run (``provides``), what it cannot work without
(``requires``) and what it cannot work with (``forbids``), each with a one-line reason
(:class:`Need`). :func:`check_strategies` reads every declaration when the trainer is
built and raises one :class:`~hlbd_fast.strategies.base.StrategyConflictError` that lists
every violation with its fix. Presets, the bench, the doctor and ``tune`` read the same
declarations.

A strategy that overrides a hook run *inside* the step (``before_clip``,
``after_optimizer_step``) declares whether that work is device-only
(``step_hook_work = "device"``, as :class:`~hlbd_fast.strategies.EMA`) or host work (the
default): a captured step runs its Python once, at capture, so host work there is
refused under :class:`~hlbd_fast.strategies.CUDAGraphStep`.
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .base import Strategy

__all__ = ["Capability", "Need", "Declaration", "Context", "Computes", "check_strategies", "declarations", "STEP_HOOKS", "ON_REFUSAL"]


class Capability(enum.Enum):
    """What a strategy can bring to a run, in words of the loop (the value reads in a sentence)."""

    DEVICE_BATCHES = "batches already on the device"
    VARYING_SHAPES = "tensor shapes that change from one micro-batch to the next"
    STEP_CAPTURE = "the whole step captured once and replayed"
    COMPILED_FORWARD = "a forward run as generated code"
    KERNEL_OVERRIDE = "an eager torch kernel replaced for the run"
    LAYER_FORWARD = "the forward of the model's layers replaced"
    RNG_STATE_IN_FORWARD = "the random generator's state read during the forward"
    HOST_STEP_DECISION = "the host deciding at every step whether the optimizer steps"
    MICRO_BATCH_READS = "the loss read back to the host after every micro-batch"
    HOST_STEP_HOOKS = "Python work in before_clip / after_optimizer_step at every step"
    COLLECTIVES_IN_STEP = "collectives between processes inside the step"
    OWN_CUDA_GRAPHS = "CUDA graphs of its own"


#: How to obtain a capability that a strategy requires and nobody provides.
REMEDIES: dict[Capability, str] = {
    Capability.DEVICE_BATCHES: "add DevicePreload() to the strategies",
}


class Computes(str, enum.Enum):
    """What a strategy changes in the numbers the plain fp32 loop computes."""

    EXACT = "exact"  # the same numbers (only speed or bookkeeping changes)
    ROUNDING = "rounding"  # the same computation in another order or on less data: float rounding
    PRECISION = "precision"  # lower-precision arithmetic (bf16/fp16/TF32): within a stated tolerance
    RANDOM_STREAM = "random stream"  # the same distribution of random numbers, another stream (dropout)


@dataclass(frozen=True)
class Need:
    """One declared capability and why it is declared (one line, in the user's words)."""

    what: Capability  # the capability
    why: str  # the reason, e.g. "every micro-batch packs to another number of rows"


@dataclass(frozen=True)
class Context:
    """What a declaration may depend on: the model and the device it trains on."""

    model: nn.Module  # the model given to the trainer (unwrapped)
    device: torch.device  # the device it trains on


@dataclass(frozen=True)
class Declaration:
    """What one strategy provides, requires and forbids for a given model and device."""

    provides: tuple[Need, ...] = ()  # what it brings to the run
    requires: tuple[Need, ...] = ()  # what some other strategy must provide
    forbids: tuple[Need, ...] = ()  # what no other strategy may provide
    computes: Computes = Computes.EXACT  # what it changes in the plain loop's numbers
    proof: bool = False  # it proves itself on the first batch (a preset may leave it out when the proof fails)
    unsupported: str | None = None  # why it cannot run this model or device (None: it can)
    warmup_steps: int = 0  # optimizer steps it runs before its change takes effect: a comparison must run past them

    def provided(self) -> set[Capability]:
        """The capabilities it provides."""
        return {n.what for n in self.provides}


#: What a strategy with a proof does when its proof fails on the first batch: raise (a strategy
#: the user listed) or leave itself out for the run with one warning (a strategy a preset brought).
ON_REFUSAL: tuple[str, ...] = ("raise", "leave out")


def refusal(name: str, measured: str) -> str:
    """The message of a failed proof: what was measured, the fix in the model first, ``check=False`` last."""
    return (
        f"{name} refused this model on its first batch: {measured}: the model lets padding reach real positions. "
        "The fix is in the model: mask padding keys in "
        f"attention (pass a key padding mask for the source, decode causally) so that padding never reaches real "
        f"positions; then {name} computes what the padded loop computes. {name}(check=False) skips the proof, and then "
        "trains another model than the plain loop does (its logits at real positions change by the difference measured)"
    )


def leave_out(trainer: Any, name: str, measured: str, price: str | None = None) -> None:
    """Record and say once that ``name`` is left out of this trainer's runs because its proof failed.

    ``price``: what the fix would buy, measured (e.g. the forward of the batch cut against padded).
    """
    buys = f" Fixed, it would buy: {price}." if price else ""
    reason = (
        f"its proof failed on the first batch ({measured}); the run trains exactly as without it.{buys} To get its speed, "
        "mask padding keys in the model's attention (hlbd-fast doctor prices a whole training step)"
    )
    trainer.history.left_out[name] = reason
    warnings.warn(f"{name} is left out of this run: {reason}", RuntimeWarning, stacklevel=6)


#: The hooks that run inside the step (captured once under CUDA graphs).
STEP_HOOKS: tuple[str, ...] = ("before_clip", "after_optimizer_step")


def _host_step_hooks(s: "Strategy") -> Need | None:
    """A strategy overriding a step hook without declaring its work device-only brings host work into the step."""
    from .base import Strategy

    if getattr(s, "step_hook_work", "host") == "device":
        return None
    hooks = [h for h in STEP_HOOKS if getattr(type(s), h) is not getattr(Strategy, h)]
    if not hooks:
        return None
    return Need(
        Capability.HOST_STEP_HOOKS,
        f"{type(s).__name__}.{' and .'.join(hooks)} runs Python at every step (declare step_hook_work = 'device' if it only queues device work)",
    )


def declarations(strategies: Iterable["Strategy"], context: Context) -> dict[int, tuple["Strategy", Declaration]]:
    """Every strategy's declaration for ``context``, host step hooks included, keyed by ``id``."""
    out: dict[int, tuple[Strategy, Declaration]] = {}
    for s in strategies:
        d = s.declare(context)
        hooks = _host_step_hooks(s)
        if hooks is not None:
            d = dataclasses.replace(d, provides=d.provides + (hooks,))
        out[id(s)] = (s, d)
    return out


def check_strategies(strategies: Iterable["Strategy"], context: Context) -> list[str]:
    """Every violation of the strategies' declarations, each a sentence with its fix (empty: they combine)."""
    table = list(declarations(strategies, context).values())
    problems: list[str] = []
    for s, d in table:
        if d.unsupported is not None:
            problems.append(f"{s!r} cannot run here: {d.unsupported}")
        for need in d.requires:
            if not any(need.what in o.provided() for other, o in table if other is not s):
                fix = REMEDIES.get(need.what, "add a strategy that provides it, or drop " + type(s).__name__)
                problems.append(f"{s!r} needs {need.what.value}: {need.why}; {fix}")
    seen: set[tuple[int, int, Capability]] = set()
    for s, d in table:
        for need in d.forbids:
            for other, o in table:
                if other is s or need.what not in o.provided():
                    continue
                pair = (min(id(s), id(other)), max(id(s), id(other)), need.what)
                if pair in seen:
                    continue
                seen.add(pair)
                brings = next(n.why for n in o.provides if n.what is need.what)
                problems.append(
                    f"{s!r} cannot run with {other!r}: {need.why}, and {type(other).__name__} brings {need.what.value} ({brings}). Keep one of them"
                )
    return problems
