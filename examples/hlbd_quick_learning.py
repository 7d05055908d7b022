"""Train the reference model on HLBD with FastTrainer, ask it the test prompts, save and reload it.

    python examples/hlbd_quick_learning.py                      # the real job: 600 pairs, 50 epochs
    python examples/hlbd_quick_learning.py --preset baseline    # the classic loop, for comparison
    python examples/hlbd_quick_learning.py --data my_hlbd.json  # your own HLBD file
    python examples/hlbd_quick_learning.py --epochs 1 --tiny    # a smoke run in seconds

Steps: load the pairs, build the frozen character tokenizer (vocabulary 5000), encode,
build the reference encoder-decoder, train it with a preset, generate answers for the
test prompts, then reload tokenizer and checkpoint into a fresh model and trainer and
check that the reloaded model gives the same answers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from hlbd_fast import FastTrainer
from hlbd_fast.data import CharTokenizer, encode_pairs, load_hlbd
from hlbd_fast.models import ModelConfig, Seq2SeqTransformer
from hlbd_fast.presets import PRESETS

TEST_PROMPTS = ["🌧️", "❤️", "I love you", "愛してる", "사랑해"]
MAX_LENGTH = 64  # every source and target is padded (or cut) to this many tokens
TINY = dict(d_model=32, n_encoder_layers=1, n_decoder_layers=1, n_heads=4, d_ff=64)  # --tiny model
TINY_PAIRS = 48  # --tiny trains on the first 8 concepts (6 pairs each); they hold every test prompt


def answer(model: Seq2SeqTransformer, tokenizer: CharTokenizer, prompts: list[str], device: torch.device) -> list[str]:
    """Greedy answers of ``model`` for ``prompts`` (sources encoded as in training: text, then padding)."""
    src = tokenizer.encode_batch(prompts, MAX_LENGTH).to(device)
    out = model.generate(src, max_new_tokens=32)
    return tokenizer.decode_batch(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="an HLBD file (default: the bundled 600 pairs)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--preset", default="fastest", choices=sorted(PRESETS))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--checkpoint-dir", default="runs/hlbd_quick_learning", help="where last.pt, the tokenizer and the model config go")
    p.add_argument("--resume", action="store_true", help="continue from CHECKPOINT_DIR/last.pt when it exists")
    p.add_argument("--tiny", action="store_true", help=f"a tiny model {TINY} on the first {TINY_PAIRS} pairs")
    p.add_argument("--pairs", type=int, default=None, help="train on the first N pairs only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt_dir = Path(args.checkpoint_dir)

    # 1. data: (source, target) text pairs; the tokenizer is built once from ALL pairs and never grows
    pairs = load_hlbd(args.data)
    tokenizer = CharTokenizer.from_pairs(pairs, vocab_size=5000)
    n_pairs = args.pairs or (TINY_PAIRS if args.tiny else len(pairs))
    train_pairs = pairs[:n_pairs]
    src, tgt = encode_pairs(train_pairs, tokenizer, max_length=MAX_LENGTH)  # src: text PAD..., tgt: BOS text EOS PAD...
    print(f"data: {len(train_pairs)} of {len(pairs)} pairs, {tokenizer.num_chars} characters, vocabulary {tokenizer.vocab_size}")

    # 2. the reference model (d_model 256, 3+3 layers unless --tiny)
    torch.manual_seed(args.seed)
    model = Seq2SeqTransformer(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, max_length=MAX_LENGTH, **(TINY if args.tiny else {}))
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {model.config}")

    # 3. the trainer: strategies, micro-batch size and lr come from the preset; the preset is built for `device`
    trainer = FastTrainer.from_preset(model, args.preset, device=device, seed=args.seed, progress=not args.no_progress)
    print(f"preset {args.preset!r} on {device}: batch {trainer.batch_size} x accumulation {trainer.accumulation}, strategies {list(trainer.strategies)}")

    # 4. train; fit writes CHECKPOINT_DIR/last.pt after every epoch (and on Ctrl-C)
    history = trainer.fit((src, tgt), epochs=args.epochs, checkpoint_dir=ckpt_dir, resume=args.resume)
    print(history)
    print(f"checkpoint: {trainer.checkpoint_path}")

    # 5. ask the test prompts
    expected = dict(pairs)
    answers = answer(model, tokenizer, TEST_PROMPTS, device)
    print("answers:")
    for prompt, text in zip(TEST_PROMPTS, answers):
        print(f"  {prompt} -> {text!r}   (expected {expected.get(prompt, '?')!r})")

    # 6. save what a fresh process needs next to the checkpoint: the tokenizer and the model config
    tokenizer.save(ckpt_dir / "tokenizer.json")
    (ckpt_dir / "model_config.json").write_text(json.dumps(dataclasses.asdict(model.config), indent=1), encoding="utf-8")

    # 7. reload into a fresh model and trainer, as a new process would
    tokenizer2 = CharTokenizer.load(ckpt_dir / "tokenizer.json")
    config2 = ModelConfig(**json.loads((ckpt_dir / "model_config.json").read_text(encoding="utf-8")))
    model2 = Seq2SeqTransformer(config2)
    trainer2 = FastTrainer.from_preset(model2, args.preset, device=device, progress=not args.no_progress)
    trainer2.load(trainer.checkpoint_path)  # weights, optimizer, epoch counter, history, RNG states
    same_weights = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    answers2 = answer(model2, tokenizer2, TEST_PROMPTS, device)
    print(f"reloaded: epoch {trainer2.epoch}, step {trainer2.global_step}, same weights: {same_weights}, same answers: {answers2 == answers}")
    if tokenizer2 != tokenizer or not same_weights or answers2 != answers:
        print("error: the reloaded model differs from the trained one", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
