"""The collector's receive step, called directly on envelopes packed by the rank's encoder."""

from __future__ import annotations

import logging

import msgpack
import pytest

from ranklog.collector.peers import RankTable
from ranklog.collector.receive import CollectorStats, Received, receive, recover
from ranklog.rank.encoder import RecordEncoder
from ranklog.rank.identity import detect_identity
from ranklog.wire import ACK, decode

ROUTE = b"rank-0"


def packed(encoder: RecordEncoder, seq: int, step: int) -> bytes:
    record = logging.makeLogRecord(
        {"name": "m", "levelno": logging.INFO, "msg": {"loss": 0.5}, "step": step}
    )
    frame = encoder.record(seq, record)
    assert isinstance(frame, bytes)
    return frame


@pytest.fixture
def encoder() -> RecordEncoder:
    return RecordEncoder(detect_identity(rank=0, local_rank=0, world_size=2, run_id="run"))


def acked(received: Received) -> list[tuple[bytes, int]]:
    """``(route, seq)`` of each acknowledgement, checked to be an ack envelope."""
    acks = [(route, decode(frame)) for route, frame in received.acks()]
    assert all(ack["kind"] == ACK and ack["run"] == "run" for _, ack in acks)
    return [(route, ack["seq"]) for route, ack in acks]


class TestReceive:
    """Frames in; what to journal, what to acknowledge and what was rejected out."""

    def test_records_are_accepted_and_acknowledged_once_applied(
        self, encoder: RecordEncoder
    ) -> None:
        ranks, stats = RankTable(), CollectorStats()
        frames = [packed(encoder, seq, step=seq - 1) for seq in (1, 2, 3)]
        received = receive([(ROUTE, frames)], ranks, stats, now=5.0)
        assert received.frames == frames
        assert acked(received) == [(ROUTE, 0)]  # nothing is safe before it is journaled
        received.apply(stats)
        assert acked(received) == [(ROUTE, 3)]
        assert stats.accepted == 3 and stats.duplicates == 0
        (peer,) = ranks
        assert (peer.rank, peer.world_size, peer.last_step, peer.last_seen) == (0, 2, 2, 5.0)
        assert [name for name, _ in received.events] == ["rank_joined"]

    def test_retransmit_is_dropped_as_a_duplicate(self, encoder: RecordEncoder) -> None:
        ranks, stats = RankTable(), CollectorStats()
        first = receive([(ROUTE, [packed(encoder, 1, 0)])], ranks, stats, now=1.0)
        first.apply(stats)
        # The ack went missing: the rank resends seq 1 with seq 2, and seq 2 twice in a batch.
        again = [packed(encoder, 1, 0), packed(encoder, 2, 1), packed(encoder, 2, 1)]
        second = receive([(ROUTE, again)], ranks, stats, now=2.0)
        assert second.frames == [again[1]]
        assert stats.duplicates == 2
        second.apply(stats)
        assert stats.accepted == 2
        assert acked(second) == [(ROUTE, 2)]
        assert second.events == []  # the rank joined once

    def test_a_silent_rank_heard_again_is_said(
        self, encoder: RecordEncoder, caplog: pytest.LogCaptureFixture
    ) -> None:
        ranks, stats = RankTable(), CollectorStats()
        receive([(ROUTE, [packed(encoder, 1, 0)])], ranks, stats, now=1.0).apply(stats)
        assert [peer.rank for peer in ranks.newly_silent(70.0, 60.0)] == [0]
        with caplog.at_level(logging.WARNING, logger="ranklog"):
            again = receive([(ROUTE, [packed(encoder, 2, 1)])], ranks, stats, now=71.0)
        assert [name for name, _ in again.events] == ["rank_resumed"]
        assert "rank 0 (host" in caplog.text and "is heard again" in caplog.text

    def test_garbage_is_rejected_with_a_counted_reason(
        self, encoder: RecordEncoder, caplog: pytest.LogCaptureFixture
    ) -> None:
        ranks, stats = RankTable(), CollectorStats()
        garbage = [b"\xc1", b"\xc1\xc1", msgpack.packb([1, 2]), msgpack.packb({"v": 99})]
        good = packed(encoder, 1, 0)
        with caplog.at_level(logging.WARNING, logger="ranklog"):
            received = receive([(ROUTE, [*garbage, good])], ranks, stats, now=1.0)
        assert received.frames == [good]  # the others keep being served
        assert dict(stats.rejected.counts) == {"not-msgpack": 2, "not-a-map": 1, "bad-version": 1}
        rejections = [r.getMessage() for r in caplog.records if "rejected a frame" in r.msg]
        assert len(rejections) == 3  # the first of each reason; the rest only counted

    def test_heartbeat_is_acknowledged_and_its_base_skips_what_the_rank_dropped(
        self, encoder: RecordEncoder
    ) -> None:
        ranks, stats = RankTable(), CollectorStats()
        beat = encoder.control("heartbeat", base=6, dropped=5, converted=0)
        received = receive([(ROUTE, [beat])], ranks, stats, now=1.0)
        assert received.frames == []
        assert acked(received) == [(ROUTE, 5)]
        assert next(iter(ranks)).dropped == 5

    def test_an_ack_from_a_rank_is_rejected(self, encoder: RecordEncoder) -> None:
        ranks, stats = RankTable(), CollectorStats()
        ack = msgpack.packb({"v": 1, "kind": "ack", "run": "r", "rank": 0, "inc": "i", "seq": 1})
        received = receive([(ROUTE, [ack])], ranks, stats, now=1.0)
        assert received.acks() == [] and stats.rejected["unexpected-kind"] == 1


class TestEviction:
    """A full rank table makes room; the incarnation let go costs only itself."""

    def test_an_evicted_rank_comes_back_and_the_others_keep_their_state(self) -> None:
        ranks, stats = RankTable(capacity=2), CollectorStats()
        a, b, c = (
            RecordEncoder(detect_identity(rank=r, local_rank=0, world_size=3, run_id="run"))
            for r in (0, 1, 2)
        )
        for route, encoder in ((b"a", a), (b"b", b)):
            received = receive([(route, [packed(encoder, s, s) for s in (1, 2, 3)])], ranks,
                               stats, now=1.0)  # fmt: skip
            received.apply(stats)
        beat = c.control("heartbeat", base=1, dropped=0, converted=0)
        receive([(b"c", [beat])], ranks, stats, now=2.0)  # a, heard longest ago, goes
        assert sorted(peer.rank for peer in ranks) == [1, 2] and ranks.evicted == 1
        # a comes back: its new records land (its state starts over from its base) ...
        beat = a.control("heartbeat", base=4, dropped=0, converted=0)
        back = receive([(b"a", [beat, packed(a, 4, 4), packed(a, 5, 5)])], ranks, stats, now=3.0)
        back.apply(stats)
        assert len(back.frames) == 2 and acked(back) == [(b"a", 5)]
        # ... and b, still held, knows its retransmit.
        again = receive([(b"b", [packed(b, 3, 3)])], ranks, stats, now=3.0)
        assert again.frames == [] and acked(again) == [(b"b", 3)]


class TestRecover:
    """The journal read back: what was accepted before counts as seen."""

    def test_journaled_records_are_duplicates_after_a_restart(self, encoder: RecordEncoder) -> None:
        ranks, stats = RankTable(), CollectorStats()
        journaled = [packed(encoder, seq, seq) for seq in (1, 2)]
        assert recover([*journaled, b"\xc1"], ranks, stats, now=1.0) == 2
        assert stats.accepted == 2
        received = receive([(ROUTE, journaled)], ranks, stats, now=2.0)
        assert received.frames == [] and stats.duplicates == 2
        assert acked(received) == [(ROUTE, 2)]
