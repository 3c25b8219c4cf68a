"""The collector's append-only journal: every accepted envelope, durable before it is acked.

Entries are ``<length:u32><crc32:u32><frame>``, the frame being the envelope exactly as it
arrived. The journal is the source of truth: restarting on the same output directory reads
it back to know every seq already accepted, and backends catch up from it.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

STATE_DIR = ".ranklog"
JOURNAL_NAME = "journal.bin"
_HEADER = struct.Struct("<II")


def journal_path(output_dir: str | os.PathLike[str]) -> Path:
    return Path(output_dir) / STATE_DIR / JOURNAL_NAME


class Journal:
    """Append, make durable, read back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.durable_end = self._repair()
        self._file = open(path, "ab", buffering=1 << 20)  # noqa: SIM115 - lives as long as we do
        self.end = self.durable_end

    def _repair(self) -> int:
        """Cut a torn tail left by a crash mid-write; return the end of the last good entry."""
        good = 0
        for _, end, _ in self.read(0):
            good = end
        if self.path.exists() and self.path.stat().st_size != good:
            with open(self.path, "r+b") as f:
                f.truncate(good)
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
        with open(self.path, "r+b") as f:
            f.truncate(self.durable_end)
        self._file = open(self.path, "ab", buffering=1 << 20)  # noqa: SIM115
        self.end = self.durable_end

    def read(self, start: int, stop: int | None = None) -> Iterator[tuple[int, int, bytes]]:
        return read_entries(self.path, start, stop)

    def close(self) -> None:
        try:
            self.sync()
        finally:
            self._file.close()


def read_entries(
    path: Path, start: int, stop: int | None = None
) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(start, end, frame)`` for each intact entry from ``start`` (to ``stop``).

    Read-only: backends follow the journal with it while the collector appends."""
    if not path.exists():
        return
    with open(path, "rb", buffering=1 << 20) as f:
        f.seek(start)
        offset = start
        while stop is None or offset < stop:
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                return
            length, crc = _HEADER.unpack(header)
            frame = f.read(length)
            if len(frame) < length or zlib.crc32(frame) != crc:
                return
            end = offset + _HEADER.size + length
            yield offset, end, frame
            offset = end
