"""Ingesting what ranks spilled at exit (``<output-dir>/.ranklog/spill/*.spill``).

Each file holds envelopes in the journal's entry framing (see :mod:`ranklog.rank.spill`).
They go through the receive step like any frame from a socket, so what the collector
accepted before (live, or from an earlier ingest) is dropped as a duplicate; the rest is
journaled and fsynced; only then is the file deleted. A crash between the two leaves the
file, and the next ingest finds every record a duplicate: exactly once.

A file whose rank is still alive is locked (``flock``) by it and skipped until the rank
lets go of it (it deletes the file once everything was delivered after all).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ranklog.collector.receive import receive
from ranklog.collector.store import Store
from ranklog.durable import fsync_directory
from ranklog.journal import SPILL_SUFFIX, DamageReport, read_file, spill_path

_log = logging.getLogger(__name__)
_CHUNK = 4096  # frames per receive step, journal append and fsync


def ingest_spills(store: Store, now: float, *, wait: float = 0.0) -> int:
    """Ingest every unlocked spill file of the store's output dir; the records accepted.

    ``wait``: for up to that many seconds, look again at files still locked. At exit this
    takes in what the job's last ranks spilled: a rank whose goodbye said it spilled
    records lets go of its file as it exits, a moment after the goodbye."""
    folder = spill_path(store.settings.output_path)
    with contextlib.suppress(OSError):  # there for a file moved in by hand (the README's steps)
        folder.mkdir(exist_ok=True)
    deadline = time.monotonic() + wait
    total = 0
    while True:
        try:
            names = sorted(name for name in os.listdir(folder) if name.endswith(SPILL_SUFFIX))
        except OSError:  # no folder: nothing spilled
            return total
        left = 0
        for name in names:
            accepted = _ingest_locked(store, folder / name, now)
            if accepted is None:
                left += 1
            else:
                total += accepted
        if not left or time.monotonic() >= deadline:
            return total
        time.sleep(0.1)


def _ingest_locked(store: Store, path: Path, now: float) -> int | None:
    """Ingest ``path`` if no rank holds it; the records accepted (None: not now)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # deleted meanwhile: its rank delivered everything after all
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # its rank is alive and still delivering
        if not path.exists():
            return None
        accepted = _ingest(store, path, now)
        if accepted is not None:
            path.unlink()
            with contextlib.suppress(OSError):
                fsync_directory(path.parent)
        return accepted
    finally:
        os.close(fd)


def _ingest(store: Store, path: Path, now: float) -> int | None:
    accepted = 0
    before = store.stats.duplicates
    # A spilled incarnation is no rank of the job served now unless it was heard in this
    # run: ingesting it must not change when that job is done.
    live = {id(peer): peer.live for peer in store.ranks}
    damage = DamageReport(f"spill file {path.name}", _log)
    try:
        for chunk in _chunks(read_file(path, damage)):
            received = receive([(b"", chunk)], store.ranks, store.stats, now)
            if not store.commit(received, now):
                _log.warning("spill %s: the journal cannot take it now; trying later", path)
                return None
            accepted += received.records
    finally:
        for peer in store.ranks:
            peer.live = live.get(id(peer), False)
    _log.info(
        "ingested spill %s: %d records accepted, %d already accepted before",
        path,
        accepted,
        store.stats.duplicates - before,
    )
    return accepted


def _chunks(frames: Iterator[bytes]) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    for frame in frames:
        chunk.append(frame)
        if len(chunk) >= _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
