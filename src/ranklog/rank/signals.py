"""Spill first when a signal ends the process, then let the signal do what it would have done.

Slurm's ``scancel``, a Kubernetes pod deletion and torchrun's tear-down end ranks with
SIGTERM (torchrun forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT to its workers). Python's
default action for SIGTERM, SIGHUP and SIGQUIT ends the process without ``atexit``, so
``close()`` never runs and whatever the collector had not acknowledged would be lost.
SIGINT needs nothing: Python turns it into ``KeyboardInterrupt``, and ``close()`` runs at exit.

The handler (installed on the main thread only, where ``signal.signal`` is allowed, and
only over a handler Python can call or the default action: an ignored signal stays ignored)
runs on the main thread. For every live sender it first spills what is not acknowledged
(fsynced). Then:

- the previous handler was the default action: each sender delivers what it can and says
  goodbye within :data:`SIGNAL_BOUND` seconds (so an embedded collector counts the rank
  finished and takes in its spill file), writes one line on stderr naming the spill file,
  and the signal is raised again with the default action restored: the process ends with
  the status it would have had without ranklog.
- the program installed its own handler before: each sender only spills (the program may
  go on logging; ``close()`` at exit works as always, but waits only ``SIGNAL_BOUND``
  seconds unless acknowledgements resume), then that handler runs.

Off with ``handle_signals=False`` (handler / ``setup_metric_logger``) or
``RANKLOG_HANDLE_SIGNALS=0``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import weakref
from types import FrameType
from typing import Any, Protocol

SIGNALS_ENV = "RANKLOG_HANDLE_SIGNALS"
# The signals torchrun forwards whose default action skips atexit (SIGINT does not).
HANDLED = ("SIGTERM", "SIGHUP", "SIGQUIT")
SIGNAL_BOUND = 1.0  # seconds to deliver and say goodbye after the spill; SIGKILL comes later


class Sender(Protocol):
    """What a signal asks of each live sender (``ranklog.rank.sender.Sender``)."""

    def terminate(self, signal_name: str, bound: float) -> str | None:
        """Close within ``bound`` seconds after spilling; the line to show, if any."""
        ...

    def spill_now(self, signal_name: str, bound: float) -> str | None:
        """Spill what is not acknowledged and go on; the line to show, if any."""
        ...


_senders: weakref.WeakSet[Sender] = weakref.WeakSet()
_previous: dict[int, Any] = {}  # signal -> the handler before ours


def signals_wanted(setting: bool | None) -> bool:
    """The handler's setting, else ``RANKLOG_HANDLE_SIGNALS`` (on unless 0/false/no/off)."""
    if setting is not None:
        return setting
    return os.environ.get(SIGNALS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def watch(sender: Sender) -> None:
    """Spill ``sender``'s records when a handled signal arrives (installing the handler
    if this is the main thread and it is not installed yet)."""
    _senders.add(sender)
    if threading.current_thread() is not threading.main_thread():
        return
    for name in HANDLED:
        number = getattr(signal, name, None)
        if number is None or number in _previous:
            continue
        current = signal.getsignal(number)
        # None: set outside Python (cannot be chained); SIG_IGN: the signal does nothing.
        if current is None or current is signal.SIG_IGN or current is _on_signal:
            continue
        try:
            signal.signal(number, _on_signal)
        except (ValueError, OSError):
            continue
        _previous[number] = current


def _on_signal(number: int, frame: FrameType | None) -> None:
    previous = _previous.get(number, signal.SIG_DFL)
    name = signal.Signals(number).name
    ends = not callable(previous)
    for sender in list(_senders):
        try:
            act = sender.terminate if ends else sender.spill_now
            line = act(name, SIGNAL_BOUND)
        except Exception:  # nothing may stand between the signal and its action
            continue
        if line:
            # os.write, not print: the main thread may be inside a write to sys.stderr.
            with contextlib.suppress(OSError):
                os.write(2, (line + "\n").encode(errors="replace"))
    if callable(previous):
        previous(number, frame)
        return
    signal.signal(number, signal.SIG_DFL)
    os.kill(os.getpid(), number)
