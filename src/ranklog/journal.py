"""The collector's append-only journal: every accepted envelope, durable before it is acked.

Entries are ``<length:u32><crc32:u32><frame>``, the frame being the envelope exactly as it
arrived. They lie in segment files ``<output-dir>/.ranklog/journal/journal-<start>.seg``,
each named by the journal offset of its first byte: a journal position is a byte offset
counted across every segment ever written, so checkpoints stay valid when old segments go.
Beside them lies the collector's de-duplication snapshot (``snapshots.py``):
a restart reads it and only the journal after ``offset``.

A damaged entry (a bad checksum, an impossible length) costs that entry only: readers skip
to the next intact one and report it, once per segment. Only a torn tail at the very end
of the last segment (a crash mid-write) is cut off when the collector opens the journal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ranklog.durable import fsync_directory
from ranklog.snapshots import latest_snapshot
from ranklog.wire import MAX_FRAME_BYTES

STATE_DIR = ".ranklog"
JOURNAL_DIR = "journal"
SPILL_DIR = "spill"  # in STATE_DIR: what ranks could not deliver at exit (``*.spill`` files)
SPILL_SUFFIX = ".spill"
LEGACY_NAME = "journal.bin"  # the single-file journal of earlier versions: the first segment
SEGMENT_BYTES = 64 << 20  # a segment is closed once it holds this much
DEFAULT_RETENTION = 1 << 30  # ``--journal-retention``'s default: 1 GiB
_HEADER = struct.Struct("<II")
_SEGMENT = re.compile(r"journal-(\d{16})\.seg")
_MAP_MARKERS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}  # an envelope is a msgpack map

_log = logging.getLogger(__name__)

Entry = tuple[int, int, bytes]  # (start, end, frame)


def journal_path(output_dir: str | os.PathLike[str]) -> Path:
    """The journal's directory in ``output_dir``."""
    return Path(output_dir) / STATE_DIR / JOURNAL_DIR


def spill_path(output_dir: str | os.PathLike[str]) -> Path:
    """The folder in ``output_dir`` where ranks spill what they could not deliver."""
    return Path(output_dir) / STATE_DIR / SPILL_DIR


def pack_entry(frame: bytes) -> bytes:
    """One entry: ``<length:u32><crc32:u32><frame>`` (the journal's and a spill file's)."""
    return _HEADER.pack(len(frame), zlib.crc32(frame)) + frame


def read_file(path: Path, damage: DamageReport | None = None) -> Iterator[bytes]:
    """The frame of each intact entry of one standalone file of entries (a spill file): a
    torn tail is cut, damaged entries are skipped and reported."""
    report = damage if damage is not None else DamageReport("spill")
    for _, _, frame in _segment_entries(Segment(0, path), 0, None, last=True, damage=report):
        yield frame


@dataclass(frozen=True)
class Segment:
    start: int  # the journal offset of its first byte
    path: Path

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:  # deleted under us: it is no longer needed
            return 0


def segment_path(directory: Path, start: int) -> Path:
    return directory / f"journal-{start:016d}.seg"


def segments(directory: Path) -> list[Segment]:
    """The journal's segments, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), name) for name in names if (m := _SEGMENT.fullmatch(name))]
    return [Segment(start, directory / name) for start, name in sorted(found)]


def first_offset(directory: Path) -> int:
    """Where the oldest journal segment still present starts (0 if there is none)."""
    found = segments(directory)
    return found[0].start if found else 0


class DamageReport:
    """Counts damaged stretches of the journal, and logs the first one in each segment
    (its file and offset) for whoever reads it (``who``)."""

    def __init__(self, who: str = "journal", logger: logging.Logger = _log) -> None:
        self.who = who
        self.logger = logger
        self.count = 0
        self.skipped_bytes = 0
        self._reported: set[Path] = set()

    def __call__(self, segment: Segment, offset: int, skipped: int) -> None:
        self.count += 1
        self.skipped_bytes += skipped
        if segment.path in self._reported:
            return
        self._reported.add(segment.path)
        self.logger.error(
            "%s: damaged journal entry at offset %d (byte %d of %s); skipped %d bytes to the "
            "next intact entry (what was there is lost; further damage in this segment is only "
            "counted)",
            self.who,
            offset,
            offset - segment.start,
            segment.path,
            skipped,
        )


def read_entries(
    directory: Path, start: int, stop: int | None = None, damage: DamageReport | None = None
) -> Iterator[Entry]:
    """Yield ``(start, end, frame)`` for each intact entry from ``start`` (to ``stop``),
    across segments; from the oldest segment present if ``start`` lies before it. Damaged
    entries are skipped and reported to ``damage``.

    Read-only: backends follow the journal with it while the collector appends."""
    found = segments(directory)
    report = damage if damage is not None else DamageReport()
    for index, segment in enumerate(found):
        following = found[index + 1].start if index + 1 < len(found) else None
        if following is not None and following <= start:
            continue
        if stop is not None and segment.start >= stop:
            return
        yield from _segment_entries(
            segment, max(start, segment.start), stop, last=following is None, damage=report
        )


def _segment_entries(
    segment: Segment, start: int, stop: int | None, *, last: bool, damage: DamageReport
) -> Iterator[Entry]:
    try:
        f = open(segment.path, "rb", buffering=1 << 20)  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return
    with f:
        size = os.fstat(f.fileno()).st_size
        limit = size if stop is None else min(size, stop - segment.start)
        position = start - segment.start
        f.seek(position)
        while position < limit:
            entry = _entry_at(f, position, limit)
            if entry is None:
                found = _resync(f, position, limit)
                if found is None and last:
                    return  # a torn or unfinished tail: not damage (yet)
                resumed = limit if found is None else found
                damage(segment, segment.start + position, resumed - position)
                position = resumed
                f.seek(position)
                continue
            end = position + _HEADER.size + len(entry)
            yield segment.start + position, segment.start + end, entry
            position = end


def _entry_at(f: BinaryIO, position: int, limit: int) -> bytes | None:
    """The frame of the intact entry at ``position`` (the file is there), or None."""
    header = f.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    length, crc = _HEADER.unpack(header)
    if not 0 < length <= MAX_FRAME_BYTES or position + _HEADER.size + length > limit:
        return None
    frame = f.read(length)
    if len(frame) < length or zlib.crc32(frame) != crc:
        return None
    return frame


def _resync(f: BinaryIO, position: int, limit: int) -> int | None:
    """The position of the next intact entry after the damaged one at ``position``: a
    plausible header whose checksum matches what follows it."""
    f.seek(position + 1)
    data = f.read(limit - position - 1)
    view = memoryview(data)
    for i in range(len(data) - _HEADER.size):
        length, crc = _HEADER.unpack_from(data, i)
        body = i + _HEADER.size
        if (
            0 < length <= MAX_FRAME_BYTES
            and body + length <= len(data)
            and data[body] in _MAP_MARKERS
            and zlib.crc32(view[body : body + length]) == crc
        ):
            return position + 1 + i
    return None


class Journal:
    """Append, make durable, read back; a new segment once one holds ``segment_bytes``."""

    def __init__(self, path: Path, *, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.path = path  # the journal's directory
        self.segment_bytes = segment_bytes
        path.mkdir(parents=True, exist_ok=True)
        _adopt_legacy(path)
        self.damage = DamageReport("collector")
        found = segments(path)
        self.segment = found[-1] if found else Segment(0, segment_path(path, 0))
        self.durable_end = self._repair()
        self._file = open(self.segment.path, "ab", buffering=1 << 20)  # noqa: SIM115 - lives as long as we do
        self.end = self.durable_end

    def _repair(self) -> int:
        """Cut a torn tail left by a crash mid-write; return the end of the last good entry.
        Only the last segment can have one, and only after the latest snapshot."""
        good = self.segment.start
        snapshot = latest_snapshot(self.path)
        if snapshot is not None and good <= snapshot <= good + self.segment.size():
            good = snapshot
        for _, end, _ in _segment_entries(self.segment, good, None, last=True, damage=self.damage):
            good = end
        if self.segment.path.exists() and self.segment.size() != good - self.segment.start:
            with open(self.segment.path, "r+b") as f:
                f.truncate(good - self.segment.start)
        return good

    def append(self, frame: bytes) -> int:
        """Buffer one entry; return the offset where it ends (its position for backends)."""
        try:
            self._file.write(_HEADER.pack(len(frame), zlib.crc32(frame)))
            self._file.write(frame)
        except OSError:  # the buffer spilled onto a full disk
            self._rollback()
            raise
        self.end += _HEADER.size + len(frame)
        return self.end

    def sync(self) -> None:
        """Write and fsync everything appended. On failure (disk full) the unsynced tail is
        cut off again and the error re-raised: nothing unsynced may be acknowledged."""
        if self.end == self.durable_end:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError:
            self._rollback()
            raise
        self.durable_end = self.end

    def _rollback(self) -> None:
        # The buffered tail that could not be written is exactly what we discard.
        with contextlib.suppress(OSError):
            self._file.close()
        with open(self.segment.path, "r+b") as f:
            f.truncate(self.durable_end - self.segment.start)
        self._file = open(self.segment.path, "ab", buffering=1 << 20)  # noqa: SIM115
        self.end = self.durable_end

    @property
    def full(self) -> bool:
        """The current segment holds ``segment_bytes``: time for :meth:`rotate`."""
        return self.durable_end - self.segment.start >= self.segment_bytes

    def rotate(self) -> None:
        """Start a new segment at the durable end (everything appended must be synced). An
        OSError (a full disk) leaves the journal appending to the current one."""
        assert self.end == self.durable_end, "rotate after sync"
        new = Segment(self.durable_end, segment_path(self.path, self.durable_end))
        opened = open(new.path, "ab", buffering=1 << 20)  # noqa: SIM115 - becomes self._file
        try:
            fsync_directory(self.path)
        except OSError:
            opened.close()
            new.path.unlink(missing_ok=True)
            raise
        with contextlib.suppress(OSError):  # everything in it is synced already
            self._file.close()
        self._file, self.segment = opened, new

    def read(self, start: int, stop: int | None = None) -> Iterator[Entry]:
        return read_entries(self.path, start, stop, self.damage)

    def close(self) -> None:
        try:
            self.sync()
        finally:
            self._file.close()


def _adopt_legacy(directory: Path) -> None:
    """An output directory of an earlier version: its ``journal.bin`` is the first segment."""
    legacy = directory.parent / LEGACY_NAME
    if legacy.exists() and not segments(directory):
        os.replace(legacy, segment_path(directory, 0))
        fsync_directory(directory)
        _log.info("journal %s moved to %s (segments)", legacy, segment_path(directory, 0))


# -- retention ---------------------------------------------------------------------------


def prune(directory: Path, retention: int, keep_from: int) -> list[Segment]:
    """Delete the oldest segments while the journal holds more than ``retention`` bytes,
    never one that ends after ``keep_from`` (what a backend may still read) or after the
    latest snapshot (what a restarting collector reads), nor the last. Returns them."""
    found = segments(directory)
    limit = min(keep_from, latest_snapshot(directory) or 0)
    sizes = [segment.size() for segment in found]
    total = sum(sizes)
    deleted = []
    for segment, following, size in zip(found, found[1:], sizes, strict=False):
        if total <= retention or following.start > limit:
            break
        segment.path.unlink(missing_ok=True)
        total -= size
        deleted.append(segment)
    return deleted
