"""Ranks out of step at training cadence: one commit and one read serve several records.

The receive loop holds a lone record (asleep) for the other ranks' records, never longer
than half the shortest recent gap between two messages of one rank (``Gaps``), so that
rank's next record still finds the last one acknowledged. The backends' process hears of
such a trickle once a second. Real ZeroMQ sockets; ``bench/footprint.py`` measures the CPU
it saves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from ranklog.collector import router as router_module
from ranklog.collector.backend_process import (
    ANNOUNCE_BYTES,
    ANNOUNCE_EVERY,
    ANNOUNCE_QUIET,
    announce_now,
)
from ranklog.collector.gaps import Gaps
from ranklog.collector.router import Router
from ranklog.collector.settings import ServeSettings


class Ranks:
    """A router and two ranks' sockets: ``a`` on this thread; ``b`` sends from its own."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.context = zmq.Context()
        self.a = self.context.socket(zmq.DEALER)
        self.a.connect(router.endpoint)

    def b_sends_after(self, delay: float, frame: bytes) -> threading.Thread:
        def send() -> None:
            b = self.context.socket(zmq.DEALER)
            b.connect(self.router.endpoint)
            time.sleep(delay)
            b.send(frame)
            b.close(linger=1000)

        thread = threading.Thread(target=send)
        thread.start()
        return thread

    def batch(self) -> tuple[list[bytes], float]:
        """The frames of the next batch ``receive`` returns, and the seconds it took."""
        started = time.monotonic()
        messages = self.router.receive(2000)
        return [frame for _, payload in messages for frame in payload], time.monotonic() - started

    def close(self) -> None:
        self.a.close(0)
        self.context.term()


@pytest.fixture
def ranks(monkeypatch: pytest.MonkeyPatch) -> Iterator[Ranks]:
    # Out of step from the first batch on: no 5 ms gathers, every small batch may be held.
    monkeypatch.setattr(router_module, "_GATHER_MISSES", 0)
    monkeypatch.setattr(router_module, "_GATHER_RETRY", 1 << 30)
    with Router(ServeSettings(bind="tcp://127.0.0.1:*")) as router:
        ranks = Ranks(router)
        try:
            yield ranks
        finally:
            ranks.close()


class TestHold:
    @pytest.mark.parametrize(("gap", "hold"), [(0.2, 0.1), (1.0, router_module._HOLD_S)])
    def test_a_lone_record_waits_for_another_ranks_for_half_its_gap_at_most(
        self, ranks: Ranks, gap: float, hold: float
    ) -> None:
        for frame in (b"hello", b"a1"):  # the gap after a rank's hello does not count
            ranks.a.send(frame)
            assert ranks.batch()[0] == [frame]  # no gap known yet: not held
            time.sleep(gap)
        ranks.a.send(b"a2")
        sender = ranks.b_sends_after(0.05, b"b1")
        frames, took = ranks.batch()
        sender.join()
        assert frames == [b"a2", b"b1"]  # one commit for both
        assert hold - 0.02 <= took < hold + 0.1, took

    def test_no_hold_once_a_rank_sent_two_records_together(self, ranks: Ranks) -> None:
        ranks.a.send(b"hello")
        ranks.a.send(b"a1")
        ranks.a.send(b"a2")  # two in flight: that rank polls for their acks
        got: list[bytes] = []
        deadline = time.monotonic() + 5
        while len(got) < 3 and time.monotonic() < deadline:
            got += ranks.batch()[0]
        assert got == [b"hello", b"a1", b"a2"]
        time.sleep(0.3)
        ranks.a.send(b"a3")
        sender = ranks.b_sends_after(0.05, b"b1")
        frames, took = ranks.batch()
        sender.join()
        assert frames == [b"a3"] and took < 0.05, (frames, took)
        assert ranks.batch()[0] == [b"b1"]


class TestAnnouncements:
    """When the collector tells the backends' process that more of the journal is durable."""

    @pytest.mark.parametrize(
        ("news", "since", "now"),
        [
            (0, 10.0, False),  # nothing new
            (ANNOUNCE_BYTES, ANNOUNCE_EVERY / 2, False),  # too soon, however busy
            (ANNOUNCE_BYTES, ANNOUNCE_EVERY, True),  # busy: four times a second
            (ANNOUNCE_BYTES - 1, ANNOUNCE_EVERY, False),  # a trickle ...
            (ANNOUNCE_BYTES - 1, ANNOUNCE_QUIET - 0.01, False),
            (1, ANNOUNCE_QUIET, True),  # ... once a second
        ],
    )
    def test_busy_four_times_a_second_a_trickle_once(
        self, news: int, since: float, now: Any
    ) -> None:
        assert announce_now(news, since) is now


def _steps(
    gaps: Gaps,
    seconds: float,
    routes: list[bytes],
    *,
    pairs: bytes | None = None,
    every: int = 1,
    start: float = 0.0,
) -> list[float | None]:
    """``routes`` each send a record every 0.5 s, spread over the half second (``pairs``
    sends two together every ``every`` steps), after their hellos if ``start`` is 0;
    :attr:`Gaps.shortest` after each arrival."""
    if not start:
        gaps.note(routes, -0.1)
    seen: list[float | None] = []
    arrivals = sorted(
        (start + step * 0.5 + i * 0.5 / len(routes), step, route)
        for step in range(int(seconds * 2))
        for i, route in enumerate(routes)
    )
    for at, step, route in arrivals:
        gaps.note([route, route] if route == pairs and step % every == 0 else [route], at)
        seen.append(gaps.shortest)
    return seen


class TestGaps:
    """The bound on a hold, from arrival times given (no clock, no sockets)."""

    ranks = [f"rank{i}".encode() for i in range(8)]

    def test_nothing_is_known_before_a_ranks_third_message(self) -> None:
        gaps = Gaps()
        gaps.note(self.ranks, 0.0)  # hellos
        gaps.note(self.ranks, 0.01)  # first records, right after
        assert gaps.shortest is None
        gaps.note(self.ranks, 0.51)
        assert gaps.shortest == pytest.approx(0.5)

    def test_ranks_at_two_records_a_second(self) -> None:
        seen = _steps(Gaps(), 5, self.ranks)
        assert seen[-1] == pytest.approx(0.5)

    def test_one_rank_sending_pairs_keeps_it_near_zero(self) -> None:
        seen = _steps(Gaps(), 20, self.ranks, pairs=self.ranks[3])
        after_the_first_pair = seen[4:]
        assert max(s for s in after_the_first_pair if s is not None) < 0.03

    def test_a_rank_sending_a_pair_every_tenth_step_keeps_it_short(self) -> None:
        # Its pair may arrive during a hold, and it looks for the acks every 5 ms until
        # the hold ends: under 0.1 s (0.25 s if it forgot the pair at once).
        seen = _steps(Gaps(), 20, self.ranks, pairs=self.ranks[3], every=10)
        assert max(s for s in seen[4:] if s is not None) < 0.2

    def test_a_rank_gone_quiet_no_longer_counts(self) -> None:
        gaps = Gaps()
        _steps(gaps, 5, self.ranks, pairs=self.ranks[3])
        assert gaps.shortest is not None and gaps.shortest < 0.03
        others = [rank for rank in self.ranks if rank != self.ranks[3]]
        seen = _steps(gaps, 15, others, start=5.0)
        assert seen[-1] == pytest.approx(0.5, abs=0.03)  # the others' own, risen again
