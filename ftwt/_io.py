"""Atomic file writes: a crash mid-write leaves the previous file intact, never half of a new one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None], *, binary: bool = True,
                 durable: bool = False) -> Path:
    """Write ``path`` by calling ``write(file)`` on a temporary file in the same folder, then renaming it.

    Args:
        path: destination; its parent folders are created.
        write: writes the content to the open file it is given.
        binary: open the temporary file in binary mode (else text).
        durable: fsync the data and the folder, so that the rename survives a power cut.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # also on KeyboardInterrupt: never leave a stray temporary file behind
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a string."""
    return atomic_write(path, lambda f: f.write(text), binary=False)


def _fsync_dir(folder: Path) -> None:
    # Persists the rename itself; not possible on every platform, hence best effort.
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
