"""One helper for each check the library repeats: numbers, flags, token pairs, logits, the loss."""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .strategies.base import Strategy

#: FastTrainer's ``loss_normalization`` values.
NORMALISATIONS = ("tokens", "micro_batch")

__all__ = [
    "check_strategy_list",
    "check_trainer_arguments",
    "check_pad_id",
    "resolve_pad_id",
    "default_device",
    "check_forward_override",
    "refuse_forward_loss_override",
    "check_positive_int",
    "check_number",
    "check_bool",
    "is_token_pair",
    "token_pair",
    "replace_pair",
    "check_token_dtype",
    "infer_vocab_size",
    "extract_logits",
    "token_loss_sum",
]


def _who(owner: str, name: str) -> str:
    return f"{owner}({name}=...)" if owner else name


def check_positive_int(name: str, value: Any, owner: str = "", minimum: int = 1, hint: str = "") -> int:
    """``value`` as an int when it is an integer >= ``minimum`` (bools refused), else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        where = f"{owner}({name}={value!r})" if owner else f"{name}={value!r}"
        raise ValueError(f"{where}: {name} must be an integer >= {minimum}{hint}")
    return int(value)


def check_number(
    name: str,
    value: Any,
    owner: str = "",
    *,
    low: float = 0.0,
    low_inclusive: bool = False,
    high: float = math.inf,
    hint: str = "",
) -> float:
    """``value`` as a float when it is a finite real number in range (bools and strings refused)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value >= low if low_inclusive else value > low) and value < high
    if not ok:
        where = f"{owner}({name}={value!r})" if owner else f"{name}={value!r}"
        bound = f"{'>=' if low_inclusive else '>'} {low:g}" + (f" and < {high:g}" if high < math.inf else "")
        raise ValueError(f"{where}: {name} must be a finite number {bound}{hint}")
    return float(value)


def check_bool(name: str, value: Any, owner: str = "") -> bool:
    """``value`` when it is exactly True or False."""
    if not isinstance(value, bool):
        where = f"{owner}({name}={value!r})" if owner else f"{name}={value!r}"
        raise ValueError(f"{where}: {name} must be True or False")
    return value


def is_token_pair(batch: Any) -> bool:
    """Whether ``batch`` is ``(src, tgt, ...)`` with two 2-D tensors first (a tuple, list or namedtuple)."""
    return (
        isinstance(batch, (tuple, list))
        and len(batch) >= 2
        and isinstance(batch[0], torch.Tensor)
        and isinstance(batch[1], torch.Tensor)
        and batch[0].dim() == 2
        and batch[1].dim() == 2
    )


def token_pair(batch: Any, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(src, tgt)`` tensors of a batch, or a TypeError naming ``who`` and the fix."""
    if is_token_pair(batch):
        return batch[0], batch[1]
    kind = type(batch).__name__
    if isinstance(batch, dict):
        kind = f"a dict with keys {sorted(map(str, batch))}"
    elif isinstance(batch, (tuple, list)):
        kind = f"a {kind} of {len(batch)} items"
    raise TypeError(
        f"{who} needs batches that are (src, tgt, ...) tuples of 2-D token tensors; got {kind}. "
        "For other batch formats subclass FastTrainer and override forward_logits and count_tokens "
        "(examples/custom_strategy.py), or drop the strategy"
    )


def replace_pair(batch: Any, src: torch.Tensor, tgt: torch.Tensor) -> Any:
    """``batch`` with its first two items replaced, keeping its type (tuple, list, namedtuple)."""
    rest = tuple(batch[2:])
    if hasattr(batch, "_fields"):
        return type(batch)(src, tgt, *rest)
    if isinstance(batch, list):
        return [src, tgt, *rest]
    return (src, tgt) + rest


def check_token_dtype(name: str, t: torch.Tensor, where: str) -> None:
    """Token ids must be int64 (what ``nn.Embedding`` and ``cross_entropy`` targets take everywhere)."""
    if t.dtype != torch.int64:
        raise TypeError(
            f"{where}: {name} has dtype {t.dtype}; token ids must be torch.int64 (int64 is what cross_entropy's targets need). Convert once with {name}.long()"
        )


def infer_vocab_size(model: nn.Module) -> int | None:
    """The model's vocabulary: ``model.vocab_size``, else its largest embedding table, else ``None``."""
    v = getattr(model, "vocab_size", None)
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(sizes) if sizes else None


def extract_logits(out: Any, rows: int, length: int, vocab_size: int | None = None) -> torch.Tensor:
    """Pull ``[rows, length, V]`` logits out of a model's output (tensor, dict or tuple) and check them (no sync)."""
    if isinstance(out, dict):
        if "logits" not in out:
            raise ValueError(f"model returned a dict without 'logits' (keys: {sorted(out)}); return the logits under 'logits'")
        out = out["logits"]
    elif isinstance(out, (tuple, list)):
        if not out:
            raise ValueError("model returned an empty tuple; return logits [B, T, V] first")
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"model must return logits [B, T, V]; it returned {type(out).__name__}")
    if out.dim() != 3 or out.shape[0] != rows or out.shape[1] != length:
        raise ValueError(
            f"model returned shape {tuple(out.shape)}; expected logits [B, T, V] = [{rows}, {length}, vocab] "
            "for model(src, tgt[:, :-1]). A model that returns [T, B, V] needs batch_first=True"
        )
    if not out.is_floating_point():
        raise ValueError(f"model returned {out.dtype} logits; expected floating point")
    if vocab_size is not None and out.shape[-1] < vocab_size:
        raise ValueError(
            f"model returned logits over {out.shape[-1]} ids but its vocabulary has {vocab_size} "
            "(model.vocab_size or its largest nn.Embedding); the output layer must cover every id"
        )
    return out


def token_loss_sum(logits: torch.Tensor, tgt_out: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Cross-entropy summed over the non-pad positions of ``tgt_out`` (0-d tensor, no sync)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1), ignore_index=pad_id, reduction="sum")


def check_strategy_list(strategies: Any) -> tuple["Strategy", ...]:
    """The trainer's strategies as a tuple: ``None`` is none; classes, non-strategies and repeats are refused."""
    from .strategies.base import Strategy

    if strategies is None:
        return ()
    if isinstance(strategies, Strategy) or not isinstance(strategies, (list, tuple)):
        raise TypeError(f"strategies must be a list of Strategy instances, e.g. [GradientAccumulation(8)]; got {strategies!r}")
    for s in strategies:
        if not isinstance(s, Strategy):
            raise TypeError(
                f"strategies must be Strategy instances; got {s!r} ({type(s).__name__}). "
                "Did you pass the class instead of an instance, e.g. GradientAccumulation instead of GradientAccumulation(8)?"
            )
    if len({id(s) for s in strategies}) != len(strategies):
        raise ValueError("the same strategy instance is listed twice; build one instance per use")
    return tuple(strategies)


def check_trainer_arguments(model: Any, lr: Any, max_grad_norm: Any, normalization: Any, progress: Any, batch_size: Any, seed: Any) -> None:
    """FastTrainer's scalar arguments, each refused with its name and the fix."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_number("lr", lr, hint=", e.g. lr=5e-5")
    if max_grad_norm is not None:
        check_number("max_grad_norm", max_grad_norm, hint=", or None to disable clipping")
    if normalization not in NORMALISATIONS:
        raise ValueError(
            f"loss_normalization={normalization!r} is not one of {NORMALISATIONS}; "
            "use 'tokens' (exact under any batch split) or 'micro_batch' (the classic loop)"
        )
    check_bool("progress", progress)
    check_positive_int("batch_size", batch_size)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed={seed!r} must be an integer, or None to follow torch.manual_seed")


def check_pad_id(pad_id: Any, vocab_size: int | None) -> int:
    """An int id >= 0 inside the model's vocabulary (when known)."""
    check_positive_int("pad_id", pad_id, minimum=0)
    if vocab_size is not None and pad_id >= vocab_size:
        raise ValueError(f"pad_id={pad_id} is outside the model's vocabulary of {vocab_size} ids; use the tokenizer's pad_id")
    return int(pad_id)


def resolve_pad_id(pad_id: Any, model: nn.Module, vocab_size: int | None) -> int:
    """The trainer's pad id: ``pad_id`` when given, else the model's ``pad_id`` attribute (an int), else 0.

    A ``pad_id`` other than the model's is refused: the loss would score the model's padding
    as targets, and padding-free execution would treat real tokens as padding.
    """
    own = getattr(model, "pad_id", None)
    own = own if isinstance(own, int) and not isinstance(own, bool) else None
    if pad_id is None:
        return check_pad_id(0 if own is None else own, vocab_size)
    check_pad_id(pad_id, vocab_size)
    if own is not None and pad_id != own:
        raise ValueError(
            f"pad_id={pad_id} but the model pads with {own} (model.pad_id): the loss would train the model's padding as a target. "
            f"Leave pad_id out (it is read from the model), or build the model with pad_id={pad_id}"
        )
    return int(pad_id)


def default_device(model: nn.Module, device: Any) -> torch.device:
    """``device`` (refused when it is CUDA and CUDA is not available), else the model's, else the CPU."""
    if device is None:
        p = next(itertools.chain(model.parameters(), model.buffers()), None)
        return p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available here; use device='cpu'")
    return device


def check_forward_override(cls: Any, base: Any, forward: Any) -> None:
    """A subclass that runs the model itself and a strategy that replaces the forward cannot both act."""
    from .strategies.base import Forward, StrategyConflictError

    if cls.forward_logits is not base.forward_logits and type(forward).logits is not Forward.logits:
        raise StrategyConflictError(
            f"{cls.__name__}.forward_logits runs the model itself, so {forward!r}, which replaces the model's "
            "forward and the loss positions, would never run; drop the strategy, or return "
            "super().forward_logits(model, batch) for the batches it can run"
        )


def refuse_forward_loss_override(cls: Any, base: Any) -> None:
    """``forward_loss`` is built on ``forward_logits``; overriding it would leave evaluation on the other seam."""
    if cls.forward_loss is not base.forward_loss:
        raise TypeError(
            f"{cls.__name__} overrides forward_loss; override forward_logits(self, model, batch) -> (logits, targets) "
            "instead (and count_tokens for other batch formats): training, evaluate, fit(eval_data=...), the doctor "
            "and tune all call it, and the token loss and accuracy follow from it"
        )
