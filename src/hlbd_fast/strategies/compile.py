"""Compile: ``torch.compile`` the model, with its cost and its failures reported.

As a plain function for a hand-written loop::

    cmodel = compile_model(model, mode="default")   # an nn.Module: call it like the model
    ...train with cmodel...
    cmodel.report()  # {"compile_seconds": ..., "graph_breaks": [...], "recompiles": [...], ...}
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..checkpoint import rng_state, set_rng_state
from .base import Strategy
from .needs import Capability, Computes, Context, Declaration, Need

if TYPE_CHECKING:  # pragma: no cover
    from ..history import EpochRecord
    from ..trainer import FastTrainer

__all__ = ["Compile", "CompileReport", "CompiledModel", "CompilationError", "compile_model", "COMPILE_MODES"]

#: ``mode`` values of :class:`Compile` (those of ``torch.compile``'s inductor backend).
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: More distinct input shapes than this draw the "each new shape recompiles" warning.
SHAPE_WARNING_THRESHOLD = 4


class CompilationError(RuntimeError):
    """``torch.compile`` failed and ``Compile(strict=True)`` asked for an error, not a fallback."""


# ---------------------------------------------------------------------------- dynamo's bookkeeping
def _dynamo_utils() -> Any:
    import torch._dynamo.utils as utils

    return utils


def _compile_events() -> int:
    """A number that grows whenever dynamo converts a frame or builds a graph (process-wide)."""
    counters = _dynamo_utils().counters
    return int(counters["frames"]["total"]) + int(counters["stats"]["unique_graphs"])


def _backward_compile_seconds() -> float:
    """Seconds dynamo spent compiling backward graphs so far (they compile at the first backward)."""
    try:
        return float(_dynamo_utils().calculate_time_spent().get("entire_backward_compile", 0.0))
    except Exception:  # noqa: BLE001 - private API; report forward time only without it
        return 0.0


def _graph_break_log() -> list[Any]:
    return getattr(_dynamo_utils(), "graph_break_reasons", [])


def _guard_failures() -> dict[Any, list[str]]:
    return getattr(_dynamo_utils(), "guard_failures", {})


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip() if text.strip() else text


def _describe(error: BaseException) -> str:
    """``"Type: first line"``; a backend's failure names the exception the backend raised."""
    inner = getattr(error, "inner_exception", None)
    if isinstance(inner, BaseException):
        return f"{type(error).__name__}: {type(inner).__name__}: {_first_line(str(inner))}"
    return f"{type(error).__name__}: {_first_line(str(error))}"


def _strip_compile_id(reason: str) -> str:
    """``"0/1: tensor 'x' size mismatch..."`` -> ``"tensor 'x' size mismatch..."`` (first line)."""
    line = _first_line(reason)
    head, sep, rest = line.partition(": ")
    if sep and head.replace("/", "").replace("[", "").replace("]", "").isdigit():
        return rest
    return line


def _input_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Shapes, dtypes and devices of the tensor arguments (what compiled code specialises on)."""
    items = list(args) + [kwargs[k] for k in sorted(kwargs)]
    return tuple((tuple(a.shape), str(a.dtype), a.device.type) if isinstance(a, torch.Tensor) else type(a).__name__ for a in items)


# ---------------------------------------------------------------------------- the wrapper
class CompiledModel(nn.Module):
    """``torch.compile(model)`` that measures compilation and falls back to eager on failure.

    Call it like the model. Weights stay in the original ``model`` (the compiled module
    shares them), so saving ``model.state_dict()`` is unchanged. :meth:`report` returns
    what was measured. Build it with :func:`compile_model`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mode: str = "default",
        fullgraph: bool = False,
        dynamic: bool | None = False,
        strict: bool = False,
        backend: str | Callable[..., Any] = "inductor",
    ) -> None:
        super().__init__()
        object.__setattr__(self, "_eager", model)  # not a submodule: compiled._orig_mod is the same module
        self.dynamic = dynamic
        self.strict = strict
        self.failure: str | None = None  # why compilation failed, when it fell back to eager
        try:
            self.compiled: nn.Module = torch.compile(
                model,
                mode=mode if backend == "inductor" else None,
                fullgraph=fullgraph,
                dynamic=dynamic,
                backend=backend,
            )
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile unsupported on this Python
            self.compiled = model
            self._give_up(e)
        if backend == "eager" and any("_hlbd_checkpoint_inner" in vars(m) for m in model.modules()):
            # measured: the gradients then differ from the forward's (dropout masks redrawn); aot_eager is exact
            warnings.warn(
                "Compile(backend='eager') with checkpointed layers (GradientCheckpointing): torch's 'eager' debugging "
                "backend recomputes them in backward with other random numbers, so with dropout the gradients do not "
                "match the forward. Use backend='aot_eager' (or 'inductor') to check a checkpointed model",
                RuntimeWarning,
                stacklevel=3,
            )
        self.compile_seconds = 0.0  # wall seconds of forward calls during which dynamo compiled
        self.compiling_calls = 0
        self.shapes: set[tuple[Any, ...]] = set()  # input shape keys seen
        self._calls_by_key: set[tuple[Any, ...]] = set()
        self._shape_warned = False
        self._recompiles: Counter[str] = Counter()
        self._start_bw = _backward_compile_seconds()
        self._start_breaks = len(_graph_break_log())
        # guard failures are recorded only when something recompiles: the mark taken after
        # the last compiling call is what a new compile is compared with (no per-call scan)
        self._guards_mark = {code: len(v) for code, v in _guard_failures().items()}
        self._reported: set[str] = set()

    @property
    def model(self) -> nn.Module:
        """The eager model, which holds the weights."""
        return self._eager

    # ------------------------------------------------------------------ calling
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The compiled forward (eager after a compilation failure)."""
        if self.failure is not None:
            return self._eager(*args, **kwargs)
        key = _input_key(args, kwargs)
        call_key = (key, self._eager.training, torch.is_grad_enabled())
        new = call_key not in self._calls_by_key
        rng = None
        if new:
            self._calls_by_key.add(call_key)
            self._note_shape(key)
            # a call with new inputs may compile, and may fail: keep the RNG state so the
            # eager fallback draws the same dropout masks the plain loop would
            rng = rng_state()
        events = _compile_events()
        t0 = time.perf_counter()
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - classified below: compile failure or the model's own error
            self.compile_seconds += time.perf_counter() - t0
            return self._fail(e, args, kwargs, rng)
        if _compile_events() != events:
            self.compile_seconds += time.perf_counter() - t0  # host wall time; includes the first run
            self.compiling_calls += 1
            if self.compiling_calls > 1:
                self._note_recompile(key)
            self._guards_mark = {code: len(v) for code, v in _guard_failures().items()}
        return out

    def _note_shape(self, key: tuple[Any, ...]) -> None:
        self.shapes.add(key)
        if self._shape_warned or self.dynamic is not False or len(self.shapes) <= SHAPE_WARNING_THRESHOLD:
            return
        self._shape_warned = True
        shown = ", ".join(str([k[0] for k in s if isinstance(k, tuple)]) for s in list(self.shapes)[:3])
        import torch._dynamo.config as dynamo_config

        limit = getattr(dynamo_config, "recompile_limit", getattr(dynamo_config, "cache_size_limit", 8))
        warnings.warn(
            f"Compile: the model was called with {len(self.shapes)} different input shapes (e.g. {shown}). "
            f"With dynamic=False every new shape compiles again, and after {limit} recompilations torch runs the "
            "model uncompiled. Pad batches to a few fixed lengths (e.g. TrimPadding(buckets=...)) or use "
            "Compile(dynamic=True)",
            RuntimeWarning,
            stacklevel=4,
        )

    def _note_recompile(self, key: tuple[Any, ...]) -> None:
        reasons = []
        for code, entries in _guard_failures().items():
            fresh = entries[self._guards_mark.get(code, 0) :]
            if fresh:  # the first failure is the newest cache entry's: one per recompiled frame
                reasons.append(_strip_compile_id(fresh[0]))
        if not reasons:
            reasons = [f"new inputs {[k[0] for k in key if isinstance(k, tuple)]}"]
        self._recompiles.update(reasons)

    def _fail(
        self,
        error: Exception,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        rng: dict[str, Any] | None,
    ) -> Any:
        """The compiled call raised: compile failure (eager works) or the model's own error."""
        if rng is not None:
            set_rng_state(rng)
        out = self._eager(*args, **kwargs)  # raises the model's own error, if that was it
        self._give_up(error)
        return out

    def _give_up(self, error: Exception) -> None:
        """Compilation failed: raise (strict) or switch to eager with one warning."""
        reason = _describe(error)
        if self.strict:
            raise CompilationError(
                f"Compile(strict=True): torch.compile failed while compiling the model ({reason}). "
                "The model itself runs eagerly. Fix the reason, or use Compile(strict=False) to fall back to eager "
                "with a warning"
            ) from error
        self.failure = reason
        warnings.warn(
            f"Compile: torch.compile failed ({reason}); training continues uncompiled (eager), which computes the "
            "same thing, only slower. Fix the reason, or pass Compile(strict=True) to make this an error",
            RuntimeWarning,
            stacklevel=4,
        )

    # ------------------------------------------------------------------ reporting
    def graph_breaks(self) -> list[dict[str, Any]]:
        """Graph breaks since this wrapper was made: ``{"reason", "where", "count"}`` each."""
        log = _graph_break_log()
        start = min(self._start_breaks, len(log))
        counts: Counter[tuple[str, str]] = Counter()
        for r in log[start:]:
            if not getattr(r, "graph_break", True):
                continue
            stack = getattr(r, "user_stack", None) or []
            where = f"{stack[-1].filename}:{stack[-1].lineno}" if stack else "?"
            counts[(_first_line(str(getattr(r, "reason", r))), where)] += 1
        return [{"reason": reason, "where": where, "count": n} for (reason, where), n in counts.items()]

    def recompiles(self) -> list[dict[str, Any]]:
        """Recompilations (compiles after the first call's): ``{"reason", "count"}`` each."""
        return [{"reason": reason, "count": n} for reason, n in self._recompiles.items()]

    def report(self) -> dict[str, Any]:
        """What compilation cost and what went wrong, JSON-ready.

        ``compile_seconds``: wall seconds of forward calls during which dynamo compiled,
        plus the seconds torch reports compiling backward graphs (those compile at the
        first backward of each graph). Graph breaks and recompiles are dynamo's
        process-wide records since this wrapper was made.
        """
        bw = max(0.0, _backward_compile_seconds() - self._start_bw)
        return {
            "compile_seconds": round(self.compile_seconds + bw, 3),
            "graph_breaks": self.graph_breaks(),
            "recompiles": self.recompiles(),
            "input_shapes": len(self.shapes),
            "compile_fallback": self.failure,
        }

    def warn_new_problems(self) -> None:
        """One warning listing graph breaks and recompiles not reported before (if any).

        Nothing after a fallback to eager: that warning said it all.
        """
        if self.failure is not None:
            return
        lines = []
        for b in self.graph_breaks():
            tag = f"break|{b['reason']}|{b['where']}"
            if tag not in self._reported:
                self._reported.add(tag)
                lines.append(f"graph break x{b['count']} at {b['where']}: {b['reason']}")
        for r in self.recompiles():
            tag = f"recompile|{r['reason']}"
            if tag not in self._reported:
                self._reported.add(tag)
                lines.append(f"recompiled x{r['count']}: {r['reason']}")
        if lines:
            warnings.warn(
                "Compile: torch.compile split or recompiled the model; each graph break runs Python between "
                "compiled pieces and each recompilation costs a compile:\n  " + "\n  ".join(lines),
                RuntimeWarning,
                stacklevel=3,
            )


def compile_model(
    model: nn.Module,
    mode: str = "default",
    fullgraph: bool = False,
    dynamic: bool | None = False,
    strict: bool = False,
    backend: str | Callable[..., Any] = "inductor",
) -> CompiledModel:
    """``torch.compile(model, ...)`` as a :class:`CompiledModel`: timed, reported, eager on failure.

    Arguments as in :class:`Compile`.
    """
    _validate(mode, fullgraph, dynamic, strict, backend)
    return CompiledModel(model, mode=mode, fullgraph=fullgraph, dynamic=dynamic, strict=strict, backend=backend)


def _validate(mode: Any, fullgraph: Any, dynamic: Any, strict: Any, backend: Any) -> None:
    if mode not in COMPILE_MODES:
        raise ValueError(f"Compile(mode={mode!r}): mode must be one of {COMPILE_MODES}, e.g. Compile('default')")
    for name, flag in (("fullgraph", fullgraph), ("strict", strict)):
        if not isinstance(flag, bool):
            raise ValueError(f"Compile({name}={flag!r}): {name} must be True or False")
    if dynamic is not None and not isinstance(dynamic, bool):
        raise ValueError(f"Compile(dynamic={dynamic!r}): dynamic must be True, False or None (automatic)")
    if not (callable(backend) or (isinstance(backend, str) and backend)):
        raise ValueError(
            f"Compile(backend={backend!r}): backend must be a torch.compile backend name (e.g. 'inductor', 'eager', 'aot_eager') or a callable backend"
        )
    if isinstance(backend, str):
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=()) if hasattr(torch._dynamo, "list_backends") else None
        if known is not None and backend not in known:
            raise ValueError(f"Compile(backend={backend!r}): unknown backend; torch knows {sorted(known)}")
    if mode != "default" and backend != "inductor":
        raise ValueError(f"Compile(mode={mode!r}, backend={backend!r}): mode applies to the 'inductor' backend only; leave mode='default'")


# ---------------------------------------------------------------------------- strategy
@dataclass(frozen=True)
class CompileReport:
    """What :class:`Compile` cost and what broke (see :meth:`CompiledModel.report`)."""

    compile_seconds: float  # wall seconds of forward calls that compiled, plus backward compile time
    graph_breaks: list[dict[str, Any]]  # {"reason", "where", "count"} each
    recompiles: list[dict[str, Any]]  # {"reason", "count"} each (guard failures, e.g. a new shape)
    input_shapes: int  # distinct input shapes seen
    compile_fallback: str | None  # why compilation failed and the model runs eager, or None


class Compile(Strategy):
    """``torch.compile`` the model the loop calls, and say what it cost and what broke.

    ``wrap_model`` (order 100: after in-place surgery and DDP) returns a
    :class:`CompiledModel`; ``trainer.model`` stays the original, holding the weights.
    :meth:`report` (a :class:`CompileReport`) gives:

    * ``compile_seconds``: wall seconds of calls that compiled (forward), plus the
      backward compile time torch reports;
    * ``graph_breaks``: ``[{"reason", "where", "count"}]``;
    * ``recompiles``: ``[{"reason", "count"}]`` (guard failures, e.g. a new shape);
    * ``compile_fallback``: why compilation failed, or ``None``.

    New graph breaks and recompiles draw one warning listing them (not one per step).
    More than a few distinct input shapes draw one warning (with ``dynamic=False`` each
    new shape compiles again).

    Computes what the eager model computes, up to float rounding of fused kernels (the
    tests bound it at 1e-5 relative, dropout off). With dropout on, inductor draws its
    own random numbers: masks from the same distribution, not the eager loop's masks
    (``torch._inductor.config.fallback_random = True`` makes inductor use eager's, more
    slowly). Checkpointed layers (:class:`GradientCheckpointing`) compile consistently
    under inductor and ``aot_eager``; torch's debugging ``"eager"`` backend recomputes
    them with other random numbers, which draws a warning. If compiling fails at a call (no C compiler, an
    unsupported op, a backend error) and the eager model runs those inputs, training
    continues eager with ONE warning naming the reason, unless ``strict=True``, which
    raises :class:`CompilationError`. A failure while compiling a backward graph happens
    inside ``loss.backward()`` and is raised from there.

    Args:
        mode: ``"default"``, ``"reduce-overhead"`` (CUDA graphs), ``"max-autotune"``
            or ``"max-autotune-no-cudagraphs"`` (inductor only).
        fullgraph: require one graph (a graph break is then a compilation failure).
        dynamic: compile for symbolic shapes (``True``), one shape per compile
            (``False``), or let torch decide after the first recompile (``None``).
        strict: raise instead of falling back to eager.
        backend: a ``torch.compile`` backend name or callable (``"eager"`` and
            ``"aot_eager"`` are useful for checking what breaks, quickly).
    """

    order = 100

    def __init__(
        self,
        mode: str = "default",
        fullgraph: bool = False,
        dynamic: bool | None = False,
        strict: bool = False,
        backend: str | Callable[..., Any] = "inductor",
    ) -> None:
        _validate(mode, fullgraph, dynamic, strict, backend)
        self.mode = mode
        self.fullgraph = fullgraph
        self.dynamic = dynamic
        self.strict = strict
        self.backend = backend
        self._compiled: CompiledModel | None = None

    @property
    def compiled(self) -> CompiledModel | None:
        """The :class:`CompiledModel` the loop calls (after the trainer is built)."""
        return self._compiled

    def wrap_model(self, trainer: "FastTrainer", model: nn.Module) -> nn.Module:
        """Return the compiled wrapper of ``model``; compilation happens at the first call."""
        self._compiled = CompiledModel(model, mode=self.mode, fullgraph=self.fullgraph, dynamic=self.dynamic, strict=self.strict, backend=self.backend)
        return self._compiled

    def declare(self, context: Context) -> Declaration:
        """Generated code for the forward: few shapes, no eager kernel overrides; CUDA graphs in some modes."""
        provides = [Need(Capability.COMPILED_FORWARD, "Compile runs the model as generated code")]
        if self.mode in ("reduce-overhead", "max-autotune") and context.device.type == "cuda":
            provides.append(Need(Capability.OWN_CUDA_GRAPHS, f"Compile(mode={self.mode!r}) captures CUDA graphs of its own"))
        return Declaration(
            provides=tuple(provides),
            forbids=(
                Need(Capability.VARYING_SHAPES, "a compiled model compiles again for every new shape"),
                Need(Capability.KERNEL_OVERRIDE, "the compiled model draws dropout masks in its own generated kernels"),
            ),
            computes=Computes.ROUNDING,
        )

    def report(self) -> CompileReport | None:
        """What compilation cost and what broke so far (``None`` before the trainer is built)."""
        return None if self._compiled is None else CompileReport(**self._compiled.report())

    def on_epoch_end(self, trainer: "FastTrainer", record: "EpochRecord") -> None:
        """Warn once about new graph breaks and recompiles."""
        if self._compiled is not None:
            self._compiled.warn_new_problems()
