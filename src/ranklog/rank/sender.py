"""Delivery of one process's envelopes to a collector, without the logging module.

A :class:`Sender` owns the bounded outbox, the seq counter and its :class:`~.link.Link`, the
thread with the DEALER socket. Whoever packs envelopes (``ZMQSocketHandler``, or any caller
with a :class:`~ranklog.rank.encoder.RecordEncoder`) takes a seq from
:meth:`Sender.next_seq`, hands the packed bytes to :attr:`Sender.put` and, if the link is
asleep, calls :meth:`Sender.wake`.

How a sender ends: ``close()`` (the caller's thread) first writes everything not yet
acknowledged to a spill file (:mod:`ranklog.rank.spill`), so that a ``kill -9`` from here on
loses nothing, then lets the thread deliver: once everything is acknowledged the thread
queues the goodbye (``spilled`` 0) and stops when that is acknowledged too; the spill file
goes. If acknowledgements stop making progress for ``close_timeout`` seconds (or
``close_limit`` passes), ``close()`` gives up: the thread sends a goodbye carrying
``spilled``, the number of records left in the spill file, so the collector counts the rank
finished at once without skipping those seqs (it accepts them, once, when it ingests the
file), and the file stays.
"""

from __future__ import annotations

import itertools
import threading
import time
import warnings
from collections.abc import Callable

from ranklog.rank import signals
from ranklog.rank.curve import CurveKeys, curve_keys
from ranklog.rank.ending import Ending, lost, undelivered_line
from ranklog.rank.identity import RankIdentity
from ranklog.rank.link import Link
from ranklog.rank.outbox import Item, Outbox, Pending
from ranklog.rank.settings import Lock, SenderConfig, SenderSettings
from ranklog.rank.spill import spill_folders, spill_name, spill_to

__all__ = ["CurveKeys", "Lock", "Sender", "SenderConfig", "SenderSettings", "curve_keys"]

_POLL = 0.01
# How long a flush, close or signal waits for the thread to read an acknowledgement it
# left unread (a lone record's): then the count of what is held is exact.
_READ_ACKS_WAIT = 0.1
_SHORT_BUDGET = 0.5  # after a flush that waited in vain, until acknowledgements resume


def _nothing_converted() -> int:
    return 0


class Sender:
    """Sends the envelopes of one process incarnation to the collector ``config`` names.

    Putting never blocks: at most ``max_records`` records / ``max_bytes`` bytes wait for
    acknowledgement, and beyond that the oldest are dropped and counted. The thread starts
    with :meth:`start` or the first :meth:`wake`. ``converted`` reports how many values the
    caller's encoder had to convert; the count travels in heartbeats and the goodbye.

    ``close()`` spills what is unacknowledged, waits while acknowledgements progress
    (``close_timeout`` without any, ``close_limit`` in all), says goodbye, and leaves the
    spill file only if something was not delivered. A warning names the endpoint (and
    ``collector_log``) while no collector answers. With ``system_metrics`` the thread queues
    the process's memory and CPU use every ``system_interval`` seconds as records, under
    ``record_lock`` (the caller's lock for numbering and queueing its own records;
    :mod:`ranklog.rank.system`). With ``handle_signals`` (default ``RANKLOG_HANDLE_SIGNALS``,
    on) a SIGTERM, SIGHUP or SIGQUIT spills first, then does what it would have done
    (:mod:`ranklog.rank.signals`).
    """

    def __init__(
        self,
        identity: RankIdentity,
        config: SenderConfig,
        *,
        converted: Callable[[], int] = _nothing_converted,
        record_lock: Lock | None = None,
    ) -> None:
        self.identity = identity
        self.config = config
        self.endpoint = config.endpoint
        self.close_timeout = config.close_timeout
        self.close_limit = config.close_limit
        # Once a flush has waited in vain, close() waits only briefly unless acks resume.
        self.close_budget = config.close_timeout
        self.outbox = Outbox(config.max_records, config.max_bytes)
        # Queue one packed envelope under its seq: the outbox's own method, so the emit path
        # makes no call of the sender's in between (a method around it costs some 60 ns).
        self.put: Callable[[int, bytes | Pending], None] = self.outbox.put
        self.next_seq: Callable[[], int] = itertools.count(1).__next__
        self.running = False  # from start() until close()
        self.closed = False
        self.ending = Ending()
        self._converted = converted
        self.link = Link(
            identity, config, self.outbox, self.next_seq, self.ending, converted, record_lock
        )
        self.handle_signals = signals.signals_wanted(config.handle_signals)
        if self.handle_signals:
            signals.watch(self)

    def start(self) -> None:
        """Connect and say hello now rather than at the first record."""
        with self.link.wake_lock:
            if self.link.thread is None and not self.closed:
                self.running = True
                self.link.start()

    def wake(self) -> None:
        """Have the thread look at the outbox now: start it, or end its idle sleep."""
        with self.link.wake_lock:
            if self.link.thread is None:
                self.start()
            else:
                self.link.wake()

    @property
    def asleep(self) -> bool:
        """The thread sleeps (or has not started): :meth:`wake` it after a put."""
        return self.link.asleep

    @property
    def thread(self) -> threading.Thread | None:
        return self.link.thread

    @property
    def stats(self) -> dict[str, int]:
        """Counters a user can check: held (not yet acknowledged), dropped, converted."""
        return {
            "held": self.outbox.pending(),
            "dropped": self.outbox.dropped,
            "converted": self._converted(),
        }

    def for_child(self, identity: RankIdentity, record_lock: Lock | None = None) -> Sender:
        """A fresh sender, set up like this one, for a forked child with ``identity``.

        The child must not touch the parent's context or thread (the parent still sends what
        it buffered); it starts empty, with its own seq space.
        """
        self.link.forget_wake_pipe()
        return Sender(identity, self.config, converted=self._converted, record_lock=record_lock)

    # -- ending ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Spill what is not acknowledged yet, then wait while acknowledgements make
        progress (as :meth:`close` does) until everything put is acknowledged."""
        thread = self.link.thread
        if thread is None or not thread.is_alive():
            return
        watched = self._watch_acks()
        try:
            if not self.outbox.pending():
                return
            self._spill()
            if self._wait(lambda: self.outbox.pending() == 0):
                self._unspill()
            else:
                self.close_budget = min(self.close_timeout, _SHORT_BUDGET)
        finally:
            self.link.watch_acks = watched

    def close(self) -> None:
        """Spill, wait while acknowledgements progress, say goodbye, stop the thread, and
        warn about anything not delivered (and where it was spilled)."""
        text = self._close()
        if text:
            warnings.warn(text, RuntimeWarning, stacklevel=3)

    def terminate(self, signal_name: str, bound: float) -> str | None:
        """A signal ends the process: :meth:`close` within ``bound`` seconds (after the
        spill), the goodbye included; the line to show (None: nothing to say)."""
        if self.closed:
            return None  # close() runs already (on this thread): it spilled first
        self.close_timeout = self.close_budget = self.close_limit = bound
        self.ending.cause = signal_name
        return self._close()

    def spill_now(self, signal_name: str, bound: float) -> str | None:
        """A signal the program handles itself: spill what is not acknowledged, and go on;
        a later close() waits only ``bound`` seconds unless acknowledgements resume."""
        thread = self.link.thread
        if self.closed or thread is None or not thread.is_alive():
            return None
        self.close_budget = min(self.close_timeout, bound)
        self.link.watch_acks = self._watch_acks(self.link.watch_acks)
        records = self._spill()
        spill = self.ending.spill
        if not records or spill is None:
            return None
        rank = self.identity.rank
        if self.ending.spill_error is not None:
            return f"ranklog: rank {rank} got {signal_name}; " + lost(
                records, self.ending.spill_error
            )
        return (
            f"ranklog: rank {rank} got {signal_name}: {records} record(s) not acknowledged "
            f"yet are spilled to {spill.path} (the file goes once they are delivered)"
        )

    def _close(self) -> str | None:
        thread = self.link.thread
        closed, self.closed, self.running = self.closed, True, False
        if closed or thread is None:
            return None
        ending = self.ending
        self._watch_acks()
        self._spill()
        ending.closing.set()
        self.wake()
        if not self._wait(lambda: not thread.is_alive()):
            held = self._spill()
            ending.spilled = held if ending.spill is not None and ending.spill_error is None else 0
            ending.give_up.set()
            self.wake()
            thread.join(2.0)
            self._spill(goodbye=True)  # its goodbye too: the collector may never hear it
        return self._report()

    def _watch_acks(self, watch: bool = True) -> bool:
        """Have the thread wake for each acknowledgement while ``watch`` (a caller waits
        for them), and read the one it left unread now, if any (a lone record's, see
        :class:`~.link.Link`): only what is really unacknowledged is then spilled and
        counted. Waits :data:`_READ_ACKS_WAIT` at most; returns the setting before."""
        link = self.link
        before, link.watch_acks = link.watch_acks, watch
        if link.acks_unread and link.thread is not None and link.thread.is_alive():
            self.wake()
            deadline = time.monotonic() + _READ_ACKS_WAIT
            while link.acks_unread and time.monotonic() < deadline:
                time.sleep(0.001)
        return before

    def _records_held(self) -> list[Item]:
        goodbye = self.ending.goodbye
        held = self.outbox.held()
        return held if goodbye is None else [item for item in held if item[0] != goodbye[0]]

    def _spill(self, *, goodbye: bool = False) -> int:
        """Write what is held (and not in the spill file yet; with ``goodbye``, the goodbye
        too, last); how many records are held."""
        ending = self.ending
        held = self._records_held()
        count = len(held)
        if goodbye and ending.goodbye is not None and self.outbox.pending() > count:
            held.append(ending.goodbye)
        if not held:
            return 0
        folders = spill_folders(self.config.spill_dir)
        try:
            ending.spill, failed = spill_to(ending.spill, folders, spill_name(self.identity), held)
            ending.spill_error = None
        except OSError as exc:
            ending.spill_error = exc
        else:
            if failed is not None:
                ending.spill_fallback = f"{failed[0]} could not take it: {failed[1]}"
        return count

    def _unspill(self) -> None:
        if self.ending.spill is not None:
            self.ending.spill.delete()
            self.ending.spill = None

    def _wait(self, done: Callable[[], bool]) -> bool:
        """Wait until ``done()``; False once acknowledgements made no progress for the close
        timeout (three times the recent ack time, if longer) or the close limit passed."""
        outbox = self.outbox
        started = last = time.monotonic()
        base = outbox.base()
        patience = self.close_budget
        while not done():
            thread = self.link.thread
            if thread is None or not thread.is_alive():
                return done()
            thread.join(_POLL)
            now = time.monotonic()
            if outbox.base() != base:
                base, last, patience = outbox.base(), now, self.close_timeout
            if now - last >= max(patience, 3 * outbox.ack_time):
                self.ending.why = f"no acknowledgement for {now - last:.1f}s"
                return False
            if now - started >= self.close_limit:
                self.ending.why = f"still delivering after the close limit, {self.close_limit:g}s"
                return False
        return True

    def _report(self) -> str | None:
        ending = self.ending
        undelivered = self.outbox.pending()
        if not undelivered:
            self._unspill()
        elif ending.spill is not None:
            ending.spill.close()  # left for a collector; the lock goes with it
        dropped = self.outbox.dropped
        if not undelivered and not dropped:
            return None
        return undelivered_line(
            self.identity.rank,
            self.endpoint,
            ending,
            records=len(self._records_held()),
            dropped=dropped,
            spill_dir=self.config.spill_dir,
        )
