"""``hlbd-fast doctor``: its options, the reference model or a ``--model module:factory``, the report and ``--json``."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .. import factory
from . import passes
from .report import Diagnosis, DoctorError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``hlbd-fast doctor`` to ``p``."""
    p.add_argument("--model", default=None, help="module:factory returning a model or (model, data); default: the reference model on the bundled HLBD data")
    p.add_argument("--data", default=None, help="an HLBD file for a model without its own data (default: the bundled 600 pairs)")
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

    The factory (:mod:`hlbd_fast.factory`) is called without arguments and returns a model
    (trained on the HLBD pairs of ``--data``, default the bundled ones, encoded for its
    vocabulary) or a ``(model, data)`` pair, ``data`` as :meth:`FastTrainer.fit` takes it. An unwritable ``--json`` path is refused (status 2)
    before anything trains. ``args`` holds the options of :func:`add_arguments`.
    """
    try:
        device = _check_options(args)
        model, data = factory.load(args.model, args.data) if args.model else factory.reference(data=args.data)
        diag = passes.diagnose(model, data, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, device=device, preset=args.preset)
    except (DoctorError, factory.FactoryError) as e:
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
