"""Step cadence, stalls and straggler scores, driven by a fake clock (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest

from ranklog.collector.peers import Peer, RankTable
from ranklog.collector.progress import Progress, current_job, state
from ranklog.envelope import LooseRecordEnvelope


def record(step: int | None, time: float, msg: Any, hparams: bool = False) -> LooseRecordEnvelope:
    """A record envelope as the collector decodes it: what the cadence reads of it."""
    return LooseRecordEnvelope(
        v=1, kind="record", run="job", rank=0, inc="inc", local_rank=0, world_size=1,
        host="h", pid=1, seq=1, time=time, logger="m", level=20, step=step, hparams=hparams,
        msg=msg, extra={},
    )  # fmt: skip


def job(world_size: int, run: str = "job") -> tuple[RankTable, list[Peer]]:
    table = RankTable()
    peers = [table.add((run, r, "inc"), Peer(rank=r, world_size=world_size, host="h", pid=r))
             for r in range(world_size)]  # fmt: skip
    for peer in peers:
        peer.live = True
    return table, peers


def step(peer: Peer, number: int, now: float, msg: Any = None) -> None:
    """``peer`` logged step ``number`` at ``now`` (its clock and the collector's agree)."""
    peer.last_seen = now
    peer.last_step = number
    envelope = record(number, now, msg or {"loss": 1.0 / (number + 1)})
    peer.progress.record(envelope, now)


def run(peers: list[Peer], progress: Progress, seconds: float, periods: dict[int, float],
        start: float = 0.0) -> list[Any]:  # fmt: skip
    """Each rank steps every ``periods[rank]`` seconds (absent: heard, not stepping);
    progress is checked every second. Returns the events."""
    events = []
    tick = 0.05
    for i in range(int(seconds / tick)):
        now = start + i * tick
        for peer in peers:
            peer.last_seen = now
            period = periods.get(peer.rank)
            if period and i % round(period / tick) == 0:
                step(peer, (peer.progress.step or 0) + 1, now)
        if i % round(1 / tick) == 0:
            events.extend(progress.check(now))
    return events


class TestStragglerScores:
    """Relative to the best rank, and to the rank's own best."""

    def test_twice_as_slow_scores_half(self) -> None:
        table, peers = job(3)
        progress = Progress(table, stall_timeout=0)
        run(peers, progress, 20, {0: 0.05, 1: 0.05, 2: 0.1})
        relative = [peer.progress.relative for peer in peers]
        assert relative[0] == pytest.approx(1.0, abs=0.05)
        assert relative[1] == pytest.approx(1.0, abs=0.05)
        assert relative[2] == pytest.approx(0.5, abs=0.05)
        assert all(peer.progress.individual == pytest.approx(1.0, abs=0.05) for peer in peers)

    def test_individual_falls_when_a_rank_slows_down(self) -> None:
        table, peers = job(1)
        progress = Progress(table, stall_timeout=0)
        run(peers, progress, 40, {0: 0.05})
        run(peers, progress, 60, {0: 0.2}, start=40)
        assert peers[0].progress.individual == pytest.approx(0.25, abs=0.05)
        assert peers[0].progress.relative == 1.0

    def test_no_score_before_a_few_seconds(self) -> None:
        table, peers = job(2)
        progress = Progress(table, stall_timeout=0)
        run(peers, progress, 1.5, {0: 0.05, 1: 0.1})
        assert [peer.progress.relative for peer in peers] == [None, None]

    def test_a_straggler_is_warned_about_once(self) -> None:
        table, peers = job(2)
        progress = Progress(table, stall_timeout=5)
        events = run(peers, progress, 20, {0: 0.05, 1: 0.2})
        assert [(name, fields["rank"]) for name, fields in events] == [("rank_straggling", 1)]

    def test_status_line_names_stragglers(self) -> None:
        table, peers = job(2)
        progress = Progress(table, stall_timeout=0)
        run(peers, progress, 10, {0: 0.05, 1: 0.2})
        assert progress.stragglers().startswith("stragglers (step rate vs the best rank) 1: 0.2")


class TestStalls:
    """Heard but not stepping while others step: stalled; stepping again: resumed."""

    def test_stall_and_resume(self) -> None:
        table, peers = job(2)
        progress = Progress(table, stall_timeout=5)
        events = run(peers, progress, 10, {0: 0.1, 1: 0.1})
        events += run(peers, progress, 15, {0: 0.1}, start=10)
        assert [(name, fields["rank"]) for name, fields in events] == [("rank_stalled", 1)]
        assert state(peers[1]) == "stalled" and state(peers[0]) == "running"
        events = run(peers, progress, 3, {0: 0.1, 1: 0.1}, start=25)
        assert [(name, fields["rank"]) for name, fields in events] == [("rank_resumed", 1)]
        assert state(peers[1]) == "running"

    def test_everyone_paused_is_no_stall(self) -> None:
        table, peers = job(2)
        progress = Progress(table, stall_timeout=5)
        run(peers, progress, 5, {0: 0.1, 1: 0.1})
        assert run(peers, progress, 20, {}, start=5) == []

    def test_off_with_zero(self) -> None:
        table, peers = job(2)
        progress = Progress(table, stall_timeout=0)
        run(peers, progress, 5, {0: 0.1, 1: 0.1})
        assert run(peers, progress, 20, {0: 0.1}, start=5) == []

    def test_silent_rank_is_not_stalled(self) -> None:
        table, peers = job(2)
        progress = Progress(table, stall_timeout=5)
        run(peers, progress, 5, {0: 0.1, 1: 0.1})
        peers[1].silent = True
        assert run(peers, progress, 20, {0: 0.1}, start=5) == []
        assert state(peers[1]) == "silent"


class TestCurrentJob:
    """The job heard last, its latest incarnation per rank; watched metric values."""

    def test_latest_job_and_incarnation(self) -> None:
        table, _ = job(2, run="old")  # heard before the new job
        new = table.add(("new", 0, "a"), Peer(rank=0, world_size=1, host="h", pid=9))
        again = table.add(("new", 0, "b"), Peer(rank=0, world_size=1, host="h", pid=10))
        for peer, seen in ((new, 5.0), (again, 6.0)):
            peer.live, peer.last_seen = True, seen
        assert current_job(table) == ("new", {0: again})

    def test_watched_values_skip_hparams(self) -> None:
        table, (peer,) = job(1)
        table.watched.append("loss")
        step(peer, 1, 0.0, {"loss": 0.5, "lr": 0.1})
        peer.progress.record(record(None, 1.0, {"loss": 9.0}, hparams=True), 1)
        step(peer, 2, 2.0, {"lr": 0.1})
        assert peer.progress.values == {"loss": 0.5}
