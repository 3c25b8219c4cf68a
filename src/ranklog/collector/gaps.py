"""How often each rank's messages arrive, as the receive loop takes them.

The shortest recent gap between two messages of one rank bounds how long the receive loop
may hold a lone record for others (:meth:`ranklog.collector.router.Router.receive`): held
for less than half of it, a rank's next record finds the last one acknowledged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

# How fast a rank's shortest gap forgets a short one: each longer gap moves it this part
# of the way up. A rank that sends two records together keeps its own near zero.
_RISE = 0.05
_QUIET_S = 10.0  # a rank not heard from for this long no longer counts
_RECOUNT_S = 1.0  # how often :attr:`Gaps.shortest` is taken again over the ranks heard
_KEPT = 4096  # routes remembered (more: all forgotten at once)


class Gaps:
    """Each route's last arrival and shortest recent gap, from its second gap on (a rank's
    first message is its hello). :attr:`shortest` is the least of those of the routes
    heard from lately; None until one is known."""

    def __init__(self) -> None:
        self.shortest: float | None = None
        self._last: dict[bytes, float] = {}
        self._gap: dict[bytes, float] = {}
        self._recount_at = 0.0

    def note(self, routes: Iterable[bytes], now: float) -> None:
        """Messages from ``routes`` were taken at ``now``."""
        last, gaps, shortest = self._last, self._gap, self.shortest
        for route in routes:
            before = last.get(route)
            last[route] = now
            if before is None:
                continue
            gap = now - before
            known = gaps.get(route)
            if known is None:  # its first gap, from its hello: nothing of its cadence yet
                gaps[route] = math.inf
                continue
            gaps[route] = known = gap if gap < known else known + _RISE * (gap - known)
            shortest = known if shortest is None else min(shortest, known)
        self.shortest = shortest
        if now >= self._recount_at:
            self._recount(now)

    def _recount(self, now: float) -> None:
        """Between recounts :attr:`shortest` only falls; here the rises count, and the
        routes gone quiet are forgotten."""
        self._recount_at = now + _RECOUNT_S
        if len(self._last) > _KEPT:
            self._last.clear()
            self._gap.clear()
        for route in [route for route, at in self._last.items() if now - at > _QUIET_S]:
            del self._last[route]
            self._gap.pop(route, None)
        self.shortest = min((gap for gap in self._gap.values() if gap < math.inf), default=None)
