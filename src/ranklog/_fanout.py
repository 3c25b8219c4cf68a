"""Each backend handler behind its own bounded queue and thread.

The collector's receive loop only enqueues; a slow or hung backend fills its own queue and
loses records there (counted and reported), never delaying the loop or other backends.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

_log = logging.getLogger("ranklog.collector")
_STOP = object()


class QueuedHandler(logging.Handler):
    """Wraps ``inner`` so that its ``handle`` runs on a thread of its own."""

    def __init__(self, inner: logging.Handler, *, maxsize: int = 100_000, name: str = "") -> None:
        super().__init__(logging.NOTSET)
        self.inner = inner
        self.name = name or inner.get_name() or type(inner).__name__
        self.dropped = 0
        self.failed = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self._thread = threading.Thread(target=self._run, name=f"backend-{self.name}", daemon=True)
        self._thread.start()

    def handle(self, record: logging.LogRecord) -> bool:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                _log.warning("backend %s is falling behind: its queue is full, dropping", self.name)
            return False
        return True

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - handle() bypasses it
        self.handle(record)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self.inner.handle(item)
            except Exception:
                self.failed += 1
                if self.failed == 1:
                    _log.exception("backend %s failed on a record; it keeps running", self.name)

    def barrier(self, timeout: float) -> bool:
        """Wait until every record queued before now reached the backend."""
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close_within(self, deadline: float) -> bool:
        """Drain, then close the backend; abandon it if the deadline passes first."""
        try:
            self._queue.put(_STOP, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            _log.error(
                "backend %s did not drain within the drain bound; abandoning it with %d "
                "record(s) queued",
                self.name,
                self._queue.qsize(),
            )
            return False
        try:
            self.inner.flush()
            self.inner.close()
        except Exception:
            _log.exception("backend %s failed to close", self.name)
            return False
        return True

    def close(self) -> None:
        # Closing goes through close_within(); logging.shutdown() must not block on a backend.
        super().close()
