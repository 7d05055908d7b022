"""The recommendations: facts derived from a :class:`Diagnosis`, and one rule per kind of advice."""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, NamedTuple

from torch import nn

from ..strategies.precision import cpu_has_native_bf16
from .pricing import PaddingPrice
from .probe import READ_LABEL, SYNC_OPS
from .report import ClassTime, Diagnosis, ModuleTime, Recommendation, SyncSource, pct

_MATMUL_OPS = (
    "aten::addmm",
    "aten::mm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::addbmm",
    "aten::_addmm_activation",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::_flash_attention_forward",
    "aten::_flash_attention_backward",
    "aten::_efficient_attention_forward",
    "aten::_efficient_attention_backward",
    "aten::mkldnn_linear",
    "aten::_mkldnn_linear",
)


@dataclass
class _Facts:
    """What several rules need, derived once from the diagnosis."""

    step: float  # timed step seconds (nan when nothing was timed)
    share: dict[str, float]  # each phase's share of the timed step
    kernels_per_step: float  # CUDA kernels per step (profiler)
    syncs_by_module: dict[str, list[SyncSource]]
    mentioned: set[str]  # module labels a class recommendation already covers
    unpad_capable: bool = False  # Unpad can run the model (its protocol, or torch transformer layers)
    in_use: frozenset[str] = frozenset()  # class names (and base class names) of the strategies at work
    price: PaddingPrice | None = None  # the padding's proofs and price, measured on a copy of the model

    @property
    def compute(self) -> float:
        """The share of forward + backward."""
        return self.share.get("forward", 0.0) + self.share.get("backward", 0.0)


class _ClassEvidence(NamedTuple):
    """What speaks against one module class: its modules, their syncs and Python loops."""

    members: list[ModuleTime]
    labels: set[str]
    syncs: list[SyncSource]
    n_sync: float
    loopers: list[ModuleTime]  # modules that call one child >= 4 times per call


def _class_evidence(d: Diagnosis, c: ClassTime) -> _ClassEvidence:
    members = [m for m in d.top_modules if m.cls == c.cls]
    labels = {m.label for m in members}
    syncs = [s for s in d.sync_sources if s.module in labels]
    loopers = [m for m in members if m.calls > 0 and m.max_child_calls / m.calls >= 4]
    return _ClassEvidence(members, labels, syncs, sum(s.per_step for s in syncs), loopers)


def _stands_out(c: ClassTime, ev: _ClassEvidence) -> bool:
    """A user's class that dominates, or any class that reads values back or loops in Python."""
    return (c.share >= 0.2 and not _is_builtin(c.cls)) or (ev.n_sync >= 1 and c.share >= 0.05) or (bool(ev.loopers) and c.share >= 0.1)


def _facts(d: Diagnosis, kernels_per_step: float, unpad_capable: bool = False, in_use: set[str] | None = None, price: PaddingPrice | None = None) -> _Facts:
    step = d.timed_step_s if d.timed_step_s > 0 else float("nan")
    by_module: defaultdict[str, list[SyncSource]] = defaultdict(list)
    for s in d.sync_sources:
        by_module[s.module].append(s)
    mentioned: set[str] = set()
    for c in d.top_classes[:5]:
        ev = _class_evidence(d, c)
        if _stands_out(c, ev):
            mentioned |= ev.labels
    share = {k: v / step for k, v in d.phases.items()}
    return _Facts(step, share, kernels_per_step, dict(by_module), mentioned, unpad_capable, frozenset(in_use or ()), price)


# ---------------------------------------------------------------------------- rules
def _slow_class(d: Diagnosis, f: _Facts, c: ClassTime) -> Recommendation | None:
    """A module class that dominates, loops, or reads values back (all its instances together)."""
    ev = _class_evidence(d, c)
    if not _stands_out(c, ev):
        return None
    total = c.total_s / f.step if f.step > 0 else 0.0
    first = ev.members[0].name or "the model itself" if ev.members else "?"
    which = first if c.modules == 1 else f"{c.modules} modules, e.g. {first}"
    parts = [
        f"`{c.cls}.forward` ({which}): {pct(c.share)} of step time in its own code"
        + (f" ({pct(total)} with the modules it calls)" if total >= c.share + 0.05 else "")
    ]
    if ev.n_sync:
        src = max(ev.syncs, key=lambda s: s.per_step)
        where = d.sync_locations.get(f"{src.module} | {src.op}", "")
        parts.append(f"{ev.n_sync:g} host syncs per step, mostly {src.op} ({_op_meaning(src.op)}) at {where}")
    if ev.loopers:
        m = max(ev.loopers, key=lambda m: m.max_child_calls / m.calls)
        parts.append(
            f"it runs {m.child} {m.max_child_calls / m.calls:.0f} times per call: a Python loop "
            "(over the batch or the heads?); batch it into one tensor operation"
        )
    advice = (
        "move statistics and logging out of the training step (or compute them on the device and read them once)"
        if ev.n_sync
        else ("vectorise it" if ev.loopers else "look at what it computes per call")
    )
    return Recommendation("; ".join(parts) + f". {advice[0].upper()}{advice[1:]}.", c.share, [])


def _builtin_class(d: Diagnosis, f: _Facts, c: ClassTime) -> Recommendation | None:
    """torch's own layers that take a large share: say so (the work itself, not a defect)."""
    if not (_is_builtin(c.cls) and c.share >= 0.15):
        return None
    return Recommendation(
        f"torch's `nn.{c.cls}` ({c.modules} module{'s' if c.modules != 1 else ''}) takes {pct(c.share)} of step "
        "time in its own forward: that is its work itself; doing less of it (fewer padded positions) or in "
        "fewer, larger kernels (bigger micro-batches, Compile) is what reduces it",
        c.share,
        [],
    )


def _loss_readback(d: Diagnosis, f: _Facts) -> Recommendation | None:
    """The running loss read back at least once per step."""
    readback = sum(s.per_step for s in d.sync_sources if s.module == READ_LABEL)
    if readback < 1:
        return None
    return Recommendation(
        f"the running loss is read back {readback:g} times per step ({pct(f.share.get('loss read-back', 0))} of step "
        "time in the timed pass; on a GPU each read also makes the host wait for the device, so the next step's launches "
        "no longer overlap its work): use DeferredLossSync() to read it once per epoch",
        f.share.get("loss read-back", 0.0),
        ["DeferredLossSync"],
    )


def _unpads_own_sync(f: _Facts, where: str) -> bool:
    """Whether a sync is Unpad's read-back of a packing's size (hlbd_fast/packing.py), by design."""
    return "Unpad" in f.in_use and "packing.py:" in where and " in _packing" in where


def _module_syncs(d: Diagnosis, f: _Facts, module: str) -> Recommendation | None:
    """Syncs in a module (or phase) that no class recommendation covers (Unpad's own get a note instead)."""
    syncs = f.syncs_by_module.get(module, [])
    own = [s for s in syncs if _unpads_own_sync(f, d.sync_locations.get(f"{s.module} | {s.op}", ""))]
    if own and not any(n.startswith("Unpad reads") for n in d.notes):
        d.notes.append(
            f"Unpad reads each packing's size back ({sum(s.per_step for s in own):g} per step, aten::nonzero in "
            "hlbd_fast/packing.py): on a GPU each one makes the host wait for the device; it is how Unpad sizes the "
            "packed tensors when their lengths are not known on the host. DevicePreload() knows them and removes these reads"
        )
    syncs = [s for s in syncs if s not in own]
    n_sync = sum(s.per_step for s in syncs)
    if module in f.mentioned or module == READ_LABEL or n_sync < 1:
        return None
    src = max(syncs, key=lambda s: s.per_step)
    where = d.sync_locations.get(f"{src.module} | {src.op}", "")
    mshare = next((m.share for m in d.top_modules if m.label == module), 0.0)
    return Recommendation(
        f"{module}: {n_sync:g} host syncs per step ({src.op} at {where}); each one makes the host wait for the device. "
        "Keep the value on the device or read it once per epoch",
        mshare,
        [],
    )


def _data_loading(d: Diagnosis, f: _Facts) -> Recommendation | None:
    data = f.share.get("data", 0.0)
    if not data >= 0.1:
        return None
    if d.device.startswith("cuda"):
        return Recommendation(f"loading data takes {pct(data)} of step time: DevicePreload() keeps the whole dataset on the GPU", data, ["DevicePreload"])
    return Recommendation(f"loading data takes {pct(data)} of step time: DataLoaderWorkers() prepares batches in worker processes", data, ["DataLoaderWorkers"])


def _padding_rule(d: Diagnosis, f: _Facts) -> Recommendation | None:
    """Columns of padding in every row, for a model that computes the same without them."""
    trim = d.padding.get("trimmable_fraction", 0.0)
    if trim < 0.25 or "TrimPadding" in f.in_use or (f.price is not None and f.price.leaks):
        return None
    share, measured = f.compute * trim, ""
    if f.price is not None:
        share = f.compute * _saved(f.price.trim_ratio)
        measured = (
            f" (measured on a copy of the model: a training step {_times(f.price.trim_ratio)} cheaper, {_ms(f.price.padded_s)} -> {_ms(f.price.trimmed_s)})"
        )
    return Recommendation(
        f"{pct(d.padding['pad_fraction'])} of the batch positions are padding and {pct(trim)} are columns that are "
        f"padding in every row of their batch; forward+backward take {pct(f.compute)} of step time: TrimPadding() cuts those columns{measured}",
        share,
        ["TrimPadding"],
    )


def _saved(ratio: float | None) -> float:
    """The share of a step that a ratio of step times saves (0 when it saves nothing)."""
    return max(0.0, 1 - 1 / ratio) if ratio and ratio == ratio else 0.0


def _times(ratio: float) -> str:
    return f"{ratio:.1f}x"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.0f} ms"


def _padding_leak(d: Diagnosis, f: _Facts) -> Recommendation | None:
    """A model that lets padding reach real positions: what it refuses, why, the fix in the model and its price."""
    p = f.price
    if p is None or not p.leaks or not d.padding:
        return None
    measured = p.trim_refused or p.unpad_refused
    refused = "TrimPadding and Unpad refuse" if p.unpad_capable else "TrimPadding refuses"
    gains = [f"TrimPadding would make a training step {_times(p.trim_ratio)} cheaper"]
    if p.unpad_ratio is not None:
        gains.append(f"TrimPadding with Unpad {_times(p.unpad_ratio)}")
    best = max(p.trim_ratio, p.unpad_ratio or 0.0)
    steps = f"{_ms(p.padded_s)} padded, {_ms(p.trimmed_s)} cut" + (f", {_ms(p.unpadded_s)} real tokens only" if p.unpadded_s is not None else "")
    return Recommendation(
        f"the model lets padding reach real positions ({measured}): {refused} it, since cut it would train another model "
        f"than the plain loop. {pct(d.padding['pad_fraction'])} of the batch positions are padding. The fix is in the model: mask "
        f"padding keys in attention (a key padding mask for the source, causal decoding); then {' and '.join(gains)} "
        f"(measured on copies of the model, one batch: {steps}; only timed, never trained)" + ("" if best >= 1.05 else ": little to gain on these batches"),
        f.compute * _saved(best),
        [],
    )


def _unpad_rule(d: Diagnosis, f: _Facts) -> Recommendation | None:
    """Padding that trimming leaves (short rows under a long one), for a model that can run without it."""
    if not f.unpad_capable or not d.padding or "Unpad" in f.in_use or (f.price is not None and f.price.leaks):
        return None
    trimmed = "TrimPadding" in f.in_use
    left = d.padding["pad_fraction"] - (d.padding["trimmable_fraction"] if trimmed else 0.0)
    if left < 0.2:
        return None
    share, measured = f.compute * left, ""
    p = f.price
    if p is not None and p.unpadded_s is not None:
        before = p.trimmed_s if trimmed else p.padded_s
        share = f.compute * _saved(before / p.unpadded_s)
        measured = f" (measured on a copy of the model: a training step {_times(before / p.unpadded_s)} cheaper, {_ms(before)} -> {_ms(p.unpadded_s)})"
    after = "after trimming " if trimmed else ""
    return Recommendation(
        f"{pct(left)} of the batch positions {after}are padding; forward+backward take {pct(f.compute)} of step time and "
        f"the model runs padding-free: Unpad() sends only the real tokens through the matrix products{measured}",
        share,
        ["Unpad"],
    )


def _launch_bound(d: Diagnosis, f: _Facts) -> Recommendation | None:
    """A GPU that idles while the host launches kernels."""
    if d.device_s is None or not d.step_s > 0:
        return None
    busy = d.device_s / d.step_s
    if not busy < 0.5:
        return None
    k = f.kernels_per_step
    avg = d.device_s / k * 1e6 if k else float("nan")
    return Recommendation(
        f"the GPU is busy only {pct(busy)} of the step ({k:.0f} kernels per step, {avg:.0f} us each on average): "
        "the host cannot launch work fast enough. CUDAGraphStep() replays the whole step as one graph; "
        "a bigger micro-batch or Compile() also cut launches",
        1 - busy,
        ["CUDAGraphStep", "Compile"],
    )


def _host_share(d: Diagnosis, names: Callable[[str], bool]) -> float:
    """The share of the busiest operators' host time spent in operators ``names`` accepts (CPU)."""
    total = sum(o.host_s for o in d.top_ops) or float("nan")
    return sum(o.host_s for o in d.top_ops if names(o.name)) / total


def _cpu_bf16(d: Diagnosis, f: _Facts) -> Recommendation | None:
    """CPU matmuls: bf16 where the CPU has it natively; otherwise a note (emulated bf16 is slower)."""
    if not d.device.startswith("cpu") or not d.top_ops or "MixedPrecision" in f.in_use:
        return None
    mm = _host_share(d, lambda name: name in _MATMUL_OPS)
    if not mm >= 0.3:
        return None
    if cpu_has_native_bf16():
        return Recommendation(
            f"matrix multiplications are {pct(mm)} of the busiest operators' host time and this CPU "
            'computes bf16 natively (AVX512-BF16 or AMX): MixedPrecision("bf16") runs them in bfloat16',
            f.compute * mm,
            ["MixedPrecision"],
        )
    d.notes.append(
        f"matrix multiplications are {pct(mm)} of the busiest operators' host time, but this CPU has "
        'no native bf16 (neither AVX512-BF16 nor AMX): MixedPrecision("bf16") would be emulated here; measure it '
        "(hlbd-fast bench --rows baseline,mixed-precision) before using it"
    )
    return None


def _dropout_masks(d: Diagnosis, f: _Facts) -> Recommendation | None:
    """CPU dropout masks drawn serially by torch."""
    if not d.device.startswith("cpu") or not d.top_ops or "FastDropout" in f.in_use:
        return None
    masks = _host_share(d, lambda name: name == "aten::bernoulli_")
    if not masks >= 0.05:
        return None
    from ..strategies.dropout import torch_draws_dropout_serially

    if not torch_draws_dropout_serially():
        return None
    return Recommendation(
        f"dropout's random masks (aten::bernoulli_) are {pct(masks)} of the busiest operators' host "
        "time; this torch draws them on one core, two 32-bit draws per element: FastDropout() draws the same "
        "distribution with half the draws (FastDropout(exact=True): torch's own masks, bit for bit, with a "
        "smaller gain)",
        f.compute * masks,
        ["FastDropout"],
    )


def _optimizer(d: Diagnosis, f: _Facts) -> Recommendation | None:
    opt = f.share.get("optimizer", 0.0)
    if not opt >= 0.15 or "FusedAdamW" in f.in_use:
        return None
    return Recommendation(
        f"the optimizer step (clip + step + zero_grad) takes {pct(opt)} of step time: "
        "FusedAdamW() updates all parameters in one kernel (CUDA, and the CPU in recent torch)",
        opt,
        ["FusedAdamW"],
    )


def _small_micro_batches(d: Diagnosis, f: _Facts) -> Recommendation | None:
    if not (d.accumulation > 1 and d.batch_size < 32):
        return None
    return Recommendation(
        f"each step runs {d.accumulation} micro-batches of {d.batch_size}; forward+backward take {pct(f.compute)} of step time "
        f"in {d.accumulation} small passes. A micro-batch of {d.batch_size * d.accumulation} with "
        "loss_normalization='tokens' computes the same step in one pass if memory allows",
        f.compute * (1 - 1 / d.accumulation),
        ["GradientAccumulation"],
    )


def _compilation(d: Diagnosis, f: _Facts) -> Recommendation | None:
    if not d.graph_breaks:
        return None
    top_reason = d.graph_break_reasons[0][0] if d.graph_break_reasons else "see torch._dynamo.explain"
    n = d.graph_breaks
    return Recommendation(
        f"torch.compile broke the graph {n} time{'s' if n != 1 else ''} (most often: {top_reason}), so the forward "
        f"({pct(f.share.get('forward', 0))} of step time) runs as several graphs with eager code between them. "
        "Remove the reason (often a .item() or a Python branch on a tensor value)",
        f.share.get("forward", 0.0),
        ["Compile"],
    )


_Rule = Callable[[Diagnosis, _Facts], "Recommendation | None"]

#: The rules about the step as a whole, in the order their recommendations are listed at equal share.
_STEP_RULES: tuple[_Rule, ...] = (
    _data_loading,
    _padding_rule,
    _padding_leak,
    _unpad_rule,
    _launch_bound,
    _cpu_bf16,
    _dropout_masks,
    _optimizer,
    _small_micro_batches,
    _compilation,
)


def _rules(d: Diagnosis, f: _Facts) -> list[_Rule]:
    """Every rule to apply: per module class, the read-back, per sync source, then the step rules."""
    top = d.top_classes[:5]
    return [
        *(functools.partial(_slow_class, c=c) for c in top),
        *(functools.partial(_builtin_class, c=c) for c in top),
        _loss_readback,
        *(functools.partial(_module_syncs, module=m) for m in f.syncs_by_module),
        *_STEP_RULES,
    ]


def recommend(
    d: Diagnosis, kernels_per_step: float, unpad_capable: bool = False, in_use: set[str] | None = None, price: PaddingPrice | None = None
) -> list[Recommendation]:
    """Apply every rule; the recommendations found, largest share first (a rule may add a note to ``d``).

    ``in_use``: the class names of the strategies at work (a strategy is never recommended
    twice); ``price``: the padding's proofs and price (a strategy the model refuses is never
    recommended: the leak and its fix are, with the price).
    """
    f = _facts(d, kernels_per_step, unpad_capable, in_use, price)
    recs = [r for rule in _rules(d, f) if (r := rule(d, f)) is not None]
    recs.sort(key=lambda r: r.share, reverse=True)
    return recs


def _op_meaning(op: str) -> str:
    return SYNC_OPS.get(op.removeprefix("aten::"), "reads a value back")


def _is_builtin(cls_name: str) -> bool:
    return hasattr(nn, cls_name) and isinstance(getattr(nn, cls_name), type)
