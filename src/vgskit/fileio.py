"""Atomic file writes, folder locks and checksums shared by checkpoints, manifests, indexes and reports.

A reader (or a resumed run) sees either the old or the new content of a file, never a torn one: the text is
written to a temporary file in the same folder (named after this process, so concurrent writers do not
collide), flushed to disk, and renamed over the target.

A :class:`FolderLock` keeps two processes from writing into one folder at once (two trainings on one run
folder interleave their logs and delete each other's temporary checkpoints). It is an advisory
``fcntl.flock`` on a lock file, so the operating system releases it when its holder dies, even by ``kill -9``:
a lock file left behind by a dead process never blocks anyone.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from vgskit.errors import ConfigError, VGSKitError

try:  # POSIX; elsewhere folders are not locked (see FolderLock)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TMP_PREFIX = ".tmp-"
LOCK_FILE = ".lock"


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    """A per-process temporary name beside ``path``."""
    return path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` atomically; returns ``path``."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (files can be larger than memory is spare)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def check_output_folder(path: str | Path, what: str = "output folder") -> Path:
    """Refuse an output folder that cannot be one (an existing file), before any work is spent on it.

    ``what`` names the setting in the message (``--out``, ``train.out_dir``). Returns the path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path}: is a file, not a folder (choose a folder to write into)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{what} {path}: {parent} is a file, not a folder")
            break
    return path


class FolderInUseError(VGSKitError, RuntimeError):
    """Another live process holds the lock of a folder this process was about to write into."""


class FolderLock:
    """An exclusive advisory lock on ``<folder>/.lock`` holding its owner's pid, host and start time.

    Why ``flock`` and not a pid file alone: the kernel drops the lock when the holding process dies, so a
    crashed or killed holder never needs cleaning up, and a pid file could not tell a live holder from a
    reused pid. The lock file itself is left in place (deleting it would let a third process lock a new
    file while a second still waits on the old one). On systems without ``fcntl`` the lock is a no-op.
    """

    def __init__(self, folder: str | Path, what: str = "folder"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def holder(self) -> str:
        """Who holds (or last held) the lock, as the lock file records it."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return f"pid {int(info['pid'])} on host {info['host']}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not yet recorded its pid"

    def acquire(self) -> FolderLock:
        """Take the lock or raise :class:`FolderInUseError` naming the holder; never waits."""
        if fcntl is None or self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        # No O_TRUNC: the file may hold the live owner's pid, which the refusal below reports.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUseError(
                f"{self.what} {self.folder} is in use by another process ({self.holder()}); wait for it to "
                f"end or write into another folder (lock file {self.path})") from None
        except BaseException:
            os.close(fd)
            raise
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases it); safe to call twice."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)  # type: ignore[union-attr]
            finally:
                os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
