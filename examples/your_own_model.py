"""Your own model: ``doctor`` says where the time goes, ``tune`` measures what fits it, ``from_preset`` trains it.

    hlbd-fast doctor --model examples.your_own_model:make_model   # from the repository's folder
    hlbd-fast tune --model examples.your_own_model:make_model
    python examples/your_own_model.py                            # tune, then train 3 epochs with the choice
    python examples/your_own_model.py --tiny --budget 20         # a smoke run in under a minute

The model is the user's APTModel in kind: the reference encoder-decoder, except that its
attention does not mask padded source keys, so padding reaches real positions. Cutting the
padding (TrimPadding) or running only the real tokens (Unpad) would train another model
for it: their proofs refuse it, ``fastest`` leaves them out with a warning, the doctor
names the leak and prices its fix, and ``tune`` chooses among what computes what the plain
loop computes.
"""

from __future__ import annotations

import argparse

import torch

from hlbd_fast import FastTrainer, tune
from hlbd_fast.data import CharTokenizer, encode_pairs, load_hlbd
from hlbd_fast.models import Seq2SeqTransformer


class APTLike(Seq2SeqTransformer):
    """The reference model with the APTModel's attention: every source key is attended to, padding included."""

    def source_mask(self, src: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(super().source_mask(src))


def make_model(vocab_size: int = 5000, tiny: bool = False) -> APTLike:
    """The model, built under seed 0 (``hlbd-fast doctor/tune --model examples.your_own_model:make_model``)."""
    torch.manual_seed(0)
    if tiny:
        return APTLike(vocab_size=vocab_size, d_model=32, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=64, max_length=64)
    return APTLike(vocab_size=vocab_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=120.0, help="seconds for tune (default 120)")
    p.add_argument("--epochs", type=int, default=3, help="epochs to train with the chosen configuration (default 3)")
    p.add_argument("--tiny", action="store_true", help="a small model on 128 pairs: a smoke run")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    pairs = load_hlbd()[:128] if args.tiny else load_hlbd()
    tokenizer = CharTokenizer.from_pairs(load_hlbd(), vocab_size=5000)
    data = encode_pairs(pairs, tokenizer, max_length=64)
    model = make_model(tokenizer.vocab_size, tiny=args.tiny)

    report = tune(model, data, budget_s=args.budget, progress=not args.no_progress)
    print(report)

    trainer = FastTrainer.from_preset(model, report.preset, progress=not args.no_progress)
    history = trainer.fit(data, epochs=args.epochs)
    print(f"\ntrained {args.epochs} epochs with '{report.chosen}': losses {', '.join(f'{x:.4f}' for x in history.losses)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
