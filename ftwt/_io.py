"""Atomic file writes: a crash mid-write leaves the previous file intact, never half of a new one.

Also the output folder's guard: :class:`FolderLock` keeps a second run out of a folder in use.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ftwt import _faults
from ftwt.errors import OutputError

LOCK_NAME = ".lock"


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

    Raises:
        OutputError: the folder or the file cannot be written (permissions, a full disk, a
            file-size limit); the previous file is left as it was.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename; honour the umask as open() does
        with os.fdopen(fd, "wb" if binary else "w") as f:
            if _faults.armed(f"write:{path.name}"):
                _write_with_pause(f, write, binary, f"write:{path.name}")
            else:
                write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        # also on KeyboardInterrupt: never leave a stray temporary file behind
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = _os_error(exc)
        if cause is None:
            raise
        kept = "; the previous file is intact" if path.is_file() else ""
        raise OutputError(f"cannot write {path}: {cause.strerror or cause}{kept}") from exc
    if durable:
        _fsync_dir(path.parent)
    return path


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


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


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to ``path`` in one write (a line of ``metrics.jsonl``).

    Raises:
        OutputError: the file cannot be written.
    """
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc


def check_writable(folder: str | os.PathLike) -> None:
    """Raise :class:`OutputError` unless ``folder`` exists and is writable, or could be created; creates nothing."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"cannot create output folder {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "output folder" if existing == folder else f"folder {existing} (to create {folder} in)"
        raise OutputError(f"{what} is not writable; choose another --out or fix its permissions")


class FolderLock:
    """An exclusive lock on a run folder: ``flock`` on ``folder/.lock``, which holds the owner's pid.

    The kernel drops the lock when its owner exits, however it exits (SIGKILL, power cut
    of a node), so a crashed run never leaves the folder locked. Locks are per open file,
    so a second lock from the same process is refused too. Without ``fcntl`` (Windows)
    folders are not locked.

    Example:
        >>> lock = FolderLock("runs/x")
        >>> lock.acquire()  # raises OutputError while another process holds it
        >>> lock.release()
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def holder(self) -> int | None:
        """The pid of the live process that holds the folder (0 if unknown), or None if it is free; creates nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            return self._holder(fd)
        finally:
            os.close(fd)

    def check_free(self) -> None:
        """Raise :class:`OutputError` if a live process holds the folder."""
        pid = self.holder()
        if pid is not None:
            raise OutputError(_in_use(self.folder, pid))

    def acquire(self) -> None:
        """Take the lock, creating the folder; then remove the temporary files crashed writers left.

        Raises:
            OutputError: another live process holds the folder, or it cannot be written.
        """
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot write output folder {self.folder}: {exc.strerror or exc}") from exc
        pid = self._holder(fd)
        if pid is not None:
            os.close(fd)
            raise OutputError(_in_use(self.folder, pid))
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        st = os.stat(self.folder)
        self._identity = (st.st_dev, st.st_ino)
        for stale in self.folder.glob(".*.tmp"):  # ours now: no live writer owns them
            stale.unlink(missing_ok=True)

    def check(self) -> None:
        """Raise :class:`OutputError` if the folder was removed, moved or replaced since :meth:`acquire`."""
        try:
            st = os.stat(self.folder)
            same = (st.st_dev, st.st_ino) == self._identity
        except OSError:
            same = False
        if self._identity is not None and not same:
            raise OutputError(f"output folder {self.folder} vanished or was replaced during the run; "
                              "the run stopped (restore the folder and resume from its last.pt)")

    def release(self) -> None:
        # the file stays: removing it would let a waiting process lock a file nobody else sees
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
        self._fd, self._identity = None, None

    @staticmethod
    def _holder(fd: int) -> int | None:
        try:
            import fcntl
        except ImportError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        except OSError:  # a file system without locks: run unlocked rather than not at all
            return None
        return None


def _in_use(folder: Path, pid: int) -> str:
    who = f"pid {pid}" if pid else "another process"
    return (f"output folder {folder} is in use by a running ftwt train ({who}); "
            "wait for it to finish or choose another --out")


def _write_with_pause(f: IO[Any], write: Callable[[IO[Any]], None], binary: bool, point: str) -> None:
    """Write half of the content, flush it to the temporary file, pause (see :mod:`ftwt._faults`), write the rest."""
    buf = io.BytesIO() if binary else io.StringIO()
    write(buf)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    _faults.pause(point)
    f.write(data[len(data) // 2:])


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: torch.save reports a failed write as a RuntimeError caused by one."""
    seen = 0
    while exc is not None and seen < 4:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None
