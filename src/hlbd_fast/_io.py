"""Files and signals: atomic writes (a reader sees the old file or the new one), writable-path probes, Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

__all__ = ["atomic_write", "check_writable_dir", "check_writable_file", "check_checkpoint_files", "ctrl_c_requests_stop"]

_TMP_MARK = ".tmp-"


def _temp_name(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}{_TMP_MARK}{pid}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or a platform without signals: leave its file alone
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries of ``path`` left by writers that died (a SIGKILL during a save)."""
    prefix = f".{path.name}{_TMP_MARK}"
    with contextlib.suppress(OSError):
        for other in path.parent.iterdir():
            if not other.name.startswith(prefix):
                continue
            pid = other.name[len(prefix) :]
            if pid.isdigit() and not _pid_alive(int(pid)):
                with contextlib.suppress(OSError):
                    other.unlink()


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through ``write(file)`` into a temporary beside it, fsync, then rename over it.

    A failure (an exception, Ctrl-C) removes the temporary and leaves an existing ``path``
    untouched; temporaries of earlier writers that were killed are removed first.
    Returns ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    if path.is_dir():  # os.replace would fail only after the whole write, with a bare IsADirectoryError
        raise IsADirectoryError(f"cannot write {str(path)!r}: it is a directory; give a file path (or move the directory away)")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = _temp_name(path, os.getpid())
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


def check_writable_dir(path: str | os.PathLike[str], what: str) -> Path:
    """Create directory ``path`` (and parents) and probe that files can be written in it.

    Raises:
        ValueError: naming ``what`` and the path, when it cannot be created or written.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{what} {str(path)!r} cannot be written ({e.strerror or e}); choose a writable directory") from None
    return path


def check_writable_file(path: str | os.PathLike[str], what: str) -> Path:
    """Check that file ``path`` can be written (its directory is created), without leaving a file behind.

    Raises:
        ValueError: naming ``what`` and the path, when it cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory; give a file name")
    check_writable_dir(path.parent, f"the directory of {what}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {str(path)!r} exists and is read-only; choose another path")
    return path


def _kind(path: Path) -> str:
    if path.is_dir():
        return "a directory" + (" (through a symbolic link)" if path.is_symlink() else "")
    return "not a regular file (a device, pipe or socket)"


def check_checkpoint_files(directory: str | os.PathLike[str], names: Sequence[str], what: str = "checkpoint_dir") -> Path:
    """Refuse when one of the checkpoint files ``names`` inside ``directory`` exists and is not a regular file.

    Run before training: a directory named ``last.pt`` passes :func:`check_writable_dir`'s probe,
    and writing the checkpoint over it would fail only after the first epoch has trained.
    Missing files are fine (they are written later); so is a symbolic link to a regular file.
    Returns ``directory`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: naming ``what``, the offending path and the fix.
    """
    directory = Path(directory)
    for name in names:
        path = directory / name
        if path.exists() and not path.is_file():
            raise ValueError(
                f"{what} {str(directory)!r} holds {str(path)!r}, which is {_kind(path)}: the checkpoint file {name} "
                f"is written there. Move or remove it, or choose another {what}"
            )
    return directory


@contextlib.contextmanager
def ctrl_c_requests_stop(trainer: Any) -> Iterator[None]:
    """While training with a checkpoint: Ctrl-C finishes the step, writes a checkpoint, then raises KeyboardInterrupt.

    A second Ctrl-C stops at once. Only in the main thread (signals go there); without a
    checkpoint path Ctrl-C keeps its usual meaning.
    """
    if trainer.checkpoint_path is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupted = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal interrupted
        if interrupted:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        interrupted = True
        trainer.request_stop()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt(f"training interrupted; checkpoint written to {trainer.checkpoint_path}")
