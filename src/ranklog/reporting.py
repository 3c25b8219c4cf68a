"""How ranklog's processes say things: their own log lines to stderr, failures that repeat
reported once, then counted, and warnings on the terminal the user watches.

That terminal: a standalone collector's stderr is it already. The embedded one logs to a
file in the output dir; rank 0 hands it a pipe as ``--alert-fd`` and copies what comes out
of it to its own stderr (``rank/embedded.py``). Every warning of the ``ranklog`` loggers (a
stalled, silent or resumed rank, a straggler, a hung job, a launch mistake, a backend that
cannot start or is abandoned in the backends' process, which inherits the fd) goes there
too (:class:`TerminalAlerts`): one line each, rate-limited per kind, so a 256-rank job that
dies does not print 256 lines. The log keeps every line. A daemon thread does the writing:
a paused terminal or a pipe nobody reads blocks that thread, never the receive loop."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
from collections import Counter, deque


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


LINES_PER_KIND = 3  # per RATE_WINDOW; more of the same kind are counted, not shown
RATE_WINDOW = 60.0  # seconds
_QUEUED_AT_MOST = 100
_PREFIX = "ranklog collector: "


class RateLimit(logging.Filter):
    """Passes at most ``lines`` records of each kind (logger and message template) per
    ``window`` seconds; the next one shown says how many were held back meanwhile."""

    def __init__(self, lines: int = LINES_PER_KIND, window: float = RATE_WINDOW) -> None:
        super().__init__()
        self.lines = lines
        self.window = window
        self._shown: dict[tuple[str, str], deque[float]] = {}
        self._held: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, str(record.msg))
        shown = self._shown.setdefault(kind, deque())
        while shown and record.created - shown[0] >= self.window:
            shown.popleft()
        if len(shown) >= self.lines:
            self._held[kind] = self._held.get(kind, 0) + 1
            return False
        shown.append(record.created)
        held = self._held.pop(kind, 0)
        record.held_back = f" ({held:,} more like it not shown; see the log)" if held else ""
        return True

    def held_back(self) -> int:
        """Lines not shown and not yet said."""
        return sum(self._held.values())


class TerminalAlerts(logging.Handler):
    """Writes each warning (and error) to ``fd`` as one line, rate-limited, from its own
    thread. ``log_name`` names where every line is kept."""

    def __init__(self, fd: int, log_name: str) -> None:
        super().__init__(logging.WARNING)
        self.fd = fd
        self.log_name = log_name
        self.limit = RateLimit()
        self.addFilter(self.limit)
        self.setFormatter(logging.Formatter(_PREFIX + "%(message)s%(held_back)s"))
        self._lines: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="ranklog-alerts", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).replace("\n", " ") + "\n"
        except Exception:  # a warning that cannot be formatted stays in the log
            return
        if self._lines.qsize() < _QUEUED_AT_MOST:
            self._lines.put(line.encode(errors="replace"))

    def close(self) -> None:
        """Say how many lines were held back, write what is queued (briefly), let go."""
        held = self.limit.held_back()
        if held:
            self._lines.put(f"{_PREFIX}{held:,} more warnings are in {self.log_name}\n".encode())
        self._lines.put(None)
        self._writer.join(2.0)
        super().close()

    def _write(self) -> None:
        while (line := self._lines.get()) is not None:
            try:
                os.write(self.fd, line)
            except OSError:  # rank 0 is gone (EPIPE): the log has every line
                break
        with contextlib.suppress(OSError):
            os.close(self.fd)


def alert_to(fd: int, log_name: str) -> TerminalAlerts:
    """Send the ``ranklog`` loggers' warnings to ``fd`` too; close it at exit."""
    handler = TerminalAlerts(fd, log_name)
    logging.getLogger("ranklog").addHandler(handler)
    return handler


def terminal_alerts() -> TerminalAlerts | None:
    """The handler :func:`alert_to` installed in this process, if any. The backends'
    process gets its fd too (``ranklog.collector.backend_process``): a backend's warnings
    (W&B cannot start, a backend abandoned) reach the same terminal, limited the same way."""
    for handler in logging.getLogger("ranklog").handlers:
        if isinstance(handler, TerminalAlerts):
            return handler
    return None
