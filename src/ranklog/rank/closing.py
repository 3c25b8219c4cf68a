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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ranklog.journal import STATE_DIR
from ranklog.rank.outbox import Item
from ranklog.rank.spill import SpillFile, spill_folders, spill_name, spill_to
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
        self.cause = ""  # the signal that ended the process, if one did
        self.spill_fallback = ""  # why the output dir's spill folder did not take the file


def step(sender: Sender, sock: Any) -> bool:
    """The thread's part, once a pass while closing; True when the thread should stop."""
    ending = sender.ending
    if ending.give_up.is_set():
        if ending.goodbye is None:
            seq = sender.next_seq()
            # Records neither delivered nor spilled are lost: the collector stops waiting.
            base = {} if ending.spilled else {"base": seq}
            ending.goodbye = (seq, sender.control(GOODBYE, seq=seq, spilled=ending.spilled, **base))
            # Held, like any message not acknowledged.
            sender.outbox.put(*ending.goodbye, bounded=False)
        sender.send_last(sock, ending.goodbye[1])
        return True
    if ending.goodbye is None:
        if sender.outbox.pending() == 0:
            seq = sender.next_seq()
            ending.goodbye = (seq, sender.control(GOODBYE, seq=seq, spilled=0))
            sender.outbox.put(*ending.goodbye, bounded=False)
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
    text = _close(sender)
    if text:
        warnings.warn(text, RuntimeWarning, stacklevel=3)


def terminate(sender: Sender, signal_name: str, bound: float) -> str | None:
    """A signal ends the process: :func:`close` within ``bound`` seconds (after the
    spill), the goodbye included; the line to show (None: nothing to say)."""
    if sender.closed:
        return None  # close() runs already (on this thread): it spilled first
    sender.close_timeout = sender.close_budget = sender.close_limit = bound
    sender.ending.cause = signal_name
    return _close(sender)


def spill_now(sender: Sender, signal_name: str, bound: float) -> str | None:
    """A signal the program handles itself: spill what is not acknowledged, and go on;
    a later close() waits only ``bound`` seconds unless acknowledgements resume."""
    thread = sender.thread
    if sender.closed or thread is None or not thread.is_alive():
        return None
    sender.close_budget = min(sender.close_timeout, bound)
    records = _spill(sender)
    spill = sender.ending.spill
    if not records or spill is None:
        return None
    if sender.ending.spill_error is not None:
        return f"ranklog: rank {sender.identity.rank} got {signal_name}; " + _lost(sender, records)
    return (
        f"ranklog: rank {sender.identity.rank} got {signal_name}: {records} record(s) not "
        f"acknowledged yet are spilled to {spill.path} (the file goes once they are delivered)"
    )


def _close(sender: Sender) -> str | None:
    thread = sender.thread
    closed, sender.closed, sender.running = sender.closed, True, False
    if closed or thread is None:
        return None
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
    return _report(sender)


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
    folders = spill_folders(sender.spill_dir)
    try:
        ending.spill, failed = spill_to(ending.spill, folders, spill_name(sender.identity), held)
        ending.spill_error = None
    except OSError as exc:
        ending.spill_error = exc
    else:
        if failed is not None:
            ending.spill_fallback = f"{failed[0]} could not take it: {failed[1]}"
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


def _report(sender: Sender) -> str | None:
    ending = sender.ending
    undelivered = sender.outbox.pending()
    records = len(_records_held(sender))
    if not undelivered:
        _unspill(sender)
    elif ending.spill is not None:
        ending.spill.close()  # left for a collector; the lock goes with it
    dropped = sender.outbox.dropped
    if not undelivered and not dropped:
        return None
    rank = sender.identity.rank
    cause = f"got {ending.cause} and " if ending.cause else ""
    what = f"{records} record(s)" if records else "its goodbye"
    text = f"ranklog: rank {rank} {cause}could not deliver {what}"
    text += f" to {sender.endpoint} ({ending.why or 'is the collector running?'})"
    if records and ending.spill is not None and ending.spill_error is None:
        text += f"; {records} record(s) are spilled to {ending.spill.path}: " + _recovery(
            sender, ending.spill.path
        )
    elif records:
        text += "; " + _lost(sender, records)
    if dropped:
        text += f"; and it dropped {dropped} record(s) because its buffer was full"
    return text


def _lost(sender: Sender, records: int) -> str:
    return (
        f"{records} record(s) unacknowledged could not be spilled either "
        f"({sender.ending.spill_error}): those the collector did not journal before it "
        "stopped answering are lost"
    )


def _recovery(sender: Sender, path: Path) -> str:
    """How the spill file at ``path`` gets to a collector (the README's recovery steps)."""
    wanted = None if sender.spill_dir is None else Path(sender.spill_dir)
    if wanted is not None and path.parent == wanted:
        return (
            "the next collector (or `ranklog replay`) serving the job's output directory "
            "ingests them from its .ranklog/spill/ folder"
        )
    output_dir = "<output-dir>"
    if wanted is not None and wanted.parent.name == STATE_DIR:
        output_dir = str(wanted.parent.parent)
    why = f" ({sender.ending.spill_fallback})" if sender.ending.spill_fallback else ""
    return (
        f"this is the rank's local folder{why}; to bring them back move the file into "
        f"{output_dir}/.ranklog/spill/, then run `ranklog replay --output-dir {output_dir}` "
        "with the job's --logger-type (or let the next collector on that dir ingest it)"
    )
