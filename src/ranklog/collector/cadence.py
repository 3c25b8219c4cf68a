"""One rank incarnation's step cadence and latest metric values: the collector's O(1) work
per record (:meth:`Cadence.record`); :mod:`ranklog.collector.progress` reads it once a second.

Step rates use the records' own ``time`` (the rank's clock) over a sliding window of
:data:`WINDOW` seconds, plus the time since the rank last stepped (the collector's clock), so
a rank that stops stepping sees its rate fall.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ranklog.envelope import AnyRecord

WINDOW = 30.0  # seconds of the rank's clock that a step rate looks back over
MIN_SPAN = 3.0  # seconds of stepping before a rate (and a score) is given
_SAMPLE_EVERY = 0.25  # seconds between kept (time, step) samples


class Cadence:
    """One rank incarnation's steps: the latest, when it advanced, and a window of samples.

    ``watched`` is shared with the rank table: the metric names whose latest value each
    record updates in ``values``.
    """

    __slots__ = ("advanced_at", "best", "individual", "rate", "relative", "samples",
                 "slow_checks", "stalled_at", "step", "time", "values", "watched")  # fmt: skip

    def __init__(self) -> None:
        self.step: int | None = None
        self.time = 0.0  # the rank's clock when ``step`` was logged
        self.advanced_at: float | None = None  # the collector's clock, likewise
        self.samples: deque[tuple[float, int]] = deque(maxlen=int(2 * WINDOW / _SAMPLE_EVERY))
        self.values: dict[str, object] = {}
        self.watched: list[str] = []
        self.rate: float | None = None
        self.best = 0.0
        self.relative: float | None = None
        self.individual: float | None = None
        self.stalled_at: float | None = None
        self.slow_checks = 0  # checks in a row as a straggler; -1 once said

    def record(self, record: AnyRecord, seen_at: float) -> None:
        """One accepted record, received at ``seen_at`` (collector clock)."""
        step = record.step
        if step is not None and (self.step is None or step > self.step):
            self.step, self.time, self.advanced_at = step, record.time, seen_at
            if not self.samples or self.time - self.samples[-1][0] >= _SAMPLE_EVERY:
                self.samples.append((self.time, step))
        if self.watched:
            msg = record.msg
            if type(msg) is dict and not record.hparams:
                for name in self.watched:
                    value = msg.get(name)
                    if value is not None:
                        self.values[name] = value

    def update_rate(self, now: float) -> float | None:
        """The step rate over the window (steps per second), and the best one so far."""
        samples = self.samples
        while len(samples) > 1 and samples[0][0] < self.time - WINDOW:
            samples.popleft()
        if not samples or self.step is None or self.advanced_at is None:
            self.rate = None
            return None
        first_time, first_step = samples[0]
        span = self.time - first_time + max(0.0, now - self.advanced_at)
        if self.time - first_time < MIN_SPAN or span <= 0:
            self.rate = None
            return None
        self.rate = (self.step - first_step) / span
        self.best = max(self.best, self.rate)
        self.individual = min(1.0, self.rate / self.best) if self.best > 0 else None
        return self.rate
