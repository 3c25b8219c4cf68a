"""How ranklog's processes say things: their own log lines to stderr, and failures that
repeat reported once, then counted."""

from __future__ import annotations

import logging
import sys
from collections import Counter


def log_to_stderr(level: int) -> None:
    """The collector's own lines (``ranklog`` loggers) to stderr; the root logger and the
    rest of the tree belong to the backends."""
    log = logging.getLogger("ranklog")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s ranklog %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


class ReportOnce:
    """Count failures by kind; the first of each kind is logged, the rest only counted.

    >>> report = ReportOnce(logging.getLogger("ranklog"))
    >>> report("bad-frame", "rejected a frame (%s)", "why")  # doctest: +SKIP
    True
    """

    def __init__(self, log: logging.Logger, level: int = logging.WARNING) -> None:
        self.log = log
        self.level = level
        self.counts: Counter[str] = Counter()

    def __call__(
        self, kind: str, message: str, *args: object, exc_info: bool = False, level: int = 0
    ) -> bool:
        """Count one ``kind``; log ``message % args`` if it is the first. True if logged."""
        self.counts[kind] += 1
        if self.counts[kind] > 1:
            return False
        self.log.log(level or self.level, message, *args, exc_info=exc_info)
        return True

    def __getitem__(self, kind: str) -> int:
        return self.counts[kind]

    def total(self) -> int:
        return sum(self.counts.values())
