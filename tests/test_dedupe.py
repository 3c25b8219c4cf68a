"""Transport de-duplication by seq."""

from __future__ import annotations

from ranklog.collector.peers import SeqTracker


class TestSeqTracker:
    """Retransmits are refused; the contiguous prefix is what gets acknowledged."""

    def test_in_order(self) -> None:
        tracker = SeqTracker()
        assert all(tracker.accept(seq) for seq in range(1, 6))
        assert tracker.contiguous == 5
        assert not tracker.accept(3)

    def test_out_of_order_and_gaps(self) -> None:
        tracker = SeqTracker()
        assert tracker.accept(2) and tracker.accept(3)
        assert tracker.contiguous == 0
        assert not tracker.accept(3)
        assert tracker.accept(1)
        assert tracker.contiguous == 3

    def test_rank_gave_up_below_base(self) -> None:
        tracker = SeqTracker()
        tracker.accept(1)
        tracker.accept(5)
        tracker.skip_below(5)  # 2..4 were dropped on the rank: stop waiting for them
        assert tracker.contiguous == 5
        assert not tracker.accept(2)
