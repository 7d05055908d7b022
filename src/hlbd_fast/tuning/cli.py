"""``hlbd-fast tune``: :func:`~hlbd_fast.tune` on the reference model or ``--model MODULE:FACTORY``, the report and ``--json``."""

from __future__ import annotations

import argparse
import sys

from .. import factory
from .._io import check_writable_file
from ..cli import resolve_device
from . import search
from .search import TuneError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``hlbd-fast tune`` to ``p``."""
    p.add_argument("--model", default=None, help="module:factory returning a model or (model, data); default: the reference model on the HLBD data")
    p.add_argument("--data", default=None, help="an HLBD file for a model without its own data (default: the bundled 600 pairs)")
    p.add_argument("--budget", type=float, default=120.0, help="seconds for the whole search; it ends whole rounds only (default 120)")
    p.add_argument("--batch-size", type=int, default=32, help="micro-batch size of every configuration (default 32)")
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate of every configuration (default 5e-5)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="the sample order of every configuration (default 0)")
    p.add_argument(
        "--accept",
        default="exact,rounding,precision,random stream",
        help="the verdicts the choice may have, comma-separated (default: all but refused); e.g. exact,rounding",
    )
    p.add_argument("--json", default=None, help="also write the report as JSON to this file (checked before anything trains)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _parser() -> argparse.ArgumentParser:
    """The parser of ``hlbd-fast tune`` on its own (:func:`main`)."""
    p = argparse.ArgumentParser(
        prog="hlbd-fast tune", description="Measure the strategies on your model and choose the fastest that computes what the plain loop computes."
    )
    add_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    """``hlbd-fast tune``; returns the exit status: 0, 2 for a bad option, model, data or budget, 1 for another failure.

    The factory (:mod:`hlbd_fast.factory`) is called without arguments and returns a model
    (trained on the HLBD pairs of ``--data``, encoded for its vocabulary) or a
    ``(model, data)`` pair of ``(src, tgt)`` tensors.
    """
    try:
        if args.json is not None:
            check_writable_file(args.json, "--json")  # before minutes of measuring, not after
        device = resolve_device(args.device)
        model, data = factory.load(args.model, args.data) if args.model else factory.reference(data=args.data)
        accept = tuple(v.strip() for v in args.accept.split(",") if v.strip())
        report = search.tune(
            model,
            data,
            device=device,
            batch_size=args.batch_size,
            lr=args.lr,
            budget_s=args.budget,
            seed=args.seed,
            accept=accept,
            progress=not args.no_progress,
        )
    except (TuneError, factory.FactoryError, ValueError) as e:
        print(f"hlbd-fast tune: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line for the user, not a traceback
        print(f"hlbd-fast tune: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(report)
    if args.json:
        report.save(args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hlbd-fast tune`` on its own (``argv`` without the command name); returns the exit status (see :func:`run`)."""
    return run(_parser().parse_args(argv))
