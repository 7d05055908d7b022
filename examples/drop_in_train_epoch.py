"""An existing training script where only the epoch function is replaced by FastTrainer.

    python examples/drop_in_train_epoch.py                       # 600 pairs, 50 epochs
    python examples/drop_in_train_epoch.py --epochs 1 --tiny     # a smoke run in seconds
    python examples/drop_in_train_epoch.py --tiny --compare      # also run the original function

The script keeps its model, its Adam optimizer, its DataLoader (batch 4) and its epoch
loop. The hand-written ``train_epoch`` below stays for comparison; the loop calls
``trainer.train_epoch(dataloader)`` instead. With ``GradientAccumulation(8)`` and
``loss_normalization="micro_batch"`` the trainer computes what ``train_epoch`` computes
(``--compare`` runs both from the same weights and prints the largest weight
difference), but reads the loss back only when its progress bar redraws instead of
waiting for the device with ``loss.item()`` after every micro-batch. Add strategies to
the list for more speed.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from torch.utils.data import DataLoader

from hlbd_fast import FastTrainer
from hlbd_fast.data import CharTokenizer, PairDataset, load_hlbd
from hlbd_fast.models import Seq2SeqTransformer
from hlbd_fast.strategies import GradientAccumulation

TINY = dict(d_model=32, n_encoder_layers=1, n_decoder_layers=1, n_heads=4, d_ff=64)  # --tiny model
TINY_PAIRS = 48  # --tiny trains on the first 48 pairs


def train_epoch(model, dataloader, optimizer, criterion, device, accumulation_steps=8):
    """The original epoch function, kept for comparison (``--compare``); the loop no longer calls it."""
    model.train()
    total_loss = 0.0
    for i, (src_ids, tgt_ids) in enumerate(dataloader):
        src_ids, tgt_ids = src_ids.to(device), tgt_ids.to(device)
        output = model(src_ids, tgt_ids[:, :-1])
        loss = criterion(output.reshape(-1, output.size(-1)), tgt_ids[:, 1:].reshape(-1))
        loss = loss / accumulation_steps
        loss.backward()
        if (i + 1) % accumulation_steps == 0 or (i + 1) == len(dataloader):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        total_loss += loss.item() * accumulation_steps  # waits for the device every micro-batch
    return total_loss / len(dataloader)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--tiny", action="store_true", help=f"a tiny model {TINY} on the first {TINY_PAIRS} pairs")
    p.add_argument("--compare", action="store_true", help="also train a copy with the original train_epoch and compare")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    # ---- the existing script: data, model, optimizer, loss, loader (unchanged) ----
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pairs = load_hlbd()
    tokenizer = CharTokenizer.from_pairs(pairs, vocab_size=5000)
    dataset = PairDataset(pairs[:TINY_PAIRS] if args.tiny else pairs, tokenizer, max_length=64)
    torch.manual_seed(args.seed)
    model = Seq2SeqTransformer(vocab_size=tokenizer.vocab_size, **(TINY if args.tiny else {})).to(device)
    initial = copy.deepcopy(model)  # only for --compare
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-5)
    criterion = torch.nn.CrossEntropyLoss(ignore_index=tokenizer.pad_id)
    # a seeded generator makes the shuffling repeatable, so --compare can replay it
    dataloader = DataLoader(dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(args.seed))

    # ---- the one change: the epoch function ----
    trainer = FastTrainer(
        model,
        optimizer=optimizer,  # used as it is
        strategies=[GradientAccumulation(8)],
        loss_normalization="micro_batch",  # mean per micro-batch / 8, as train_epoch does
        max_grad_norm=1.0,  # clip_grad_norm_(..., 1.0), as train_epoch does
        pad_id=tokenizer.pad_id,
    )

    # dropout's random stream, replayed by --compare
    rng_at_start = torch.get_rng_state()
    losses = []
    for epoch in range(args.epochs):
        # was: loss = train_epoch(model, dataloader, optimizer, criterion, device)
        loss = trainer.train_epoch(dataloader)
        losses.append(loss)
        print(f"Epoch {epoch + 1}/{args.epochs}, Loss: {loss:.4f}")

    if args.compare:
        # the original function, from the same weights, the same batch order and the same dropout masks
        torch.set_rng_state(rng_at_start)
        ref = initial
        ref_optimizer = torch.optim.Adam(ref.parameters(), lr=5e-5)
        ref_loader = DataLoader(dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
        ref_losses = [train_epoch(ref, ref_loader, ref_optimizer, criterion, device) for _ in range(args.epochs)]
        worst = max((a.detach() - b.detach()).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
        worst_loss = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
        print(f"original train_epoch losses: {', '.join(f'{x:.4f}' for x in ref_losses)}")
        print(f"largest weight difference: {worst:.3g}; largest relative loss difference: {worst_loss:.3g}")
        if worst > 1e-6 or worst_loss > 1e-5:
            print("error: the trainer and the original function disagree", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
