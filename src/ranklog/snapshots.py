"""The collector's de-duplication snapshot files, beside the journal's segments
(``snapshot-<offset>.msgpack``): a restart reads the newest and only the journal after
``offset``; the journal never cuts a torn tail back below it, nor deletes a segment after
it."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ranklog.durable import write_durably

_SNAPSHOT = re.compile(r"snapshot-(\d{16})\.msgpack")


def snapshots(directory: Path) -> list[tuple[int, Path]]:
    """``(offset, path)`` of each snapshot file, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), name) for name in names if (m := _SNAPSHOT.fullmatch(name))]
    return [(offset, directory / name) for offset, name in sorted(found)]


def latest_snapshot(directory: Path) -> int | None:
    """The journal offset the newest snapshot is valid to (None: there is none)."""
    found = snapshots(directory)
    return found[-1][0] if found else None


def snapshot_path(directory: Path, offset: int) -> Path:
    return directory / f"snapshot-{offset:016d}.msgpack"


def write_snapshot(directory: Path, offset: int, payload: bytes) -> None:
    """Save the snapshot valid to ``offset`` durably, then drop the older ones."""
    write_durably(snapshot_path(directory, offset), payload)
    for older, older_path in snapshots(directory):
        if older != offset:
            older_path.unlink(missing_ok=True)
