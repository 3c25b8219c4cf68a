"""One backend's handler as the feed sees it, built once around the handler.

A :class:`Sink` checks what the handler implements once (``protocol.py``), builds the
LogRecord of a journaled record and routes it, and hands records on by one of two paths:

* as LogRecords, to ``handler.handle()``: what any ``logging.Handler`` gets;
* in batches of decoded envelopes, no LogRecord at all, for a backend that implements
  :class:`~.protocol.TakesEnvelopes` (and whose filters it applies itself).

A write error (an ``OSError``: a full disk) comes back as a value, for the feed to rewind;
any other failure is reported here, once per kind, and costs that record only. So that a
handler's write error reaches the sink, the sink gives it a ``handleError`` that raises
``OSError`` again: handlers keep the stdlib's ``except Exception: self.handleError(record)``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ranklog.backends.journaled import decode_journaled_map, decode_journaled_record
from ranklog.backends.protocol import (
    EnvelopeItem,
    HasExitTeardown,
    Resumable,
    Rewindable,
    TakesEnvelopes,
)
from ranklog.backends.records import build_record
from ranklog.backends.route import Route
from ranklog.reporting import ReportOnce

if TYPE_CHECKING:
    from ranklog.backends.journaled import RecordMap
    from ranklog.envelope import RecordEnvelope

_log = logging.getLogger(__name__)


def reraise_os_errors(handler: logging.Handler) -> None:
    """Make ``handler.handleError`` raise an ``OSError`` being handled again (to the
    sink, which rewinds), and report anything else as the handler did."""
    report = handler.handleError

    def handle_error(record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            raise error
        report(record)

    handler.handleError = handle_error  # type: ignore[method-assign]


class Sink:
    """``handler``, reached by the records ``route`` says it gets, under ``name``."""

    def __init__(self, handler: logging.Handler, route: Route, *, name: str = "") -> None:
        self.handler = handler
        self.route = route
        self.name = name or handler.get_name() or type(handler).__name__
        self.resumable = handler if isinstance(handler, Resumable) else None
        self.rewindable = handler if isinstance(handler, Rewindable) else None
        self._envelopes = handler if isinstance(handler, TakesEnvelopes) else None
        self.takes_envelopes = self._envelopes is not None and self._envelopes.takes_envelopes()
        #: The keys of the handler's state that name paths: kept relative to the output dir.
        self.checkpoint_paths: tuple[str, ...] = getattr(handler, "checkpoint_paths", ())
        #: The handler SDK's bounded exit work, run before an ``os._exit`` (see host.py).
        self.exit_teardown: Callable[[float], bool] | None = (
            handler.teardown_within if isinstance(handler, HasExitTeardown) else None
        )
        self.report = ReportOnce(_log, logging.ERROR)
        reraise_os_errors(handler)

    @property
    def failed(self) -> int:
        """Records (and other steps) the backend or its policy failed on."""
        return self.report.total()

    def record(
        self, frame: bytes, start: int, end: int, typed: RecordEnvelope | None = None
    ) -> logging.LogRecord | None:
        """The LogRecord of a journaled record, if it reaches this backend."""
        try:
            envelope: RecordEnvelope | RecordMap | None = (
                typed or decode_journaled_record(frame) or decode_journaled_map(frame)
            )
            if envelope is None:
                return None  # a goodbye
            record = build_record(envelope, start, end)
        except Exception:
            self.failure("could not read a journal entry")
            return None
        try:
            reached = self.route.reaches(record)  # runs the logger's filters, which may raise
        except Exception:
            self.failure("could not route a record (a logger filter failed)")
            return None
        return record if reached else None

    def deliver(self, record: logging.LogRecord) -> OSError | None:
        """``handle(record)``; the write error it met, if one."""
        return self._call(self.handler.handle, record)

    def deliver_envelopes(self, batch: Sequence[EnvelopeItem]) -> OSError | None:
        """Hand on ``batch`` (see :class:`~.protocol.TakesEnvelopes`); a write error."""
        assert self._envelopes is not None
        # The handler reports each record's own errors; what escapes is a write error or a bug.
        return self._call(self._envelopes.handle_envelopes, batch)

    def _call(self, handle: Callable[[Any], Any], what: Any) -> OSError | None:
        try:
            handle(what)
        except OSError as exc:
            return exc
        except Exception:
            self.failure("failed on a record")
        return None

    def failure(self, what: str, error: OSError | None = None) -> None:
        """Report a failure once; a write error as one line naming the path, without the
        traceback a bug gets."""
        if error is not None:
            what = f"{what}: cannot write {self.where(error)} ({error.strerror or error})"
        self.report(
            what, "backend %s %s; it keeps running", self.name, what, exc_info=error is None
        )

    def where(self, error: OSError) -> str:
        """The path a write error is about: the error's own, else the folder the handler
        writes."""
        return str(error.filename or getattr(self.handler, "log_dir", None) or "its files")

    def close(self) -> bool:
        """Flush and close the handler; False (reported) if that failed."""
        try:
            self.handler.flush()
            self.handler.close()
        except OSError as exc:  # a full disk: one line, as for any write error
            _log.error(
                "backend %s could not close %s (%s)",
                self.name,
                self.where(exc),
                exc.strerror or exc,
            )
            return False
        except Exception:
            _log.exception("backend %s failed to close", self.name)
            return False
        return True
