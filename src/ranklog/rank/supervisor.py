"""Rank 0 keeps its embedded collector alive while the job runs.

A collector that dies of a signal it does not handle (kill -9, the OOM killer, a crash in
native code) is started again with the same command line: the same endpoint (an ``ipc://``
file left behind is bound again; a TCP port with the same CURVE keys), output dir and
``--parent-pid``. It resumes from its journal (its owner record names a dead pid, so it
continues the job) and the ranks resend what it had not acknowledged. Rank 0's stderr
says so in one line.

Left alone: a collector that exits by itself (its job done; SIGTERM or SIGINT, which it
drains and exits on), and one that ends while rank 0 closes (``finish_metric_logger``,
interpreter exit, a signal that closed rank 0's handler). At most ``MAX_RESTARTS`` within
``WINDOW`` seconds: a collector that keeps dying gets one loud line, and the ranks spill at
exit as they do without a collector.

One daemon thread blocks in ``waitpid`` (``Popen.wait``): no polling, no CPU while the
collector runs, and it never keeps rank 0 alive.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ranklog.errors import ConfigError
from ranklog.journal import spill_path

MAX_RESTARTS = 3
WINDOW = 600.0  # seconds
_RELAY_WAIT = 2.0  # seconds for the collector's last warning lines once it has exited
# Signals a collector handles itself (drain, exit 0): one that still died of them was
# told to stop.
_ON_PURPOSE = (signal.SIGTERM, signal.SIGINT)


class Supervised(Protocol):
    """What the supervisor starts again (``embedded.EmbeddedCollector``)."""

    endpoint: str
    output_dir: Path
    args: list[str]

    @property
    def log_path(self) -> Path: ...

    def start(self) -> subprocess.Popen[bytes]:
        """Start the collector; raise ConfigError with its reason if it cannot."""
        ...

    def relayed(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds until the collector's last warning lines (it
        exited) are on this process's stderr."""
        ...


class Supervisor:
    """Start ``collector``, and start it again whenever it dies while ``wanted()`` holds
    (rank 0 still logs) and :meth:`stop` was not called."""

    def __init__(
        self,
        collector: Supervised,
        wanted: Callable[[], bool] = lambda: True,
        *,
        max_restarts: int = MAX_RESTARTS,
        window: float = WINDOW,
    ) -> None:
        self._collector = collector
        self._wanted = wanted
        self._max_restarts = max_restarts
        self._window = window
        self._restarts: deque[float] = deque()
        self._stopping = threading.Event()
        self.proc = collector.start()  # raises ConfigError with its reason
        self._thread = threading.Thread(target=self._run, name="ranklog-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Rank 0 closes: whatever the collector does from now on is left alone."""
        self._stopping.set()

    @property
    def watching(self) -> bool:
        """Whether it still watches (False once it gave up, or the collector ended)."""
        return self._thread.is_alive()

    def wait(self, timeout: float) -> int | None:
        """Stop supervising and wait up to ``timeout`` seconds for the collector to exit
        (one starting again meanwhile included); its exit status, or None if it still runs."""
        self.stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            return None
        # Its last lines (a backend abandoned at the drain bound) before this process ends.
        self._collector.relayed(_RELAY_WAIT)
        return self.proc.returncode

    def _run(self) -> None:
        while True:
            code = self.proc.wait()  # blocks in waitpid: no CPU while the collector runs
            if not self._should_restart(code):
                return
            line, proc = self._restart(code)
            print(line, file=sys.stderr, flush=True)
            if proc is None:
                return
            self.proc = proc

    def _should_restart(self, code: int) -> bool:
        died = code < 0 and -code not in _ON_PURPOSE
        closing = self._stopping.is_set() or not self._wanted()
        return died and not closing

    def _restart(self, code: int) -> tuple[str, subprocess.Popen[bytes] | None]:
        """Start the collector again within the bound; the line to show, and the new
        process (None: not restarted)."""
        collector, old = self._collector, self.proc
        what = f"ranklog: the embedded collector (pid {old.pid}) {_exit(code)}"
        after = (
            f"records wait on the ranks, which spill them at exit to "
            f"{spill_path(collector.output_dir)}; after the job `{_replay(collector)}` writes them"
        )
        log = f"(its log: {collector.log_path})"
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > self._window:
            self._restarts.popleft()
        if len(self._restarts) >= self._max_restarts:
            return (
                f"{what} again: {len(self._restarts)} restarts within {self._window / 60:g} "
                f"min already, NOT RESTARTING IT; {after} {log}"
            ), None
        self._restarts.append(now)
        try:
            proc = collector.start()
        except ConfigError as exc:
            return f"{what} and could not be restarted: {exc}; {after}", None
        return (
            f"{what}; restarted it (pid {proc.pid}) on {collector.endpoint}, restart "
            f"{len(self._restarts)} of at most {self._max_restarts} within "
            f"{self._window / 60:g} min {log}"
        ), proc


def _replay(collector: Supervised) -> str:
    """The command that brings the job's backends up to date from the spills."""
    args = collector.args
    command = f"ranklog replay --output-dir {collector.output_dir}"
    if "--logger-type" in args[:-1]:
        command += f" --logger-type {args[args.index('--logger-type') + 1]}"
    return command


def _exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
