"""When a rank sends records again: on a reconnect, or when the collector says it could not
keep them; never while a slow collector still answers."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from ranklog.rank.resend import ResendRule
from tests.conftest import CollectorProcess
from tests.ranks import finish, start_ranks
from tests.test_closing import throttled
from tests.test_delivery import assert_exactly_once


class TestRule:
    """The rule itself, with a clock in hand."""

    def test_a_slow_collector_that_answers_gets_nothing_twice(self) -> None:
        rule = ResendRule(2.0, 30.0, now=0.0)
        for second in range(1, 60):
            rule.heard(float(second), advanced=second % 10 == 0, refused=False)
            assert not rule.due(second + 0.9, sent_at=0.0, ack_time=5.0)

    def test_silence_resends_rarely_and_ever_more_rarely(self) -> None:
        rule = ResendRule(2.0, 30.0, now=0.0)
        assert not rule.due(7.9, sent_at=0.0, ack_time=0.1)
        assert rule.due(8.0, sent_at=0.0, ack_time=0.1)
        assert not rule.due(23.9, sent_at=8.0, ack_time=0.1)  # 16 s now
        assert rule.due(24.0, sent_at=8.0, ack_time=0.1)
        rule.reconnected()
        assert rule.due(32.0, sent_at=24.0, ack_time=0.1)  # back to 8 s

    def test_answers_that_release_nothing_do_not_hold_back_a_resend(self) -> None:
        """Heartbeats get answers, but the records in flight died with a collector whose
        end produced no reconnect event: they go again after the quiet interval."""
        rule = ResendRule(2.0, 30.0, now=0.0)
        for second in range(1, 8):
            rule.heard(float(second), advanced=False, refused=False)
            assert not rule.due(second + 0.5, sent_at=0.0, ack_time=0.1)
        assert rule.due(8.0, sent_at=0.0, ack_time=0.1)

    def test_refused_records_are_sent_again_with_backoff(self) -> None:
        rule = ResendRule(2.0, 30.0, now=0.0)
        rule.heard(1.0, advanced=False, refused=True)
        assert rule.due(1.0, sent_at=0.0, ack_time=0.1)  # at once
        rule.heard(1.5, advanced=False, refused=True)
        assert not rule.due(2.9, sent_at=1.0, ack_time=0.1)
        assert rule.due(3.0, sent_at=1.0, ack_time=0.1)  # 2 s later
        rule.heard(3.5, advanced=False, refused=True)
        assert not rule.due(6.9, sent_at=3.0, ack_time=0.1)  # 4 s now
        assert rule.due(7.0, sent_at=3.0, ack_time=0.1)
        rule.heard(7.5, advanced=True, refused=True)  # the disk has room again
        assert rule.due(9.0, sent_at=7.5, ack_time=0.1)  # 2 s again


def _last_status(log: str) -> str:
    return [line for line in log.splitlines() if "duplicates dropped" in line][-1]


class TestSlowCollector:
    """A burst into a live collector that stalls for longer than the ack timeout."""

    def test_burst_resends_nothing(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        out, ranks, records = tmp_path / "out", 4, 20_000
        c = collector("--world-size", str(ranks), "--exit-when-done", "--status-interval", "1",
                      output_dir=out)  # fmt: skip
        with throttled(c.proc.pid, stopped=3.0, running=0.5):
            stats = finish(
                start_ranks(c.endpoint, ranks, records, "--metrics", "16", "--close-timeout",
                            "10"),
                timeout=300,
            )  # fmt: skip
        assert c.wait(60) == 0, c.log()
        assert all(s["held"] == 0 for s in stats), stats
        status = _last_status(c.log())
        assert re.search(r" 0 duplicates dropped", status), status
        assert re.search(r"resends 0;", status), status
        assert_exactly_once(out, ranks, records)
