"""Each backend handler behind its own bounded queue and thread.

The collector's receive loop only enqueues; a slow or hung backend fills its own queue and
loses records there (counted and reported), never delaying the loop or other backends.
A backend's rank policy (see ``_policy.py``) runs on that same thread, in front of it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from ranklog._policy import RankPolicy

_log = logging.getLogger("ranklog.collector")
_STOP = object()


class QueuedHandler(logging.Handler):
    """Wraps ``inner`` so that its ``handle`` (and ``policy``, if any) runs on a thread of
    its own."""

    def __init__(
        self,
        inner: logging.Handler,
        *,
        maxsize: int = 100_000,
        name: str = "",
        policy: RankPolicy | None = None,
    ) -> None:
        super().__init__(logging.NOTSET)
        self.inner = inner
        self.name = name or inner.get_name() or type(inner).__name__
        self.policy = policy
        self.dropped = 0
        self.failed = 0
        self.abandoned = False
        self._closing = threading.Event()
        self._closed_cleanly = False
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

    def _wait(self) -> float | None:
        if self._closing.is_set():
            return 0.05  # a full queue may hold no room for _STOP: notice the request anyway
        deadline = self.policy.next_deadline() if self.policy is not None else None
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._wait())
            except queue.Empty:
                if self._closing.is_set():
                    break
                if self.policy is not None:
                    self._deliver(self._policy_step(self.policy.due, time.monotonic()))
                continue
            if item is _STOP:
                break
            if isinstance(item, threading.Event):
                item.set()
            elif self.policy is None:
                self._deliver([item])
            else:
                self._deliver(self._policy_step(self.policy.accept, item, time.monotonic()))
        self._finish()

    def _policy_step(self, step: Any, *args: Any) -> list[logging.LogRecord]:
        try:
            return step(*args)  # type: ignore[no-any-return]
        except Exception:
            self._failure("its rank policy failed on a record")
            return []

    def _deliver(self, records: list[logging.LogRecord]) -> None:
        for record in records:
            try:
                self.inner.handle(record)
            except Exception:
                self._failure("failed on a record")

    def _failure(self, what: str) -> None:
        self.failed += 1
        if self.failed == 1:
            _log.exception("backend %s %s; it keeps running", self.name, what)

    def _finish(self) -> None:
        # Closing on this thread, not the caller's: an SDK that hangs in close (a W&B
        # finish that cannot reach its server) must not hold up the collector's shutdown.
        if self.policy is not None:
            self._deliver(self._policy_step(self.policy.drain))
        try:
            self.inner.flush()
            self.inner.close()
        except Exception:
            _log.exception("backend %s failed to close", self.name)
            return
        self._closed_cleanly = True

    def barrier(self, timeout: float) -> bool:
        """Wait until every record queued before now reached the backend (or its policy)."""
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def request_close(self) -> None:
        """Ask the backend to drain and close, without waiting (see :meth:`close_within`)."""
        if not self._closing.is_set():
            self._closing.set()
            try:
                self._queue.put_nowait(_STOP)
            except queue.Full:
                pass  # the thread sees _closing once it has worked the queue down

    def close_within(self, deadline: float) -> bool:
        """Drain, then close the backend; abandon it if the deadline passes first.

        Call :meth:`request_close` on every backend first so that they all drain at once.
        """
        self.request_close()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self.abandoned = True
            _log.error(
                "backend %s did not drain within the drain bound; abandoning it with %d "
                "record(s) queued",
                self.name,
                self._queue.qsize(),
            )
            return False
        return self._closed_cleanly

    def close(self) -> None:
        # Closing goes through close_within(); logging.shutdown() must not block on a backend.
        super().close()
