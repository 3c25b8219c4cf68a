"""When the sender thread sends records again, and when it tells the user that no collector
answers. Pure: driven by the thread with the time and what it heard.

Resend rule. Records in flight are sent again

* at once, after a reconnect (ZeroMQ's connection events): what was in flight on the
  connection that dropped may be lost, and a restarted collector lost what it had not
  journaled;
* when an acknowledgement says the collector received records it could not keep (its
  journal could not be written: the ack's ``got`` lies above its ``seq``), first at once,
  then at intervals that double from ``first`` up to ``longest`` while nothing new is
  acknowledged;
* as a last resort, when no acknowledgement released anything for
  ``max(4 * first, 3 * ack time)`` seconds after the oldest record in flight went out,
  doubling (up to ``longest``) each time until the next reconnect. Acknowledgements that
  keep arriving without releasing anything (answers to heartbeats) do not count: records
  sent on a connection that died as it was being noticed are gone without a reconnect
  event of their own, and only this brings them back.

Never otherwise: while the collector's acknowledgements release records, it has the rest
in its queue, and a slow collector made to take everything twice only gets slower.
"""

from __future__ import annotations

import warnings

_QUIET_FACTOR = 4  # the last-resort interval, in units of ``first``


class ResendRule:
    """Decides, each pass of the sender thread, whether to requeue what is in flight."""

    def __init__(self, first: float, longest: float, now: float) -> None:
        self.first = first
        self.longest = max(first, longest)
        self.heard_at = now  # the last acknowledgement of any kind
        self.advanced_at = now  # the last one that released records
        self._refused_at: float | None = None  # records arrived but were not kept
        self._retry = 0.0  # the wait before resending refused records: 0, first, 2 * first...
        self._retried_at = -float("inf")
        self._quiet = _QUIET_FACTOR * first

    def heard(self, now: float, *, advanced: bool, refused: bool) -> None:
        """An acknowledgement arrived; it released records (``advanced``) or said some
        were received and not kept (``refused``)."""
        self.heard_at = now
        if advanced:
            self.advanced_at = now
            self._retry = 0.0
            self._refused_at = None
        if refused and self._refused_at is None:
            self._refused_at = now

    def reconnected(self) -> None:
        """A connection dropped or came up: the caller resends everything in flight now."""
        self._refused_at = None
        self._retry = 0.0
        self._quiet = _QUIET_FACTOR * self.first

    def due(self, now: float, sent_at: float, ack_time: float) -> bool:
        """Resend now? ``sent_at``: when the oldest record in flight went out."""
        if self._refused_at is not None:
            if now - self._retried_at < self._retry:
                return False
            self._retried_at = now
            self._retry = min(max(2 * self._retry, self.first), self.longest)
            self._refused_at = None
            return True
        patience = max(self._quiet, 3 * ack_time)
        if now - max(self.advanced_at, sent_at) < patience:
            return False
        self._quiet = min(2 * self._quiet, self.longest)
        return True


class _Notice:
    """A condition the rank warns of once (stderr, RuntimeWarning) and once more when it is
    over, naming the endpoint (and the collector's log, if known)."""

    def __init__(self, rank: int, endpoint: str, collector_log: str | None) -> None:
        self.rank = rank
        self.endpoint = endpoint
        self.collector_log = collector_log
        self.warned = False

    def _begin(self, what: str) -> None:
        if not self.warned:
            self.warned = True
            self._say(what)

    def _end(self, what: str) -> None:
        if self.warned:
            self.warned = False
            self._say(what)

    def _say(self, what: str) -> None:
        # stacklevel: the sender thread's line that noticed (through _begin/_end and the
        # public method), as a direct warn there would show.
        warnings.warn(f"ranklog: rank {self.rank}: {what}", RuntimeWarning, stacklevel=4)


class SilenceNotice(_Notice):
    """Records wait and no collector answered for ``after`` seconds."""

    def __init__(self, rank: int, endpoint: str, after: float, collector_log: str | None) -> None:
        super().__init__(rank, endpoint, collector_log)
        self.after = after

    def check(self, now: float, heard_at: float, waiting: int) -> None:
        if self.warned or not waiting or self.after <= 0 or now - heard_at < self.after:
            return
        log = f"; the collector's log: {self.collector_log}" if self.collector_log else ""
        self._begin(
            f"no collector has answered at {self.endpoint} for {now - heard_at:.0f}s; "
            f"{waiting} record(s) wait in the rank's buffer (is the collector running?{log})"
        )

    def heard(self) -> None:
        self._end(f"the collector at {self.endpoint} answers again")


class RefusalNotice(_Notice):
    """The collector says it received records it could not keep (its journal cannot be
    written: a full disk); meanwhile they wait in the rank's buffer, which may fill."""

    def refused(self) -> None:
        if self.warned:
            return
        log = f" (see {self.collector_log})" if self.collector_log else " (see its log)"
        self._begin(
            f"the collector at {self.endpoint} cannot keep records now: its journal cannot "
            f"be written{log}, a full disk perhaps; they wait in the rank's buffer and are "
            "sent again"
        )

    def kept(self) -> None:
        self._end(f"the collector at {self.endpoint} keeps records again")
