"""Each backend on a thread of its own, following the journal.

Records reach a backend one way only: from the journal on disk, up to the end the
collector has made durable. A slow or hung backend falls behind in the file, never in
memory, and never delays the receive loop or the other backends. The work itself (route,
rank policy, handler, checkpoints) is the backend's :class:`~.feed.Feed`; the
:class:`Runner` here only owns the thread (as the stdlib's ``QueueListener`` does): it waits
for the journal to grow or for the feed's next deadline, and calls its ``read_on``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from ranklog.backends.feed import FAILED, Feed

_log = logging.getLogger(__name__)


class Runner:
    """Steps ``feed`` on a thread of its own as the journal grows.

    :meth:`attach_journal` resumes from the checkpoint and starts the thread;
    :meth:`advance` says how far the journal is durable; :meth:`request_close` and
    :meth:`close_within` drain and close it, within a bound.
    """

    def __init__(self, feed: Feed) -> None:
        self.feed = feed
        self.sink = feed.sink
        self.name = feed.name
        self.abandoned = False
        self._wake = threading.Condition()
        self._durable_end = 0
        self._closing = False
        self._closed_cleanly = False
        self._thread = threading.Thread(target=self._run, name=f"backend-{self.name}", daemon=True)

    def attach_journal(self, journal: Path, state_dir: Path, *, from_start: bool = False) -> None:
        """Resume from this backend's checkpoint (or from the journal's start), and start."""
        self.feed.resume(journal, state_dir, from_start=from_start)
        self._thread.start()

    def advance(self, durable_end: int) -> None:
        """The journal is durable up to ``durable_end``: read on to there."""
        with self._wake:
            if durable_end > self._durable_end:
                self._durable_end = durable_end
                self._wake.notify()

    def _run(self) -> None:
        feed, clock = self.feed, self.feed.clock
        while True:
            with self._wake:
                now = clock()
                readable = feed.offset < self._durable_end and now >= feed.retry_at
                if not readable and not self._closing:
                    self._wake.wait(max(0.0, feed.next_due() - now))
                end, closing = self._durable_end, self._closing
            now = clock()
            if feed.read_on(end) is FAILED:
                time.sleep(0.1)  # a bug: do not spin on it
            if closing and feed.offset >= end:
                break
            if closing and feed.retry_at > now:
                time.sleep(min(0.05, feed.retry_at - now))  # a full disk while draining
        # Closing on this thread, not the caller's: an SDK that hangs in close (a W&B
        # finish that cannot reach its server) must not hold up the collector's shutdown.
        self._closed_cleanly = feed.finish()

    def request_close(self) -> None:
        """Ask the backend to read to the durable end, then close, without waiting."""
        with self._wake:
            self._closing = True
            self._wake.notify()

    def close_within(self, deadline: float) -> bool:
        """Drain, then close the backend; abandon it if the deadline passes first.

        Call :meth:`request_close` on every backend first so that they all drain at once.
        """
        self.request_close()
        if self._thread.ident is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self.abandoned = True
            _log.error(
                "backend %s did not drain within the drain bound; abandoning it %.1f MiB "
                "short of the journal's end (the journal keeps it: `ranklog replay "
                "--output-dir DIR --logger-type %s` writes the rest)",
                self.name,
                (self._durable_end - self.feed.offset) / (1 << 20),
                self.name,
            )
            return False
        return self._closed_cleanly
