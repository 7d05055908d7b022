"""``hlbd-fast doctor``: its options, the reference model or a ``--model module:factory``, the report and ``--json``."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any

import torch
from torch import nn

from .._validation import infer_vocab_size
from .report import Diagnosis, DoctorError


def _package() -> Any:
    """The package ``hlbd_fast.doctor``: :func:`run` calls ``diagnose`` and ``_reference`` through it, at call time.

    So replacing them there (the tests' guards that nothing trains before the options are
    checked do) takes effect, as it did when the doctor was one module.
    """
    return sys.modules[__package__]


def _reference(device: torch.device, vocab_size: int | None = None, model: nn.Module | None = None) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The bundled HLBD pairs, encoded, and (unless given) the reference model."""
    from ..data import CharTokenizer, encode_pairs, load_hlbd
    from ..models import Seq2SeqTransformer

    pairs = load_hlbd()
    vocab = 5000 if vocab_size is None else vocab_size
    try:
        tokenizer = CharTokenizer.from_pairs(pairs, vocab_size=vocab)
    except ValueError as e:
        raise DoctorError(f"the model's vocabulary ({vocab}) is too small for the bundled HLBD data: {e}; return (model, data) from the factory") from None
    max_length = getattr(model, "max_length", 64) if model is not None else 64
    data = encode_pairs(pairs, tokenizer, max_length=int(max_length) if isinstance(max_length, int) else 64)
    if model is None:
        torch.manual_seed(0)
        model = Seq2SeqTransformer(vocab_size=tokenizer.vocab_size)
    return model, data


def _load_factory(spec: str, device: torch.device) -> tuple[nn.Module, Any]:
    if ":" not in spec:
        raise DoctorError(f"--model {spec!r} must be 'module:factory', e.g. --model mypkg.models:make_model")
    mod_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: a module in the current folder is found
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise DoctorError(f"--model {spec}: cannot import {mod_name!r} ({e}); run from its folder or install it") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise DoctorError(f"--model {spec}: {mod_name} has no callable {attr!r}")
    made = factory()
    if isinstance(made, nn.Module):
        return _package()._reference(device, infer_vocab_size(made), made)
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        return made[0], made[1]
    raise DoctorError(f"--model {spec}: the factory returned {type(made).__name__}; return a model or a (model, data) pair")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``hlbd-fast doctor`` to ``p``."""
    p.add_argument("--model", default=None, help="module:factory returning a model or (model, data); default: the reference model on the bundled HLBD data")
    p.add_argument("--steps", type=int, default=10, help="steps of the clean and timed passes (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch size (default 32, or the preset's)")
    p.add_argument("--preset", default=None, help="diagnose with a preset's strategies, e.g. baseline")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", default=None, help="also write the diagnosis as JSON to this file (checked before training)")


def _parser() -> argparse.ArgumentParser:
    """The parser of ``hlbd-fast doctor`` on its own (:func:`main`)."""
    p = argparse.ArgumentParser(prog="hlbd-fast doctor", description="Profile a few training steps and say where the time goes.")
    add_arguments(p)
    return p


def _check_options(args: argparse.Namespace) -> torch.device:
    """The device; every option that can be checked without training is checked here (DoctorError)."""
    from .._io import check_writable_file
    from ..cli import resolve_device

    try:
        if args.json is not None:
            check_writable_file(args.json, "--json")  # before minutes of diagnosis, not after
        device = resolve_device(args.device)
    except ValueError as e:
        raise DoctorError(str(e)) from None
    if args.preset is not None:
        from ..presets import PRESETS

        if args.preset not in PRESETS:
            raise DoctorError(f"--preset {args.preset!r} is unknown; choose one of {', '.join(sorted(PRESETS))}")
    return device


def _write_json(path: str, diag: Diagnosis) -> None:
    from .._io import atomic_write

    text = json.dumps(diag.to_dict(), indent=2, default=str)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def run(args: argparse.Namespace) -> int:
    """``hlbd-fast doctor``: diagnose the reference model or ``--model module:factory``; returns the exit status.

    The factory is called without arguments and returns a model (trained on the bundled
    HLBD pairs, encoded for its vocabulary) or a ``(model, data)`` pair, ``data`` as
    :meth:`FastTrainer.fit` takes it. An unwritable ``--json`` path is refused (status 2)
    before anything trains. ``args`` holds the options of :func:`add_arguments`.
    """
    try:
        device = _check_options(args)
        doctor = _package()
        model, data = _load_factory(args.model, device) if args.model else doctor._reference(device)
        diag = doctor.diagnose(model, data, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, device=device, preset=args.preset)
    except DoctorError as e:
        print(f"hlbd-fast doctor: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line for the user, not a traceback
        print(f"hlbd-fast doctor: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(diag)
    if args.json:
        _write_json(args.json, diag)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hlbd-fast doctor`` on its own (``argv`` without the command name); returns the exit status (see :func:`run`)."""
    return run(_parser().parse_args(argv))
