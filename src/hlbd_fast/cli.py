"""``hlbd-fast``: ``demo`` (the main job), ``bench`` (the speed-up plan's table, measured), ``doctor`` (where a step's time goes), ``tune`` (the fastest exact configuration for your model).

One :class:`argparse.ArgumentParser` with a sub-parser per command; each command's module
adds its options (``add_arguments(parser)``) and runs on the parsed namespace
(``run(args)``). ``python -m hlbd_fast`` is the same command.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

import torch

__all__ = ["build_parser", "main", "resolve_device"]

#: The commands: name -> one line of help (also the command's description).
COMMANDS: dict[str, str] = {
    "demo": "train on the bundled HLBD data: the plain loop versus the fastest preset",
    "bench": "reproduce the speed-up plan's table, every row measured side by side",
    "doctor": "profile a few training steps and say where the time goes",
    "tune": "measure the strategies on your model and choose the fastest that computes what the plain loop computes",
}


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The ``--device`` of a command: cuda when available by default; a ValueError says what is wrong."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device name; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return dev


def _command_modules() -> dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]]:
    """``name -> (add_arguments, run)`` of each command (imported here: the modules import this one)."""
    from . import bench, demo, doctor, tuning

    return {
        "demo": (demo.add_arguments, demo.run),
        "bench": (bench.add_arguments, bench.run),
        "doctor": (doctor.add_arguments, doctor.run),
        "tune": (tuning.add_arguments, tuning.run),
    }


def _build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``hlbd-fast`` parser and its sub-parsers by command name."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="hlbd-fast",
        description="Fast PyTorch seq2seq training loops that compute what the plain loop computes.",
        epilog="Run 'hlbd-fast COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"hlbd-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    commands: dict[str, argparse.ArgumentParser] = {}
    for name, (add_arguments, run) in _command_modules().items():
        commands[name] = sub.add_parser(name, help=COMMANDS[name], description=COMMANDS[name])
        add_arguments(commands[name])
        commands[name].set_defaults(run=run)
    return parser, commands


def build_parser() -> argparse.ArgumentParser:
    """The ``hlbd-fast`` parser: ``--version`` and one sub-parser per command, whose ``run`` is in ``args.run``."""
    return _build()[0]


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; returns its exit status.

    Usage errors (no command, an unknown command or option) print the usage to stderr
    and raise ``SystemExit(2)``; ``--help`` and ``--version`` raise ``SystemExit(0)``.
    """
    parser, commands = _build()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # with the command's usage, not the top-level one
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return args.run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
