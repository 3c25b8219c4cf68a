"""Shared fixtures: real collector subprocesses on loopback, and clean logging state."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

READY = re.compile(r"listening on (\S+)")


@dataclass
class CollectorProcess:
    """A `ranklog collect` subprocess and the endpoint it bound."""

    proc: subprocess.Popen[str]
    endpoint: str
    output_dir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)


def start_collector(
    output_dir: Path,
    *args: str,
    bind: str = "tcp://127.0.0.1:*",
    timeout: float = 20.0,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
) -> CollectorProcess:
    """Start `python -m ranklog collect` and wait for its ready line."""
    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_path or output_dir.parent / f"{output_dir.name}-collector.log"
    log_file = open(log_path, "w")  # noqa: SIM115 - the process writes it for its whole life
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ranklog",
            "collect",
            "--bind",
            bind,
            "--output-dir",
            str(output_dir),
            *args,
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = READY.search(log_path.read_text())
        if match:
            return CollectorProcess(proc, match.group(1), output_dir, log_path)
        if proc.poll() is not None:
            raise AssertionError(f"collector exited early:\n{log_path.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"collector never became ready:\n{log_path.read_text()}")


# The compose test's stage timings, from its reports: under pytest-xdist the test runs in
# a worker, and only reports reach the process that prints the summary.
_COMPOSE_TIMINGS: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for name, value in report.user_properties:
        if name == "compose timings":
            _COMPOSE_TIMINGS.update(value)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _COMPOSE_TIMINGS:
        terminalreporter.write_line(
            "compose test timings: "
            + ", ".join(f"{stage} {seconds:.0f}s" for stage, seconds in _COMPOSE_TIMINGS.items())
        )


@pytest.fixture(scope="session", autouse=True)
def own_temp_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """What the tests' processes and their children (torchrun, W&B, the default ipc://
    endpoints) put in the temporary dir goes under pytest's own base folder, which pytest
    prunes, not into /tmp for good."""
    folder = tmp_path_factory.mktemp("tmp")
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = None  # computed again from TMPDIR
    yield folder
    if saved is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved
    tempfile.tempdir = None


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Callable[..., CollectorProcess]]:
    """Factory for collector subprocesses; any still running at the end are killed."""
    started: list[CollectorProcess] = []

    def factory(*args: str, output_dir: Path | None = None, **kwargs: object) -> CollectorProcess:
        c = start_collector(output_dir or tmp_path / "out", *args, **kwargs)  # type: ignore[arg-type]
        started.append(c)
        return c

    yield factory
    for c in started:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait(10)


@pytest.fixture(autouse=True)
def local_spill_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Ranks that cannot deliver spill into the test's folder, not the user's
    ``~/.local/state`` (subprocesses inherit it)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state" / "ranklog" / "spill"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Tests attach handlers to loggers; put every logger back as it was."""
    root = logging.getLogger()
    saved = {
        name: (lg.handlers[:], lg.level, lg.propagate, lg.filters[:])
        for name, lg in [("", root), *logging.Logger.manager.loggerDict.items()]
        if isinstance(lg, logging.Logger)
    }
    yield
    for name, lg in [("", root), *logging.Logger.manager.loggerDict.items()]:
        if not isinstance(lg, logging.Logger):
            continue
        handlers, level, propagate, filters = saved.get(name, ([], logging.NOTSET, True, []))
        for handler in lg.handlers:
            if handler not in handlers:
                handler.close()
        lg.handlers, lg.level, lg.propagate, lg.filters = handlers, level, propagate, filters


def read_jsonl(path: Path) -> list[dict[str, object]]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs: a disk that can really fill up."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield mount_point
    if os.environ.get("RANKLOG_KEEP_DISK"):
        subprocess.run(["cp", "-a", str(mount_point), str(tmp_path / "disk-copy")], check=False)
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def ranklog(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``ranklog`` command line (``python -m ranklog``) to completion."""
    return subprocess.run(
        [sys.executable, "-m", "ranklog", *args], capture_output=True, text=True, timeout=60
    )


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the collector runs its backends in a child process)."""
    tree = [pid]
    for member in tree:
        for task in Path(f"/proc/{member}/task").glob("*/children"):
            tree.extend(int(child) for child in task.read_text().split())
    return tree


def run_all_backends(
    collector: Callable[..., CollectorProcess], records: int, *rank_args: str, env: dict[str, str]
) -> CollectorProcess:
    """2 ranks into ``ranklog collect --logger-type async,tensorboard,wandb --run-name demo``,
    then SIGTERM; the collector must exit 0."""
    from tests.ranks import finish, start_rank

    c = collector("--logger-type", "async,tensorboard,wandb", "--run-name", "demo", env=env)
    finish([start_rank(c.endpoint, r, 2, records, *rank_args) for r in (0, 1)])
    c.terminate(signal.SIGTERM)
    assert c.wait(60) == 0, c.log()
    return c
