"""What a rank could not deliver at exit, kept in a file a collector ingests later.

A spill file holds envelopes exactly as the rank would have sent them, in the journal's
entry framing (``<length:u32><crc32:u32><envelope>``, :func:`ranklog.journal.pack_entry`):
one file per rank incarnation, ``<run>-rank<rank>-<incarnation>.spill``. The rank appends
whole entries and fsyncs them; a ``kill -9`` mid-write leaves a torn tail, which the reader
cuts. While the rank lives it holds an exclusive ``flock`` on the file, so a collector never
ingests (and deletes) a file that is still being written; the kernel releases it when the
process dies, however it dies.

Where it goes (:func:`spill_folders`): ``spill_dir`` (``setup_metric_logger`` passes the
output dir's ``.ranklog/spill``, see :func:`ranklog.journal.spill_path`) if that folder
exists or its parent does, that is, when a collector's state folder is reachable from this
node; otherwise ``$XDG_STATE_HOME/ranklog/spill`` (default ``~/.local/state/ranklog/spill``).
A collector ingests ``<output-dir>/.ranklog/spill/*.spill`` when it starts and while it
runs, and so does ``ranklog replay``; a file in the local folder is moved there by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

from ranklog.durable import fsync_directory
from ranklog.journal import SPILL_SUFFIX, pack_entry
from ranklog.rank.identity import RankIdentity
from ranklog.rank.outbox import Item, Pending

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_WAIT_FOR_DEVICE_VALUES = 1.0  # seconds a record may wait for its CUDA values to arrive


def local_spill_dir() -> Path:
    """This machine's spill folder: ``$XDG_STATE_HOME/ranklog/spill``, by default
    ``~/.local/state/ranklog/spill``."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(state, "ranklog", "spill")


def spill_folders(spill_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Where to try to spill, in order (see the module's docstring)."""
    folders = []
    if spill_dir is not None:
        wanted = Path(spill_dir)
        if wanted.is_dir() or wanted.parent.is_dir():
            folders.append(wanted)
    folders.append(local_spill_dir())
    return folders


def spill_name(identity: RankIdentity) -> str:
    job = _UNSAFE.sub("_", identity.run_id)[:64]
    return f"{job}-rank{identity.rank}-{identity.incarnation}{SPILL_SUFFIX}"


class SpillFile:
    """One incarnation's spill file, locked while open. :meth:`add` appends the records it
    does not hold yet; :meth:`delete` removes it (everything was delivered after all);
    :meth:`close` leaves it for a collector."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._held: set[int] = set()

    @classmethod
    def create(cls, folders: list[Path], name: str) -> SpillFile:
        """Create and lock the file in the first folder that takes it; OSError if none."""
        error: OSError | None = None
        for folder in folders:
            try:
                # The output dir's folder only where its state folder exists already.
                folder.mkdir(parents=folder == local_spill_dir(), exist_ok=True)
                # Locked before it has its name: a collector must never see it unlocked.
                temporary = folder / f".{name}.tmp"
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    os.replace(temporary, folder / name)
                    fsync_directory(folder)
                except OSError:
                    os.close(fd)
                    raise
                return cls(folder / name, fd)
            except OSError as exc:
                error = exc
        assert error is not None
        raise error

    def __len__(self) -> int:
        return len(self._held)

    def add(self, items: Iterable[Item]) -> int:
        """Append, as whole entries, and fsync the records not in the file yet (a record
        still waiting for its CUDA values gets a moment); returns how many it holds."""
        fresh: list[tuple[int, bytes]] = []
        waiting: list[tuple[int, Pending]] = []
        for seq, data in items:
            if seq in self._held:
                continue
            if isinstance(data, bytes):
                fresh.append((seq, data))
            else:
                waiting.append((seq, data))
        deadline = time.monotonic() + _WAIT_FOR_DEVICE_VALUES
        while waiting:
            still = []
            for seq, pending in waiting:
                ready = pending.result()
                if ready is None:
                    still.append((seq, pending))
                else:
                    fresh.append((seq, ready))
            waiting = still
            if not waiting or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if fresh:
            entries = memoryview(b"".join(pack_entry(frame) for _, frame in fresh))
            while entries:
                entries = entries[os.write(self._fd, entries) :]
            os.fsync(self._fd)
            self._held.update(seq for seq, _ in fresh)
        return len(self._held)

    def delete(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def spill_to(
    spill: SpillFile | None, folders: list[Path], name: str, items: list[Item]
) -> tuple[SpillFile, tuple[Path, OSError] | None]:
    """Add ``items`` to ``spill``, or to a new file in the first of ``folders`` that takes
    them whole. A folder that cannot (a full disk) gives way to the next, whose file gets
    every item (the partial one is deleted). Returns the file, and the first folder that
    failed with its error (None if none did); raises that OSError if every one failed."""
    failed: tuple[Path, OSError] | None = None
    if spill is not None:
        try:
            spill.add(items)
            return spill, None
        except OSError as exc:
            failed = (spill.path.parent, exc)
            spill.delete()
            folders = [folder for folder in folders if folder != spill.path.parent]
    for folder in folders:
        try:
            spill = SpillFile.create([folder], name)
        except OSError as exc:
            failed = failed or (folder, exc)
            continue
        try:
            spill.add(items)
            return spill, failed
        except OSError as exc:
            failed = failed or (folder, exc)
            spill.delete()
    assert failed is not None
    raise failed[1]
