"""Train a model built from torch's nn.Transformer on HLBD: Unpad runs its layers on real tokens only.

    python examples/torch_transformer.py                     # 600 pairs, 5 epochs, the fastest preset
    python examples/torch_transformer.py --compare           # also padded, from the same weights: same losses?
    python examples/torch_transformer.py --tiny --epochs 2   # a smoke run in seconds

The model is written as tutorials write it: embeddings, ``nn.Transformer`` called with key
padding masks, a linear head. Nothing in it knows about hlbd_fast. ``--compare`` trains the
same initial weights in fp32 with dropout off, once with ``Unpad`` and once without, and
prints both loss histories: they agree up to float rounding.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from hlbd_fast import FastTrainer, MixedPrecision, Unpad, presets
from hlbd_fast.data import PAD_ID, CharTokenizer, encode_pairs, load_hlbd


class TorchSeq2Seq(nn.Module):
    """Token and position embeddings, ``nn.Transformer`` (batch first, pre-norm), a linear head."""

    def __init__(
        self, vocab_size: int, d_model: int = 256, heads: int = 8, layers: int = 3, d_ff: int = 1024, dropout: float = 0.1, max_length: int = 64
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_length, d_model)
        self.transformer = nn.Transformer(d_model, heads, layers, layers, d_ff, dropout, batch_first=True, norm_first=True, activation="gelu")
        self.head = nn.Linear(d_model, vocab_size)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        n = tgt_in.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=src.device).triu(1)  # True: not attended (as the padding masks)
        hidden = self.transformer(
            self._embed(src),
            self._embed(tgt_in),
            tgt_mask=causal,
            tgt_is_causal=True,
            src_key_padding_mask=src.eq(PAD_ID),
            tgt_key_padding_mask=tgt_in.eq(PAD_ID),
            memory_key_padding_mask=src.eq(PAD_ID),
        )
        return self.head(hidden)


def train(model: nn.Module, preset: presets.Preset, data: tuple[torch.Tensor, torch.Tensor], epochs: int, progress: bool) -> tuple[list[float], float]:
    """Losses per epoch and seconds per epoch (after the first) of ``preset`` on ``model``."""
    trainer = FastTrainer.from_preset(model, preset, device="cpu", seed=0, progress=progress)
    mode = getattr(trainer.roles.forward, "mode", None)
    print(f"  {preset.name}: strategies {[type(s).__name__ for s in trainer.strategies]}, Unpad mode {mode}")
    seconds = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        trainer.fit(data, epochs=epoch)
        seconds.append(time.perf_counter() - start)
    later = seconds[1:] or seconds
    return trainer.history.losses, sum(later) / len(later)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--compare", action="store_true", help="also train padded from the same weights (fp32, dropout off)")
    p.add_argument("--tiny", action="store_true", help="48 pairs and a small model")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    pairs = load_hlbd()
    tokenizer = CharTokenizer.from_pairs(pairs, vocab_size=5000)
    data = encode_pairs(pairs[:48] if args.tiny else pairs, tokenizer, max_length=64)
    size = dict(d_model=32, heads=4, layers=1, d_ff=64) if args.tiny else {}
    torch.manual_seed(0)
    model = TorchSeq2Seq(tokenizer.vocab_size, dropout=0.0 if args.compare else 0.1, **size)
    fastest = presets.fastest("cpu")
    if not args.compare:
        losses, s_per_epoch = train(model, fastest, data, args.epochs, not args.no_progress)
        print(f"losses: {', '.join(f'{x:.4f}' for x in losses)}; {s_per_epoch:.2f} s/epoch")
        return 0
    unpadded = fastest.without(MixedPrecision)  # fp32 on both sides: equal up to rounding
    a, sa = train(copy.deepcopy(model), unpadded, data, args.epochs, not args.no_progress)
    b, sb = train(copy.deepcopy(model), unpadded.without(Unpad), data, args.epochs, not args.no_progress)
    diff = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    print(f"with Unpad:    {', '.join(f'{x:.6f}' for x in a)}  ({sa:.2f} s/epoch)")
    print(f"without Unpad: {', '.join(f'{x:.6f}' for x in b)}  ({sb:.2f} s/epoch)")
    print(f"largest relative loss difference: {diff:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
