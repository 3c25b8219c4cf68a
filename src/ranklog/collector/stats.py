"""The collector's counters: a leaf module, so that the receive step and the events that
report them do not import each other."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ranklog.reporting import ReportOnce

# Rejections are the receive step's lines: they keep its logger's name.
_log = logging.getLogger("ranklog.collector.receive")


@dataclass
class CollectorStats:
    """Counters the collector reports in its status line and on exit. ``rejected`` counts
    rejected frames by reason, and logs the first of each reason."""

    accepted: int = 0
    duplicates: int = 0
    rejected: ReportOnce = field(default_factory=lambda: ReportOnce(_log))
