"""Files written so that a power cut cannot undo them: a directory's entries made durable,
and a file replaced atomically (the journal, the snapshots, the backends' checkpoints and
the ranks' spill files use them)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make ``directory``'s entries (a file created, renamed or deleted) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically, fsynced (the rename too, so that a power
    loss cannot undo it). An OSError (a full disk) reaches the caller."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)
