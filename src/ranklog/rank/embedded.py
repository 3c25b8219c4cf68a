"""The embedded collector: global rank 0 starts ``ranklog collect`` for its job and waits
until it listens, or fails with the collector's own words; it starts it again if it dies
(rank/supervisor.py). It logs to a file in the output dir; its warnings also reach rank 0's
stderr (``--alert-fd``, a pipe rank 0 relays)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ranklog.endpoints import bind_address_for, is_local_only
from ranklog.errors import ConfigError
from ranklog.rank.supervisor import Supervisor

COLLECTOR_LOG = "ranklog-collector.log"
READY_MARK = b"listening on "
READY_TIMEOUT = 120.0  # a first start imports wandb and tensorboard in the backends' child


@dataclass
class EmbeddedCollector:
    """What rank 0 starts: the collector's command line, and where it logs."""

    endpoint: str
    output_dir: Path
    world_size: int
    args: list[str] = field(default_factory=list)
    # The thread copying the running collector's warnings to stderr (see _relay_alerts).
    _relay: threading.Thread | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.output_dir / COLLECTOR_LOG

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "ranklog", "collect",
                   "--bind", bind_address_for(self.endpoint),
                   "--output-dir", str(self.output_dir),
                   "--world-size", str(self.world_size),
                   "--exit-when-done", "--parent-pid", str(os.getpid()),
                   *self.args]  # fmt: skip
        if not is_local_only(self.endpoint):
            command.append("--allow-remote")
        return command

    def supervised(self, wanted: Callable[[], bool]) -> Supervisor:
        """Start it (see :meth:`start`), and again whenever it dies while ``wanted()``."""
        return Supervisor(self, wanted)

    def start(self) -> subprocess.Popen[bytes]:
        """Start the collector and return once it listens; raise ConfigError if it cannot
        start (bad settings, port in use, unwritable output dir), with its reason."""
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            log_file = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        except OSError as exc:
            raise ConfigError(
                f"cannot write to the output dir {self.output_dir}: {exc.strerror or exc}"
            ) from None
        alerts_in, alerts_out = os.pipe()
        with log_file:
            start = log_file.tell()
            # Its own session: a torchrun tear-down of the worker group must not kill it
            # mid-drain.
            try:
                proc = subprocess.Popen(
                    [*self.command(), "--alert-fd", str(alerts_out)],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    pass_fds=(alerts_out,),
                )
            except BaseException:
                os.close(alerts_in)
                raise
            finally:
                os.close(alerts_out)
        self._relay = _relay_alerts(alerts_in)
        self._wait_until_listening(proc, start)
        return proc

    def relayed(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds until the collector's last warning lines are on
        stderr (the relay ends once the collector, and its backends' process, exited)."""
        if self._relay is not None:
            self._relay.join(timeout)

    def _wait_until_listening(self, proc: subprocess.Popen[bytes], start: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            text = self._log_since(start)
            if READY_MARK in text:
                return
            if proc.poll() is not None:
                raise ConfigError(
                    f"the embedded ranklog collector could not start: {_reason(text)} "
                    f"(its log: {self.log_path})"
                )
            time.sleep(0.05)
        print(
            f"ranklog: the embedded collector is not listening after {READY_TIMEOUT:g}s; "
            f"training goes on and records wait on the ranks (its log: {self.log_path})",
            file=sys.stderr,
        )

    def _log_since(self, start: int) -> bytes:
        with open(self.log_path, "rb") as log:
            log.seek(start)
            return log.read()


def _relay_alerts(fd: int) -> threading.Thread:
    """Copy the collector's warning lines from the pipe ``fd`` to this process's stderr
    (the torchrun job's output), on a daemon thread that blocks in ``read`` until one
    comes. The collector never holds that stderr itself: a pipeline reading the job's
    output (``| tee``, a CI runner) ends with the job, not with the collector's drain."""

    def relay() -> None:
        with open(fd, "rb", buffering=0) as alerts:
            for line in alerts:  # ends when the collector exits
                try:
                    sys.stderr.write(line.decode(errors="replace"))
                    sys.stderr.flush()
                except (OSError, ValueError):  # stderr closed: the log has every line
                    return

    thread = threading.Thread(target=relay, name="ranklog-collector-alerts", daemon=True)
    thread.start()
    return thread


def _reason(log: bytes) -> str:
    """The collector's own error line: its one-line CLI error, else its last error line."""
    lines = [line.strip() for line in log.decode(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("ranklog collect:"):
            return line.removeprefix("ranklog collect:").strip()
    errors = [line for line in lines if " ERROR " in line or "Error" in line]
    return (errors or lines or ["it exited without a word"])[-1]
