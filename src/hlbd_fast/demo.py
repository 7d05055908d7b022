"""``hlbd-fast demo``: the HLBD training job on the bundled HLBD data, plain loop versus a fast preset.

1. **Speed.** The plain loop and the fast preset start from the same initial weights and
   see the same samples in the same order, at the plan's learning rate: the table shows
   time per epoch, the speed-up and the losses, and, side by side after the same number
   of epochs, what each run learned (evaluation loss, token accuracy, exact match).
2. **Learning.** The fast preset then trains a fresh copy to convergence with a warm-up
   and cosine schedule at a learning rate that suits it, and reports exact match: the
   share of pairs whose greedy output is the target sentence. A few generations follow.

``--holdout 0.1`` keeps a tenth of the pairs out of training and evaluates on them
(HLBD is a memorisation task: unseen pairs are hard; the default evaluates on the
training pairs).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ._io import check_writable_dir, check_writable_file
from .cli import resolve_device
from .data import CharTokenizer, encode_pairs, load_hlbd
from .history import History
from .models import Seq2SeqTransformer
from .presets import PRESETS, get_preset
from .schedules import warmup_cosine
from .trainer import FastTrainer

__all__ = ["DemoError", "TEST_PROMPTS", "add_arguments", "check_out", "main", "run", "run_demo"]

log = logging.getLogger("hlbd_fast")

#: The learning phase's defaults: the fast preset from fresh weights, 5% warm-up, cosine decay.
LEARN_EPOCHS = 30
LEARN_LR = 1e-3

#: The HLBD test prompts: rain and love, in five scripts.
TEST_PROMPTS: tuple[str, ...] = ("🌧️", "❤️", "I love you", "愛してる", "사랑해")


class DemoError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _device(name: str | torch.device | None) -> torch.device:
    try:
        return resolve_device(name)
    except ValueError as e:
        raise DemoError(str(e)) from None


def _plan(preset: str, epochs: int, baseline_epochs: int) -> list[tuple[str, int]]:
    """``(run name, epochs)`` in training order: the baseline, then ``preset`` (once when it is the baseline)."""
    return [("baseline", baseline_epochs), (preset, epochs)] if preset != "baseline" else [("baseline", epochs)]


def _output_files(runs: Sequence[str]) -> list[str]:
    """The files the demo writes in ``--out`` for the runs named ``runs``."""
    return [f"history_{name}.json" for name in runs] + ["quality.json", "generations.json", "loss_curves.png"]


def check_out(out: str | os.PathLike[str], runs: Sequence[str]) -> Path:
    """Create ``--out`` and check that every file the demo writes there can be written, before any work.

    Raises:
        DemoError: one line naming the path that cannot be written.
    """
    try:
        folder = check_writable_dir(out, "--out")
        for name in _output_files(runs):
            check_writable_file(folder / name, "--out file")
    except ValueError as e:
        raise DemoError(str(e)) from None
    return folder


def _load_pairs(data: str | os.PathLike[str] | None) -> list[tuple[str, str]]:
    """The HLBD pairs of ``--data`` (default: the bundled data); every problem is a one-line DemoError naming the path once."""
    where = "the bundled HLBD data" if data is None else f"--data {str(data)!r}"
    try:
        return load_hlbd(data)
    except FileNotFoundError:
        raise DemoError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise DemoError(f"{where}: is a directory; name an HLBD file") from None
    except OSError as e:
        raise DemoError(f"{where}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:
        raise DemoError(f"{where}: {_without_origin(str(e), data)}") from None


def _without_origin(message: str, data: str | os.PathLike[str] | None) -> str:
    """``message`` without the ``"<path>: "`` prefix that :func:`load_hlbd` puts on its errors (the caller names the path)."""
    if data is not None:
        for origin in (str(Path(data)), str(data)):
            if message.startswith(f"{origin}: "):
                return message[len(origin) + 2 :]
    return message


def _check_options(
    epochs: int,
    baseline_epochs: int,
    preset: str,
    device: str | None,
    out: str | os.PathLike[str] | None,
    holdout: float = 0.0,
    learn_epochs: int = 0,
    learn_lr: float = 1e-3,
) -> torch.device:
    """The device; every option is checked (and ``--out`` created) before any work, else a DemoError."""
    dev = _device(device)
    if epochs < 1 or baseline_epochs < 0:
        raise DemoError("--epochs must be >= 1 and --baseline-epochs >= 0")
    if not 0.0 <= holdout < 1.0:
        raise DemoError(f"--holdout {holdout} must be at least 0 and below 1 (e.g. 0.1: a tenth of the pairs held out)")
    if learn_epochs < 0:
        raise DemoError(f"--learn-epochs {learn_epochs} must be >= 0 (0 skips the learning phase)")
    if not (learn_lr > 0 and learn_lr < float("inf")):
        raise DemoError(f"--learn-lr {learn_lr} must be a positive number, e.g. 1e-3")
    if preset not in PRESETS:
        raise DemoError(f"--preset {preset!r} is unknown; choose one of {', '.join(sorted(PRESETS))}")
    if out is not None:
        runs = [name for name, n in _plan(preset, epochs, baseline_epochs) if n > 0] + (["learn"] if learn_epochs else [])
        check_out(out, runs)
    return dev


@dataclass
class DemoData:
    """The encoded pairs: what trains, and what is evaluated (the same pairs unless some are held out)."""

    tokenizer: CharTokenizer
    pairs: list[tuple[str, str]]
    train: tuple[torch.Tensor, torch.Tensor]
    eval: tuple[torch.Tensor, torch.Tensor]
    held_out: int  # pairs kept out of training


def _prepare(data: str | None, holdout: float, seed: int) -> DemoData:
    pairs = _load_pairs(data)
    tokenizer = CharTokenizer.from_pairs(pairs, vocab_size=5000)
    src, tgt = encode_pairs(pairs, tokenizer, max_length=64)
    n_out = int(round(holdout * len(pairs)))
    if n_out == 0:
        return DemoData(tokenizer, pairs, (src, tgt), (src, tgt), 0)
    if n_out >= len(pairs):
        raise DemoError(f"--holdout {holdout} leaves no pair to train on ({len(pairs)} pairs)")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    keep, out = order[n_out:].sort().values, order[:n_out].sort().values
    return DemoData(tokenizer, pairs, (src[keep], tgt[keep]), (src[out], tgt[out]), n_out)


def run_demo(
    epochs: int,
    baseline_epochs: int,
    preset: str = "fastest",
    data: str | None = None,
    device: str | None = None,
    out: str | None = None,
    seed: int = 0,
    model_overrides: dict[str, Any] | None = None,
    progress: bool = True,
    holdout: float = 0.0,
    learn_epochs: int = 0,
    learn_lr: float = 1e-3,
) -> dict[str, Any]:
    """Train the plain loop and ``preset`` from the same weights, then ``preset`` to convergence; return the figures.

    The baseline runs ``baseline_epochs`` (enough to time it and compare losses), the
    preset runs ``epochs``; both are evaluated after ``baseline_epochs`` (side by side).
    ``learn_epochs`` > 0 adds the learning phase: ``preset`` from fresh weights at
    ``learn_lr`` with a 5% warm-up and a cosine decay. ``model_overrides`` shrinks the
    model (tests).
    """
    dev = _check_options(epochs, baseline_epochs, preset, device, out, holdout, learn_epochs, learn_lr)
    d = _prepare(data, holdout, seed)
    torch.manual_seed(seed)
    initial = Seq2SeqTransformer(**(model_overrides or {}))
    held = f", {d.held_out} held out for evaluation" if d.held_out else ""
    print(
        f"HLBD: {len(d.pairs)} pairs{held}, {d.tokenizer.num_chars} characters; model "
        f"{sum(p.numel() for p in initial.parameters()) / 1e6:.1f}M parameters; device {dev}"
    )
    runs = _speed_phase(initial, d, preset, epochs, baseline_epochs, dev, seed, progress)
    _print_table(runs)
    _print_quality(runs, d)
    if learn_epochs:
        runs["learn"] = _learn_phase(initial, d, preset, learn_epochs, learn_lr, dev, seed, progress)
    trained = runs["learn" if learn_epochs else list(runs)[-1]]["trainer"].model
    generations = _generate(trained, d.tokenizer, d.pairs, dev)
    if out is not None:
        _write_outputs(Path(out), runs, generations)
    return {name: _summary(r) for name, r in runs.items()} | {"generations": generations}


def _speed_phase(
    initial: torch.nn.Module, d: DemoData, preset: str, epochs: int, baseline_epochs: int, dev: torch.device, seed: int, progress: bool
) -> dict[str, dict[str, Any]]:
    """Both runs from the same weights and order; each evaluated after the baseline's epoch count."""
    runs: dict[str, dict[str, Any]] = {}
    shared = min(n for _, n in _plan(preset, epochs, baseline_epochs) if n > 0)
    for name, n_epochs in _plan(preset, epochs, baseline_epochs):
        if n_epochs == 0:
            continue
        trainer = FastTrainer.from_preset(copy.deepcopy(initial), get_preset(name, device=dev), device=dev, seed=seed, progress=progress)
        print(f"training '{name}' for {n_epochs} epochs (micro-batch {trainer.batch_size}, accumulation {trainer.accumulation}) ...")
        t0 = time.perf_counter()
        trainer.fit(d.train, epochs=min(shared, n_epochs))
        seconds = time.perf_counter() - t0
        quality = trainer.evaluate(d.eval, generate=True)  # not timed
        t0 = time.perf_counter()
        history = trainer.fit(d.train, epochs=n_epochs)
        runs[name] = {
            "history": history,
            "total_s": seconds + time.perf_counter() - t0,
            "trainer": trainer,
            "quality": quality,
            "quality_epoch": min(shared, n_epochs),
        }
    return runs


def _learn_phase(initial: torch.nn.Module, d: DemoData, preset: str, epochs: int, lr: float, dev: torch.device, seed: int, progress: bool) -> dict[str, Any]:
    """``preset`` from fresh weights to convergence: warm-up and cosine at ``lr``; exact match at the end."""
    steps = epochs * -(-d.train[0].shape[0] // get_preset(preset, device=dev).batch_size)
    schedule = warmup_cosine(max(1, steps // 20), steps)
    trainer = FastTrainer.from_preset(
        copy.deepcopy(initial), get_preset(preset, device=dev), device=dev, seed=seed, progress=progress, lr=lr, scheduler=schedule
    )
    print(f"learning: '{preset}' for {epochs} epochs at lr {lr:g} (5% warm-up, cosine decay) ...")
    t0 = time.perf_counter()
    history = trainer.fit(d.train, epochs=epochs, eval_data=d.eval, eval_every=max(1, epochs // 6))  # the curve's eval points
    seconds = time.perf_counter() - t0 - history.eval_seconds  # training time
    quality = trainer.evaluate(d.eval, generate=True)
    on = "held-out" if d.held_out else "training"
    print(
        f"learned in {seconds:.0f} s ({history.s_per_epoch():.2f} s/epoch): exact match {quality['exact_match']:.1%} of "
        f"{int(quality['samples'])} {on} pairs, token accuracy {quality['token_accuracy']:.1%}, eval loss {quality['loss']:.4f}"
    )
    return {"history": history, "total_s": seconds, "trainer": trainer, "quality": quality, "quality_epoch": epochs}


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    h: History = r["history"]
    return {"losses": h.losses, "s_per_epoch": h.s_per_epoch(), "total_s": r["total_s"], "quality": r["quality"], "quality_epoch": r["quality_epoch"]}


def _print_table(runs: dict[str, dict[str, Any]]) -> None:
    base = runs.get("baseline")
    shared = min(len(r["history"]) for r in runs.values())
    print()
    print(f"| run | epochs | s/epoch | speedup | loss @ epoch {shared} | final loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        h: History = r["history"]
        spe = h.s_per_epoch()
        speedup = base["history"].s_per_epoch() / spe if base else float("nan")
        print(f"| {name} | {len(h)} | {spe:.2f} | {speedup:.1f}x | {h.losses[shared - 1]:.4f} | {h.losses[-1]:.4f} |")
    print()


def _print_quality(runs: dict[str, dict[str, Any]], d: DemoData) -> None:
    on = f"{d.held_out} held-out pairs" if d.held_out else f"the {d.eval[0].shape[0]} training pairs"
    print(f"what each run learned, evaluated on {on}:")
    print("| run | after epochs | eval loss | token accuracy | exact match |")
    print("|---|---:|---:|---:|---:|")
    for name, r in runs.items():
        q = r["quality"]
        print(f"| {name} | {r['quality_epoch']} | {q['loss']:.4f} | {q['token_accuracy']:.1%} | {q['exact_match']:.1%} |")
    print()


def _generate(model: torch.nn.Module, tokenizer: CharTokenizer, pairs: Sequence[tuple[str, str]], dev: torch.device) -> list[dict[str, str]]:
    known = dict(pairs)
    prompts = [p for p in TEST_PROMPTS if p in known] or [s for s, _ in pairs[:5]]
    src, _ = encode_pairs([(p, known.get(p, "?")) for p in prompts], tokenizer, max_length=64)
    out = model.generate(src.to(dev), max_new_tokens=32)
    rows = []
    print("generations (greedy):")
    for p, ids in zip(prompts, out.tolist()):
        text = tokenizer.decode(ids)
        rows.append({"prompt": p, "generated": text, "expected": known.get(p, "")})
        print(f"  {p!r:>14} -> {text}   (expected {known.get(p, '')})")
    return rows


def _write_outputs(out: Path, runs: dict[str, dict[str, Any]], generations: list[dict[str, str]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, r in runs.items():
        r["history"].save_json(out / f"history_{name}.json")
    quality = {name: {"after_epochs": r["quality_epoch"], **r["quality"]} for name, r in runs.items()}
    (out / "quality.json").write_text(json.dumps(quality, indent=2), encoding="utf-8")
    (out / "generations.json").write_text(json.dumps(generations, ensure_ascii=False, indent=2), encoding="utf-8")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {out}/history_*.json (install hlbd-fast[plot] for a PNG of the loss curves)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in runs.items():
        h = r["history"]
        line = ax.plot(range(1, len(h) + 1), h.losses, marker="o", label=f"{name} ({h.s_per_epoch():.2f} s/epoch)")[0]
        evaluated = [(rec.epoch, rec.eval["loss"]) for rec in h if rec.eval]
        if evaluated:
            ax.plot(*zip(*evaluated), linestyle="--", marker="x", color=line.get_color(), label=f"{name}: eval loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out}/history_*.json and {out}/loss_curves.png")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``hlbd-fast demo`` to ``p``."""
    cuda = torch.cuda.is_available()
    p.add_argument("--epochs", type=int, default=50 if cuda else 20, help="epochs of the fast run (default: 50 on CUDA, 20 on CPU)")
    p.add_argument("--baseline-epochs", type=int, default=None, help="epochs of the plain loop (default: --epochs on CUDA, 2 on CPU)")
    p.add_argument("--preset", default="fastest", help=f"the fast run's preset ({', '.join(sorted(PRESETS))})")
    p.add_argument("--data", default=None, help="an HLBD file (default: the bundled 600 pairs)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=None, help="write history JSON (and a PNG with matplotlib) in this directory (checked before training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--holdout", type=float, default=0.0, help="share of the pairs kept out of training and evaluated on (default 0: evaluate on the training pairs)"
    )
    p.add_argument(
        "--learn-epochs",
        type=int,
        default=LEARN_EPOCHS,
        help=f"epochs of the learning phase: the fast preset to convergence (default {LEARN_EPOCHS}; 0 skips it)",
    )
    p.add_argument("--learn-lr", type=float, default=LEARN_LR, help=f"learning rate of the learning phase (default {LEARN_LR:g})")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    """Run ``hlbd-fast demo`` with the options of :func:`add_arguments`; returns the exit status (2: a bad option)."""
    cuda = torch.cuda.is_available()
    baseline_epochs = args.baseline_epochs if args.baseline_epochs is not None else (args.epochs if cuda else min(2, args.epochs))
    try:
        run_demo(
            args.epochs,
            baseline_epochs,
            args.preset,
            args.data,
            args.device,
            args.out,
            args.seed,
            progress=not args.no_progress,
            holdout=args.holdout,
            learn_epochs=args.learn_epochs,
            learn_lr=args.learn_lr,
        )
    except DemoError as e:
        print(f"hlbd-fast demo: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hlbd-fast demo`` on its own (``argv`` without the command name); returns the exit status."""
    p = argparse.ArgumentParser(prog="hlbd-fast demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))
