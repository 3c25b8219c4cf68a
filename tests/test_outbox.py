"""The rank's bounded buffer: drop-oldest, acks, resends."""

from __future__ import annotations

import time

from ranklog.rank.outbox import Outbox


class TestBounds:
    """Full means the oldest record goes, counted."""

    def test_drops_oldest_by_count(self) -> None:
        box = Outbox(max_records=3, max_bytes=1 << 20)
        for seq in range(1, 6):
            box.put(seq, b"x")
        assert box.dropped == 2 and box.pending() == 3 and box.base() == 3
        assert [seq for seq, _ in box.take(10, 1 << 20)] == [3, 4, 5]

    def test_drops_oldest_by_bytes(self) -> None:
        box = Outbox(max_records=100, max_bytes=10)
        for seq in range(1, 4):
            box.put(seq, b"12345")
        assert box.dropped == 1 and box.base() == 2

    def test_in_flight_records_are_evicted_first(self) -> None:
        box = Outbox(max_records=2, max_bytes=1 << 20)
        box.put(1, b"a")
        box.take(1, 1 << 20)
        box.put(2, b"b")
        box.put(3, b"c")
        assert box.base() == 2 and box.dropped == 1


class TestAcks:
    """Acknowledged records are forgotten; stale ones come back for resending."""

    def test_ack_releases_prefix(self) -> None:
        box = Outbox(10, 1 << 20)
        for seq in range(1, 5):
            box.put(seq, b"x")
        box.take(10, 1 << 20)
        box.ack(2)
        assert box.pending() == 2 and box.base() == 3
        box.ack(4)
        assert box.pending() == 0 and box.base() == 5

    def test_requeue_after_ack_timeout(self) -> None:
        box = Outbox(10, 1 << 20)
        box.put(1, b"x")
        box.put(2, b"y")
        box.take(10, 1 << 20)
        assert box.requeue(stale_after=60.0) == 0
        time.sleep(0.02)
        assert box.requeue(stale_after=0.01) == 2
        assert [seq for seq, _ in box.take(10, 1 << 20)] == [1, 2]

    def test_unsend_restores_order(self) -> None:
        box = Outbox(10, 1 << 20)
        for seq in range(1, 4):
            box.put(seq, b"x")
        batch = box.take(2, 1 << 20)
        box.unsend(batch)
        assert [seq for seq, _ in box.take(10, 1 << 20)] == [1, 2, 3]

    def test_batches_respect_limits(self) -> None:
        box = Outbox(100, 1 << 20)
        for seq in range(1, 11):
            box.put(seq, b"x" * 10)
        assert len(box.take(4, 1 << 20)) == 4
        assert len(box.take(100, 25)) == 3
