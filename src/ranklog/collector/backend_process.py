"""The collector's handle on the backends' process (``ranklog.backends.host``).

The child follows the journal: the collector tells it, one line on its stdin per commit,
how far the journal is durable (``ranklog.pipe`` has the whole exchange). A collector that
dies (kill -9) closes the pipe; the child then stops at once, and the next collector resumes
every backend from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import replace

from ranklog.errors import ConfigError
from ranklog.pipe import BackendSpec, announcement
from ranklog.reporting import terminal_alerts

_log = logging.getLogger(__name__)
_EXIT_GRACE = 10.0  # beyond the drain bound: W&B's bounded teardown, interpreter exit
# Seconds between announcements: records arriving one by one (ranks out of step) wake
# the backends' process once per this, not once each; the drain announces the last end.
# Less than ANNOUNCE_BYTES new (training cadence): once per ANNOUNCE_QUIET. Each
# announcement wakes both of that process's threads for a few records; the backends'
# files then trail the journal by a second at most (which keeps every record meanwhile).
ANNOUNCE_EVERY = 0.25
ANNOUNCE_QUIET = 1.0
ANNOUNCE_BYTES = 64 << 10


def announce_now(news: int, since: float) -> bool:
    """Whether ``news`` bytes made durable ``since`` seconds after the last announcement
    are announced now (see :data:`ANNOUNCE_EVERY`)."""
    if news <= 0 or since < ANNOUNCE_EVERY:
        return False
    return news >= ANNOUNCE_BYTES or since >= ANNOUNCE_QUIET


class BackendProcess:
    """The collector's handle on the backends' process."""

    def __init__(self, spec: BackendSpec) -> None:
        alerts = terminal_alerts()
        if alerts is not None:
            spec = replace(spec, alert_fd=alerts.fd, alert_log=alerts.log_name)
        env = dict(os.environ)
        # The child imports what this process can: ranklog itself, a config's handler modules.
        env["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
        # A process that ran wandb leaves its service's address here (rank 0 that called
        # wandb.init before starting the embedded collector, a test run): W&B would log
        # through that process's service, and hang once it is gone. Ours starts its own.
        env.pop("WANDB_SERVICE", None)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "import sys, ranklog.backends.host as h; sys.exit(h.main())"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            pass_fds=() if alerts is None else (alerts.fd,),
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._stdin = self._proc.stdin
        self._stdin.write(spec.to_line())
        self._stdin.flush()
        ready = json.loads(self._proc.stdout.readline() or "{}")
        self._proc.stdout.close()
        if "backends" not in ready:
            code = self._proc.wait()
            raise ConfigError(ready.get("error", f"the backends' process exited (status {code})"))
        self.names: list[str] = ready["backends"]
        self._lost = False
        self._announced = -1
        self._announced_at = -math.inf
        # Announcements never block the receive loop: one that does not fit in the pipe is
        # left for the next call, which carries the latest end.
        os.set_blocking(self._stdin.fileno(), False)

    def advance(self, durable_end: int) -> None:
        """Tell the backends the journal is durable up to ``durable_end`` (cheap to call
        again with the same end: only news is written)."""
        now = time.monotonic()
        if not announce_now(durable_end - self._announced, now - self._announced_at):
            return
        try:
            os.write(self._stdin.fileno(), announcement(durable_end))
        except BlockingIOError:
            return  # the pipe is full: the next call tries again
        except OSError:
            self._report_lost()
        self._announced, self._announced_at = durable_end, now

    def _report_lost(self) -> None:
        if not self._lost:
            self._lost = True
            _log.error(
                "the backends' process exited (status %s); the journal keeps every record: "
                "`ranklog replay` writes what they missed",
                self._proc.poll(),
            )

    def drain(self, durable_end: int, timeout: float) -> bool:
        """Let every backend read to ``durable_end`` and close within ``timeout`` seconds
        (the child abandons one that does not); True if all did."""
        deadline = time.monotonic() + timeout + _EXIT_GRACE
        command = announcement(durable_end, drain=True)
        try:
            # Non-blocking still: a child that stopped reading must not hang the collector.
            while True:
                try:
                    os.write(self._stdin.fileno(), command)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError from None
                    time.sleep(0.01)
            self._stdin.close()
            code = self._proc.wait(max(0.0, deadline - time.monotonic()))
        except (subprocess.TimeoutExpired, TimeoutError):  # (TimeoutError is an OSError)
            _log.error("the backends' process did not exit; killing it")
            self._proc.kill()
            self._proc.wait()
            return False
        except OSError:  # the pipe is gone: so is the child
            self._report_lost()
            self._proc.kill()
            self._proc.wait()
            return False
        return code == 0 and not self._lost
