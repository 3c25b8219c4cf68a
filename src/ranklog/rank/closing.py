"""How a sender ends: spill early, wait while acknowledgements make progress, say goodbye,
and say what was not delivered.

``close()`` (the caller's thread) first writes everything not yet acknowledged to a spill
file (:mod:`ranklog.rank.spill`), so that a ``kill -9`` from here on loses nothing, then
lets the thread deliver: once everything is acknowledged the thread queues the goodbye
(``spilled`` 0) and stops when that is acknowledged too; the spill file goes. If
acknowledgements stop making progress for ``close_timeout`` seconds (or ``close_limit``
passes), ``close()`` gives up: the thread sends a goodbye carrying ``spilled``, the number
of records left in the spill file, so the collector counts the rank finished at once
without skipping those seqs (it accepts them, once, when it ingests the file), and the
file stays.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ranklog.rank.outbox import Item
from ranklog.rank.spill import SpillFile, spill_folders, spill_name
from ranklog.wire import GOODBYE

if TYPE_CHECKING:
    from ranklog.rank.sender import Sender

_POLL = 0.01
_SHORT_BUDGET = 0.5  # after a flush that waited in vain, until acknowledgements resume


class Ending:
    """What ``close()`` and the sender thread share while a sender ends."""

    def __init__(self) -> None:
        # close() began: the thread says goodbye once everything is acknowledged.
        self.closing = threading.Event()
        # close() stopped waiting: the thread sends its goodbye at once and stops.
        self.give_up = threading.Event()
        self.goodbye: tuple[int, bytes] | None = None  # queued once everything was acked
        self.spill: SpillFile | None = None
        self.spill_error: OSError | None = None
        self.spilled = 0
        self.why = ""  # why close() stopped waiting


def step(sender: Sender, sock: Any) -> bool:
    """The thread's part, once a pass while closing; True when the thread should stop."""
    ending = sender.ending
    if ending.give_up.is_set():
        if ending.goodbye is None:
            seq = sender.next_seq()
            # Records neither delivered nor spilled are lost: the collector stops waiting.
            base = {} if ending.spilled else {"base": seq}
            ending.goodbye = (seq, sender.control(GOODBYE, seq=seq, spilled=ending.spilled, **base))
            sender.outbox.put(*ending.goodbye)  # held, like any message not acknowledged
        sender.send_last(sock, ending.goodbye[1])
        return True
    if ending.goodbye is None:
        if sender.outbox.pending() == 0:
            seq = sender.next_seq()
            ending.goodbye = (seq, sender.control(GOODBYE, seq=seq, spilled=0))
            sender.outbox.put(*ending.goodbye)
        return False
    return sender.outbox.pending() == 0


def flush(sender: Sender) -> None:
    """Spill, then wait while acknowledgements progress until everything is delivered."""
    thread = sender.thread
    if thread is None or not thread.is_alive() or not sender.outbox.pending():
        return
    _spill(sender)
    if _wait(sender, lambda: sender.outbox.pending() == 0):
        _unspill(sender)
    else:
        sender.close_budget = min(sender.close_timeout, _SHORT_BUDGET)


def close(sender: Sender) -> None:
    """Spill, deliver while acknowledgements progress, goodbye, report (see the module)."""
    thread = sender.thread
    closed, sender.closed, sender.running = sender.closed, True, False
    if closed or thread is None:
        return
    ending = sender.ending
    _spill(sender)
    ending.closing.set()
    sender.wake()
    if not _wait(sender, lambda: not thread.is_alive()):
        held = _spill(sender)
        ending.spilled = held if ending.spill is not None and ending.spill_error is None else 0
        ending.give_up.set()
        sender.wake()
        thread.join(2.0)
        _spill(sender, goodbye=True)  # its goodbye too: the collector may never hear it
    _report(sender)


def _records_held(sender: Sender) -> list[Item]:
    goodbye = sender.ending.goodbye
    held = sender.outbox.held()
    return held if goodbye is None else [item for item in held if item[0] != goodbye[0]]


def _spill(sender: Sender, *, goodbye: bool = False) -> int:
    """Write what is held (and not in the spill file yet; with ``goodbye``, the goodbye
    too, last); how many records are held."""
    ending = sender.ending
    held = _records_held(sender)
    count = len(held)
    if goodbye and ending.goodbye is not None and sender.outbox.pending() > count:
        held.append(ending.goodbye)
    if not held:
        return 0
    try:
        if ending.spill is None:
            folders = spill_folders(sender.spill_dir)
            ending.spill = SpillFile.create(folders, spill_name(sender.identity))
        ending.spill.add(held)
        ending.spill_error = None
    except OSError as exc:
        ending.spill_error = exc
    return count


def _unspill(sender: Sender) -> None:
    if sender.ending.spill is not None:
        sender.ending.spill.delete()
        sender.ending.spill = None


def _wait(sender: Sender, done: Callable[[], bool]) -> bool:
    """Wait until ``done()``; False once acknowledgements made no progress for the close
    timeout (three times the recent ack time, if longer) or the close limit passed."""
    outbox = sender.outbox
    started = last = time.monotonic()
    base = outbox.base()
    patience = sender.close_budget
    while not done():
        thread = sender.thread
        if thread is None or not thread.is_alive():
            return done()
        thread.join(_POLL)
        now = time.monotonic()
        if outbox.base() != base:
            base, last, patience = outbox.base(), now, sender.close_timeout
        if now - last >= max(patience, 3 * outbox.ack_time):
            sender.ending.why = f"no acknowledgement for {now - last:.1f}s"
            return False
        if now - started >= sender.close_limit:
            sender.ending.why = f"still delivering after the close limit, {sender.close_limit:g}s"
            return False
    return True


def _report(sender: Sender) -> None:
    ending = sender.ending
    undelivered = sender.outbox.pending()
    records = len(_records_held(sender))
    if not undelivered:
        _unspill(sender)
    elif ending.spill is not None:
        ending.spill.close()  # left for a collector; the lock goes with it
    dropped = sender.outbox.dropped
    if not undelivered and not dropped:
        return
    text = f"ranklog: rank {sender.identity.rank} could not deliver {undelivered} message(s)"
    text += f" to {sender.endpoint} ({ending.why or 'is the collector running?'})"
    if records and ending.spill is not None and ending.spill_error is None:
        text += (
            f"; {records} record(s) are spilled to {ending.spill.path}: the next collector "
            "(or `ranklog replay`) serving the job's output directory ingests them from its "
            ".ranklog/spill/ folder (move the file there if it is elsewhere)"
        )
    elif records:
        text += (
            f"; {records} record(s) unacknowledged could not be spilled either "
            f"({ending.spill_error}): those the collector did not journal before it stopped "
            "answering are lost"
        )
    if dropped:
        text += f"; and it dropped {dropped} record(s) because its buffer was full"
    warnings.warn(text, RuntimeWarning, stacklevel=4)
