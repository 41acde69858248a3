"""Atomic file writes shared by checkpoints, manifests, indexes and reports.

A reader (or a resumed run) sees either the old or the new content of a file, never a torn one: the text is
written to a temporary file in the same folder (named after this process, so concurrent writers do not
collide), flushed to disk, and renamed over the target.
"""

from __future__ import annotations

import os
from pathlib import Path

TMP_PREFIX = ".tmp-"


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
