"""The journal on disk: segments, global offsets, damage, retention, the legacy file."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import msgpack
import pytest

from ranklog.journal import (
    DamageReport,
    Journal,
    first_offset,
    journal_path,
    prune,
    read_entries,
    segments,
)
from ranklog.snapshots import write_snapshot


def frame(n: int, pad: int = 100) -> bytes:
    return msgpack.packb({"n": n, "pad": "x" * pad})  # type: ignore[no-any-return]


def filled(directory: Path, count: int, *, segment_bytes: int = 1000) -> Journal:
    journal = Journal(directory, segment_bytes=segment_bytes)
    for n in range(count):
        journal.append(frame(n))
        journal.sync()
        if journal.full:
            journal.rotate()
    return journal


def numbers(directory: Path, start: int = 0, damage: DamageReport | None = None) -> list[int]:
    return [msgpack.unpackb(f)["n"] for _, _, f in read_entries(directory, start, None, damage)]


class TestSegments:
    """Positions are byte offsets across segments; each segment is named by its start."""

    def test_rotation_keeps_offsets_global(self, tmp_path: Path) -> None:
        journal = filled(tmp_path, 40)
        found = segments(tmp_path)
        assert len(found) > 3
        assert [s.start for s in found[1:]] == [s.start + s.size() for s in found[:-1]]
        entries = list(journal.read(0))
        assert [msgpack.unpackb(f)["n"] for _, _, f in entries] == list(range(40))
        assert all(a[1] == b[0] for a, b in itertools.pairwise(entries))
        middle = entries[25][0]
        assert numbers(tmp_path, middle) == list(range(25, 40))
        assert journal.durable_end == entries[-1][1]
        journal.close()

    def test_reopening_appends_to_the_last_segment(self, tmp_path: Path) -> None:
        filled(tmp_path, 20).close()
        journal = Journal(tmp_path, segment_bytes=1000)
        journal.append(frame(20))
        journal.sync()
        journal.close()
        assert numbers(tmp_path) == list(range(21))

    def test_a_legacy_journal_bin_becomes_the_first_segment(self, tmp_path: Path) -> None:
        out = tmp_path / "out"
        filled(tmp_path / "old", 5, segment_bytes=1 << 20).close()
        (old,) = segments(tmp_path / "old")
        journal_path(out).parent.mkdir(parents=True)
        old.path.rename(journal_path(out).parent / "journal.bin")
        journal = Journal(journal_path(out))
        journal.close()
        assert numbers(journal_path(out)) == list(range(5))
        assert not (journal_path(out).parent / "journal.bin").exists()


class TestDamage:
    """A damaged entry costs that entry only; a torn tail of the last segment is cut."""

    def test_a_flipped_byte_skips_one_entry_and_is_reported_with_its_offset(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        filled(tmp_path, 40).close()
        entries = list(read_entries(tmp_path, 0))
        start, end, _ = entries[12]
        segment = next(s for s in segments(tmp_path) if s.start <= start < s.start + s.size())
        data = bytearray(segment.path.read_bytes())
        data[(start + end) // 2 - segment.start] ^= 0xFF
        segment.path.write_bytes(bytes(data))
        report = DamageReport("test")
        with caplog.at_level(logging.ERROR):
            assert numbers(tmp_path, 0, report) == [n for n in range(40) if n != 12]
        assert report.count == 1 and report.skipped_bytes == end - start
        assert f"offset {start}" in caplog.text and segment.path.name in caplog.text
        # The collector opening it keeps everything after the damage.
        Journal(tmp_path, segment_bytes=1000).close()
        assert numbers(tmp_path) == [n for n in range(40) if n != 12]

    def test_damage_in_the_last_segment_keeps_later_entries(self, tmp_path: Path) -> None:
        filled(tmp_path, 5, segment_bytes=1 << 20).close()
        (segment,) = segments(tmp_path)
        data = bytearray(segment.path.read_bytes())
        data[3] ^= 0xFF  # the first entry's length
        segment.path.write_bytes(bytes(data))
        journal = Journal(tmp_path)
        assert journal.damage.count == 1
        journal.close()
        assert numbers(tmp_path) == [1, 2, 3, 4]

    def test_a_torn_tail_is_cut(self, tmp_path: Path) -> None:
        filled(tmp_path, 5, segment_bytes=1 << 20).close()
        (segment,) = segments(tmp_path)
        with open(segment.path, "ab") as f:
            f.write(b"\x40\x00\x00\x00\x01\x02")  # half a header and no frame
        size = segment.size()
        journal = Journal(tmp_path)
        journal.append(frame(5))
        journal.close()
        assert segment.size() < size + len(frame(5)) + 8
        assert numbers(tmp_path) == list(range(6))


class TestRetention:
    """Only segments every backend read and the snapshot covers go, oldest first."""

    def test_prune_keeps_what_backends_or_the_snapshot_need(self, tmp_path: Path) -> None:
        journal = filled(tmp_path, 60)
        found = segments(tmp_path)
        assert prune(tmp_path, 0, journal.durable_end) == []  # no snapshot yet
        write_snapshot(tmp_path, found[4].start, b"")
        deleted = prune(tmp_path, 0, found[2].start)
        assert [s.start for s in deleted] == [found[0].start, found[1].start]
        deleted = prune(tmp_path, 0, journal.durable_end)
        assert [s.start for s in deleted] == [found[2].start, found[3].start]
        assert first_offset(tmp_path) == found[4].start
        journal.close()

    def test_prune_stops_once_under_retention(self, tmp_path: Path) -> None:
        journal = filled(tmp_path, 60)
        write_snapshot(tmp_path, journal.durable_end, b"")
        total = sum(s.size() for s in segments(tmp_path))
        prune(tmp_path, total - 1500, journal.durable_end)
        left = sum(s.size() for s in segments(tmp_path))
        assert total - 1500 - 1100 < left <= total - 1500
        journal.close()

    def test_reading_before_the_first_segment_starts_there(self, tmp_path: Path) -> None:
        journal = filled(tmp_path, 30)
        write_snapshot(tmp_path, journal.durable_end, b"")
        prune(tmp_path, 0, journal.durable_end)
        first = first_offset(tmp_path)
        assert first > 0
        assert numbers(tmp_path, 0) == numbers(tmp_path, first)
        journal.close()
