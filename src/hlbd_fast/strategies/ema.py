"""EMA: an exponential moving average of the weights, evaluated and saved as the best weights.

The averaged copy lives on the training device and is updated after every optimizer
step with in-place device work only (no host sync, no Python branch on a tensor), so a
captured CUDA graph (:class:`~hlbd_fast.strategies.CUDAGraphStep`) replays the update
with the step. Training never reads it: a fit with EMA trains the very weights of one
without, bit for bit.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import TYPE_CHECKING, Any, ContextManager, Iterator

import torch
from torch import nn

from .._validation import check_number
from .base import Strategy

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import FastTrainer

__all__ = ["EMA"]


def _averaged_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and floating-point buffers by name (each tensor once: tied weights share a name)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_floating_point() and id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


class EMA(Strategy):
    """Keep an exponential moving average of the weights; evaluate and keep the best with it.

    **Update rule**, after every optimizer step (skipped fp16 steps included: the weights
    did not move, the average moves toward them)::

        first step:  ema = w                                  (a copy: no bias from the initial weights)
        then:        ema = decay * ema + (1 - decay) * w      (torch.lerp(ema, w, 1 - decay), in place)

    as ``torch.optim.swa_utils.get_ema_multi_avg_fn`` and Lightning's EMA weight averaging
    do (``lerp`` equals the rule up to rounding). There is no further warm-up or bias
    correction. ``w`` is every parameter and every floating-point buffer of the model
    (BatchNorm statistics are averaged too; integer buffers are left alone). Before the
    first step the average *is* the current weights, so weights loaded into the model
    after the trainer was built, or a resume from a checkpoint without EMA state, are
    averaged from where training really starts.

    **Evaluation.** Inside :meth:`eval_scope` — around :meth:`FastTrainer.evaluate`, the
    evaluations of ``fit(eval_data=...)`` and the writing of ``best.pt`` — the averaged
    weights are copied into the model's own tensors; the training weights are copied
    back, bit for bit, when the scope exits (on every path). ``last.pt`` holds the
    training weights and the average (in this strategy's state: an exact resume);
    ``best.pt`` holds the averaged weights as the model's.

    Example::

        import torch
        from hlbd_fast import FastTrainer
        from hlbd_fast.models import Seq2SeqTransformer
        from hlbd_fast.strategies.ema import EMA

        src, tgt = torch.randint(1, 50, (64, 10)), torch.randint(1, 50, (64, 10))  # token ids; 0 pads
        model = Seq2SeqTransformer(vocab_size=50, d_model=32, n_heads=2, d_ff=64, n_encoder_layers=1, n_decoder_layers=1)

        ema = EMA(decay=0.99)
        trainer = FastTrainer(model, strategies=[ema], progress=False)
        trainer.fit((src, tgt), epochs=2, eval_data=(src[:16], tgt[:16]))  # evaluates the average
        torch.save(ema.averaged_state_dict(), "ema.pt")  # loads into the model with load_state_dict

    Args:
        decay: weight of the average so far, in ``[0, 1)``; ``1 - decay`` is the weight of
            the newest weights (0.999 averages over about the last 1000 steps).
    """

    step_hook_work = "device"  # after_optimizer_step only queues device work: a captured step replays it

    def __init__(self, decay: float = 0.999) -> None:
        self.decay = check_number("decay", decay, "EMA", low=0.0, low_inclusive=True, high=1.0, hint=", e.g. decay=0.999")
        self._model: nn.Module | None = None
        self._live: dict[str, torch.Tensor] = {}  # the model's tensors that are averaged
        self._ema: dict[str, torch.Tensor] = {}  # their averages, same device and dtype
        self._started = False  # whether the first update (a copy) has run
        self._swapped = False  # inside eval_scope: the model holds the averages

    def setup(self, trainer: "FastTrainer") -> None:
        """Allocate the average on the model's device (before any CUDA graph is captured)."""
        self._model = trainer.model
        self._live = _averaged_tensors(trainer.model)
        self._ema = {name: t.detach().clone() for name, t in self._live.items()}

    def after_optimizer_step(self, trainer: "FastTrainer") -> None:
        """Update the average in place (device work only; under CUDA graphs captured once and replayed)."""
        ema, live = list(self._ema.values()), [t.detach() for t in self._live.values()]
        with torch.no_grad():
            if self._started:  # a host flag: set at the first (eager) step, before any capture
                torch._foreach_lerp_(ema, live, 1.0 - self.decay)
            else:
                for e, w in zip(ema, live):
                    e.copy_(w)
                self._started = True

    def eval_scope(self, trainer: "FastTrainer") -> ContextManager[Any]:
        """The averaged weights in the model for the scope; the training weights back, exactly, on exit."""
        if not self._started or self._swapped:  # no average yet (it is the weights), or already swapped in
            return contextlib.nullcontext()
        return self._swap_in()

    @contextlib.contextmanager
    def _swap_in(self) -> Iterator[None]:
        live = list(self._live.values())
        with torch.no_grad():
            backup = [t.detach().clone() for t in live]
            for t, e in zip(live, self._ema.values()):
                t.copy_(e)
        self._swapped = True
        try:
            yield
        finally:
            with torch.no_grad():
                for t, b in zip(live, backup):
                    t.copy_(b)
            self._swapped = False

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's ``state_dict`` with the averaged weights (copies): ``model.load_state_dict`` takes it.

        Integer buffers are the model's own. Before the first step: the current weights.
        """
        if self._model is None:
            raise RuntimeError("EMA.averaged_state_dict(): the EMA is not in a trainer yet; build FastTrainer(strategies=[ema]) first")
        by_id = {id(t): name for name, t in self._live.items()}
        out = {}
        for key, t in self._model.state_dict(keep_vars=True).items():
            name = by_id.get(id(t))
            source = self._ema[name] if name is not None and self._started else t
            out[key] = source.detach().clone()
        return out

    def state_dict(self) -> dict[str, Any]:
        """The averages (the live tensors, as ``nn.Module.state_dict`` gives) and whether averaging started."""
        return {"started": self._started, "averaged": dict(self._ema)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy saved averages into the existing tensors (a captured CUDA graph keeps updating them)."""
        saved = state["averaged"]
        if set(saved) != set(self._ema):
            missing, extra = sorted(set(self._ema) - set(saved)), sorted(set(saved) - set(self._ema))
            raise ValueError(f"EMA state does not fit this model (missing {missing[:5]}, unexpected {extra[:5]})")
        for name, e in self._ema.items():
            if tuple(saved[name].shape) != tuple(e.shape):
                raise ValueError(f"EMA state: {name} has shape {tuple(saved[name].shape)}, the model's is {tuple(e.shape)}")
        with torch.no_grad():
            for name, e in self._ema.items():
                e.copy_(saved[name])
        self._started = bool(state["started"])
