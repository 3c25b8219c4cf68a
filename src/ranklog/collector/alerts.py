"""The collector's warnings on the terminal its user watches.

A standalone collector's stderr is that terminal already. The embedded one logs to a file
in the output dir; rank 0 hands it a pipe as ``--alert-fd`` and copies what comes out of it
to its own stderr (rank/embedded.py), and every warning of
the ``ranklog`` loggers (a stalled, silent or resumed rank, a straggler, a hung job, a
launch mistake, a backend that cannot start or is abandoned in the backends' process, and
whatever warns later) goes there too: one line each, rate-limited per kind, so a 256-rank
job that dies does not print 256 lines. The log keeps every line.

A daemon thread does the writing: a terminal that is paused or a pipe nobody reads blocks
that thread, never the receive loop. The code is shared with the backends' process
(:mod:`ranklog.reporting`), which writes its own warnings to the same fd.
"""

from __future__ import annotations

from ranklog.reporting import RateLimit, TerminalAlerts, alert_to, terminal_alerts

__all__ = ["RateLimit", "TerminalAlerts", "alert_to", "terminal_alerts"]
