"""A hung job: every rank is heard, none steps.

One rank stuck inside a step (a dead GPU, a deadlock, a slow file system) stops every
other rank of a DDP/FSDP job in the next collective, so no rank is behind the others and
``rank_stalled`` never fires. What gives it away is time: the job's steps stop for much
longer than its own step interval.

The rule (``job_stalled``): every rank of the job (``world_size`` of them) is heard
(heartbeats flow), none finished, each stepped before, and no rank has stepped for

    max(floor, INTERVALS x the job's step interval, PAUSES x its longest pause so far)

seconds. The step interval is learned from the job's cadence (1 / its best step rate); the
longest pause is the longest time without any rank stepping that ended with steps again
(an evaluation, a checkpoint save). The floor (``--job-stall-timeout``, 120 s) keeps the
common evaluation or checkpoint from tripping it; one that takes longer than the floor
trips it once (``job_resumed`` follows), and from then on twice that pause is tolerated.
When steps return: ``job_resumed``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ranklog.collector.events import Event, event

if TYPE_CHECKING:
    from ranklog.collector.peers import Peer

_log = logging.getLogger(__name__)
INTERVALS = 20  # a hang is this many step intervals without a step, at least
PAUSES = 2  # ... and twice the longest pause the job came back from


class JobStall:
    """Watches one job at a time (the current one); call :meth:`check` about once a
    second with its latest incarnation of each rank."""

    def __init__(self, floor: float) -> None:
        self.floor = floor
        self._learn(None)

    def _learn(self, job: str | None) -> None:
        """Start on ``job``: a new job learns its cadence anew."""
        self.job = job
        self.stalled_at: float | None = None  # when job_stalled was said
        self.last_step_at: float | None = None  # when any rank of the job last stepped
        self.longest_pause = 0.0

    def threshold(self, ranks: dict[int, Peer]) -> float:
        """Seconds without a step that make the job of ``ranks`` hung."""
        best = max((peer.progress.best for peer in ranks.values()), default=0.0)
        interval = 1.0 / best if best > 0 else 0.0
        return max(self.floor, INTERVALS * interval, PAUSES * self.longest_pause)

    def check(self, job: str | None, ranks: dict[int, Peer], now: float) -> list[Event]:
        if job != self.job:
            self._learn(job)
        if self.floor <= 0 or not ranks:
            return []
        last = max((p.progress.advanced_at or 0.0 for p in ranks.values()), default=0.0)
        events = []
        if self.last_step_at is not None and last > self.last_step_at:
            self.longest_pause = max(self.longest_pause, last - self.last_step_at)
            if self.stalled_at is not None:
                events.append(self._resumed(ranks, now))
        self.last_step_at = last
        if self.stalled_at is None and _all_heard(ranks) and now - last >= self.threshold(ranks):
            events.append(self._stalled(ranks, now, last))
        return events

    def _stalled(self, ranks: dict[int, Peer], now: float, last: float) -> Event:
        self.stalled_at = now
        step = max(p.progress.step or 0 for p in ranks.values())
        threshold = self.threshold(ranks)
        _log.warning(
            "job %s looks hung: all %d ranks are heard but none has stepped for %.0fs "
            "(at step %d; its rule: %.0fs without a step); look for a rank stuck inside a "
            "step or a collective (py-spy dump --pid PID)",
            self.job, len(ranks), now - last, step, threshold,
        )  # fmt: skip
        return event("job_stalled", run=self.job, step=step, ranks=len(ranks),
                     seconds=round(now - last, 1), threshold=round(threshold, 1))  # fmt: skip

    def _resumed(self, ranks: dict[int, Peer], now: float) -> Event:
        stalled_for = now - (self.stalled_at or now)
        self.stalled_at = None
        step = max(p.progress.step or 0 for p in ranks.values())
        _log.warning("job %s is stepping again (step %d)", self.job, step)
        return event("job_resumed", run=self.job, step=step, after_stall=round(stalled_for, 1))

    def stalled_for(self, now: float) -> float | None:
        """Seconds since the job's last step while it counts as hung; else None."""
        if self.stalled_at is None or self.last_step_at is None:
            return None
        return round(now - self.last_step_at, 1)


def _all_heard(ranks: dict[int, Peer]) -> bool:
    """Every rank of the job is here and heard, none finished, each has stepped."""
    world_size = max(peer.world_size for peer in ranks.values())
    return len(ranks) >= world_size and all(
        not peer.silent and not peer.finished and peer.progress.step is not None
        for peer in ranks.values()
    )
