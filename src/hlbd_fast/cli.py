"""``hlbd-fast``: ``demo`` (the main job), ``bench`` (the speed-up plan's table, measured), ``doctor`` (where a step's time goes)."""

from __future__ import annotations

import logging
import sys

import torch

__all__ = ["main", "resolve_device"]

_USAGE = """usage: hlbd-fast {demo,bench,doctor} [options]

  demo     train on the bundled HLBD data: the plain loop versus the fastest preset
  bench    reproduce the speed-up plan's table, every row measured side by side
  doctor   profile a few training steps and say where the time goes

Run 'hlbd-fast COMMAND --help' for a command's options."""


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


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a sub-command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as run
    elif command == "bench":
        from .bench import main as run
    elif command == "doctor":
        from .doctor import main as run
    else:
        print(f"hlbd-fast: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
