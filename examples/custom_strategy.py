"""Your own model, batch format and strategies with FastTrainer.

    python examples/custom_strategy.py                      # 600 HLBD pairs, 20 epochs
    python examples/custom_strategy.py --epochs 1 --tiny    # a smoke run in seconds

Three things the built-in loop does not know about, and where each one goes:

* a model whose forward takes ``(src, tgt_in, src_mask)`` and a Dataset that yields dicts
  ``{"src", "tgt", "src_mask"}``: subclass :class:`FastTrainer` and override
  ``forward_logits`` (and ``count_tokens``, which the loss is normalised by); training and
  evaluation both go through it;
* a gradient-norm log that costs no host sync per step: a :class:`Strategy` that keeps
  the norms on the device in ``before_clip`` and reads them once per epoch;
* a linear learning-rate warm-up: a :class:`Strategy` that sets the lr in ``on_step_end``.

Both strategies only add to the loop (every hook receives the trainer first), so they
compose with any built-in ones (``GradientAccumulation``, ``DeferredLossSync`` here). A
strategy that *replaces* a part of the loop fills a role instead (``ReadLossEveryStep``
below fills ``readback``); two strategies for one role are refused when the trainer is
built, and the script shows that error too.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from hlbd_fast import FastTrainer
from hlbd_fast.data import CharTokenizer, encode_pairs, load_hlbd
from hlbd_fast.strategies import ROLES, DeferredLossSync, GradientAccumulation, LossReadback, Strategy, StrategyConflictError

TINY_PAIRS = 48  # --tiny trains on the first 48 pairs


# ---------------------------------------------------------------- a model and a Dataset of dicts
class MaskedSeq2Seq(nn.Module):
    """GRU encoder, GRU decoder with dot-product attention over the source positions that ``src_mask`` keeps."""

    def __init__(self, vocab_size: int, d_model: int = 256) -> None:
        super().__init__()
        self.vocab_size = vocab_size  # FastTrainer reads it to check token ids
        self.embed = nn.Embedding(vocab_size, d_model)
        self.encoder = nn.GRU(d_model, d_model, batch_first=True)
        self.decoder = nn.GRU(d_model, d_model, batch_first=True)
        self.out = nn.Linear(2 * d_model, vocab_size)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]``; ``src_mask`` ``[B, S]`` is True at the source positions to attend to."""
        memory, _ = self.encoder(self.embed(src))  # [B, S, D]
        keep = src_mask.unsqueeze(-1).to(memory.dtype)
        start = (memory * keep).sum(1) / keep.sum(1).clamp(min=1)  # mean of the kept positions
        h, _ = self.decoder(self.embed(tgt_in), start.unsqueeze(0).contiguous())  # [B, T, D]
        scores = (h @ memory.transpose(1, 2)).masked_fill(~src_mask[:, None, :], float("-inf"))
        context = scores.softmax(dim=-1) @ memory
        return self.out(torch.cat([h, context], dim=-1))


class MaskedPairs(Dataset):
    """HLBD pairs as dicts: ``src`` and ``tgt`` token ids, ``src_mask`` True at non-pad source positions."""

    def __init__(self, pairs: list[tuple[str, str]], tokenizer: CharTokenizer, max_length: int = 64) -> None:
        self.src, self.tgt = encode_pairs(pairs, tokenizer, max_length)  # encoded once, here
        self.src_mask = self.src.ne(tokenizer.pad_id)

    def __len__(self) -> int:
        return self.src.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"src": self.src[i], "tgt": self.tgt[i], "src_mask": self.src_mask[i]}


# ---------------------------------------------------------------- the trainer, taught the dict batches
class MaskedTrainer(FastTrainer):
    """FastTrainer for dict batches and a model called as ``model(src, tgt_in, src_mask)``."""

    def to_device(self, batch: dict[str, torch.Tensor]) -> Any:
        # the built-in check runs on (src, tgt) tuples only; host tensors are free to check
        self.validate_tensors(batch["src"], batch["tgt"])
        return super().to_device(batch)

    def forward_logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # the logits and their targets: training, evaluate and fit(eval_data=...) all call this;
        # `model` is what to call (wrapped by the strategies in training, the plain model in evaluation)
        tgt_in, tgt_out = batch["tgt"][:, :-1], batch["tgt"][:, 1:]
        return model(batch["src"], tgt_in, batch["src_mask"]), tgt_out

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["tgt"][:, 1:] != self.pad_id).sum()


# ---------------------------------------------------------------- two strategies
class GradNormLog(Strategy):
    """Record the gradient norm before clipping every ``every`` optimizer steps, with no host sync per step.

    ``before_clip`` stacks the norm on the device (the gradients are already unscaled
    under fp16); ``on_epoch_end`` reads the epoch's norms back in one go (after the
    trainer's own end-of-epoch read, so nothing waits) into ``record.extra["grad_norm"]``
    and :attr:`log`.
    """

    def __init__(self, every: int = 10) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"GradNormLog(every={every!r}): every must be an integer >= 1")
        self.every = every
        self._log: list[tuple[int, float]] = []  # (optimizer step, gradient norm), all epochs
        self._pending: list[tuple[int, torch.Tensor]] = []

    @property
    def log(self) -> list[tuple[int, float]]:
        """``(optimizer step, gradient norm)`` of every recorded step so far."""
        return self._log

    def before_clip(self, trainer: FastTrainer) -> None:
        step = trainer.global_step + 1  # the step being taken
        if step % self.every:
            return
        grads = [p.grad for p in trainer.params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        self._pending.append((step, norm))  # stays on the device

    def on_epoch_end(self, trainer: FastTrainer, record: Any) -> None:
        if not self._pending:
            return
        steps = [s for s, _ in self._pending]
        norms = torch.stack([n for _, n in self._pending]).tolist()  # host sync: once per epoch
        self._pending = []
        record.extra["grad_norm"] = dict(zip(steps, norms))
        self._log.extend(zip(steps, norms))


class LinearWarmup(Strategy):
    """Raise the learning rate linearly over the first ``steps`` optimizer steps, then hold it.

    Step ``k`` (from 1) uses ``lr * min(1, k / steps)``; the target lr is the optimizer's,
    kept as ``initial_lr`` in its param groups (saved in checkpoints with the optimizer).
    Host arithmetic only: no sync. Under ``CUDAGraphStep`` every lr change is a new
    capture, so keep the warm-up short there.
    """

    def __init__(self, steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"LinearWarmup(steps={steps!r}): steps must be an integer >= 1")
        self.steps = steps

    def _set_lr(self, trainer: FastTrainer) -> None:
        factor = min(1.0, (trainer.global_step + 1) / self.steps)  # for the next step
        for group in trainer.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * factor

    def on_epoch_start(self, trainer: FastTrainer, epoch: int) -> None:
        self._set_lr(trainer)  # the optimizer exists from here on (setup runs before it is built)

    def on_step_end(self, trainer: FastTrainer) -> None:
        self._set_lr(trainer)


class ReadLossEveryStep(LossReadback):
    """A loss read-back policy: fills the ``readback`` role (used to show a conflict)."""

    def should_read(self, trainer: FastTrainer, event: str) -> bool:
        return event == "step"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help=f"d_model 32 on the first {TINY_PAIRS} pairs")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20, help="warm-up optimizer steps")
    p.add_argument("--log-every", type=int, default=5, help="record the gradient norm every N optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)

    pairs = load_hlbd()
    tokenizer = CharTokenizer.from_pairs(pairs, vocab_size=5000)
    dataset = MaskedPairs(pairs[:TINY_PAIRS] if args.tiny else pairs, tokenizer)
    torch.manual_seed(args.seed)
    model = MaskedSeq2Seq(tokenizer.vocab_size, d_model=32 if args.tiny else 256)

    grad_log = GradNormLog(every=args.log_every)
    strategies = [
        GradientAccumulation(2),  # built-in: 2 micro-batches of 16 per optimizer step
        DeferredLossSync(),  # built-in: read the loss back once per epoch
        LinearWarmup(args.warmup),  # ours: on_epoch_start / on_step_end
        grad_log,  # ours: before_clip / on_epoch_end
    ]
    trainer = MaskedTrainer(
        model,
        strategies=strategies,
        lr=args.lr,
        pad_id=tokenizer.pad_id,
        seed=args.seed,
        batch_size=16,
        progress=not args.no_progress,
    )
    print(f"strategies: {list(trainer.strategies)}")
    filled = {role: type(getattr(trainer.roles, role)).__name__ for role in ROLES}
    print(f"roles: {filled}")  # ours fill none, so they fit beside any built-in strategy

    history = trainer.fit(dataset, epochs=args.epochs)  # a Dataset of dicts: batched by the default collate
    print(history)
    metrics = trainer.evaluate(dataset)  # the same forward_logits, in eval mode
    print(f"evaluation: loss {metrics['loss']:.4f}, token accuracy {metrics['token_accuracy']:.3f}")
    print(f"lr now: {trainer.optimizer.param_groups[0]['lr']:.3g} (target {args.lr:.3g}, warm-up {args.warmup} steps)")
    print("gradient norm before clipping:")
    for step, norm in grad_log.log:
        print(f"  step {step:>4}: {norm:.4f}")

    trainer.close()  # its strategies may now serve another trainer

    # two strategies for one role are refused when the trainer is built
    try:
        MaskedTrainer(model, strategies=[DeferredLossSync(), ReadLossEveryStep()], progress=False)
    except StrategyConflictError as e:
        print(f"conflict, as expected: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
