"""Rank 0 restarts its embedded collector when it dies mid-job (rank/supervisor.py): real
torchrun jobs (tests/supervise_job.py) and real ``ranklog collect`` processes, killed
with SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ranklog.rank.embedded import EmbeddedCollector
from ranklog.rank.supervisor import Supervisor
from tests.conftest import read_jsonl
from tests.test_delivery import tensorboard_loss_steps
from tests.test_setup import _free_port_pair

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
MARKER = Path(".ranklog", "collector.json")
RESTARTED = "restarted it (pid"


def until(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def collector_pid(out: Path, not_in: set[int]) -> int | None:
    """The pid in the collector's owner record, once it is a live one not in ``not_in``."""
    try:
        pid = json.loads((out / MARKER).read_text())["pid"]
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError):
        return None
    return None if pid in not_in else int(pid)


def serving(out: Path, killed: set[int]) -> int | None:
    """The pid of a collector new to ``killed`` once it listens on ``out``'s endpoint."""
    log = out / "ranklog-collector.log"
    started = log.read_text().count("collector listening on") if log.exists() else 0
    return collector_pid(out, killed) if started > len(killed) else None


def jsonl_rows(out: Path) -> int:
    path = out / "training_params_and_metrics_global0.jsonl"
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def kill_collector(out: Path, killed: set[int]) -> None:
    """Once a collector new to ``killed`` serves ``out`` and records land, kill -9 it."""
    pid = until(lambda: collector_pid(out, killed), 60, "a (re)started collector")
    assert isinstance(pid, int)
    landed = jsonl_rows(out)
    until(lambda: jsonl_rows(out) > landed + 20, 60, "records landing")
    os.kill(pid, signal.SIGKILL)
    killed.add(pid)


def torchrun(out: Path, nodes: int) -> list[subprocess.Popen[str]]:
    """This file as a 2-rank job: one agent with 2 ranks (ipc://), or two agents as two
    nodes (TCP with the job's CURVE keys)."""
    job = ["tests/supervise_job.py", str(out)]
    if nodes == 1:
        launches = [["--standalone", "--nproc-per-node", "2"]]
    else:
        port = _free_port_pair()
        launches = [["--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                     "--master-addr", "127.0.0.1", "--master-port", str(port)]
                    for node in (0, 1)]  # fmt: skip
    return [
        subprocess.Popen(
            [str(TORCHRUN), *launch, *job],
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for launch in launches
    ]


class TestCollectorKilledTwice:
    """kill -9 of the embedded collector, twice mid-job: rank 0 restarts it each time and
    every record lands once, with no replay by hand."""

    @pytest.mark.parametrize("nodes", [1, 2], ids=["one-node-ipc", "two-nodes-curve"])
    def test_every_record_lands_once(self, tmp_path: Path, nodes: int) -> None:
        out = tmp_path / "out"
        agents = torchrun(out, nodes)
        try:
            killed: set[int] = set()
            kill_collector(out, killed)
            kill_collector(out, killed)
            until(lambda: collector_pid(out, killed), 60, "the second restart")
            landed = jsonl_rows(out)
            until(lambda: jsonl_rows(out) > landed + 20, 60, "records after the restart")
            (out / "stop").touch()
            results = [agent.communicate(timeout=90) for agent in agents]
        finally:
            for agent in agents:
                agent.kill()
        for agent, (_, err) in zip(agents, results, strict=True):
            assert agent.returncode == 0, err[-3000:]
        stdout = "".join(o for o, _ in results)
        steps = {int(r): int(n) for r, n in (line.split()[1:3] for line in
                 stdout.splitlines() if line.startswith("logged"))}  # fmt: skip
        assert sorted(steps) == [0, 1], stdout
        for rank, n in steps.items():
            rows = read_jsonl(out / f"training_params_and_metrics_global{rank}.jsonl")
            counts = Counter(row["step"] for row in rows if "step" in row)
            assert sorted(counts) == list(range(n)) and set(counts.values()) == {1}
        tensorboard = Counter(tensorboard_loss_steps(out / "supervised"))  # rank 0's records
        assert sorted(tensorboard) == list(range(steps[0])) and set(tensorboard.values()) == {1}
        rank0_err = results[0][1]
        restarts = [line for line in rank0_err.splitlines() if RESTARTED in line]
        assert len(restarts) == 2, rank0_err[-3000:]
        assert all("was killed by SIGKILL" in line for line in restarts), restarts
        assert all(str(out / "ranklog-collector.log") in line for line in restarts), restarts


@pytest.fixture
def collector() -> Iterator[EmbeddedCollector]:
    """An embedded collector's settings for a one-rank job on a short ipc:// path."""
    folder = Path(tempfile.mkdtemp(prefix="rl-sup-", dir="/tmp"))
    yield EmbeddedCollector(f"ipc://{folder}/c.ipc", folder / "out", 1, ["--logger-type", "async"])
    live = collector_pid(folder / "out", set())
    if live is not None:
        os.kill(live, signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)


class TestBounds:
    """Restarts are bounded; an exit on purpose is never restarted."""

    def test_past_three_restarts_one_loud_line(
        self, collector: EmbeddedCollector, capsys: pytest.CaptureFixture[str]
    ) -> None:
        supervisor = Supervisor(collector)
        killed: set[int] = set()
        for _ in range(4):
            pid = until(lambda: serving(collector.output_dir, killed), 60, "a collector")
            assert isinstance(pid, int)
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        until(lambda: not supervisor.watching, 30, "the supervisor to give up")
        assert supervisor.wait(0) == -signal.SIGKILL
        lines = capsys.readouterr().err.splitlines()
        assert len([line for line in lines if RESTARTED in line]) == 3, lines
        (loud,) = [line for line in lines if "NOT RESTARTING" in line]
        assert "3 restarts within 10 min" in loud
        assert str(collector.output_dir / ".ranklog" / "spill") in loud
        assert collector_pid(collector.output_dir, killed) is None  # and none was started

    @pytest.mark.parametrize("how", ["sigterm", "stopped", "not-wanted"])
    def test_an_exit_on_purpose_is_left_alone(
        self, collector: EmbeddedCollector, capsys: pytest.CaptureFixture[str], how: str
    ) -> None:
        """SIGTERM (the collector drains, exits 0); rank 0 closing (``stop()``, as
        ``finish_metric_logger`` and exit do); rank 0's handlers closed (a signal)."""
        supervisor = Supervisor(collector, wanted=lambda: how != "not-wanted")
        pid = until(lambda: serving(collector.output_dir, set()), 60, "a collector")
        assert isinstance(pid, int)
        if how == "stopped":
            supervisor.stop()
        os.kill(pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        until(lambda: not supervisor.watching, 30, "the supervisor to let go")
        assert supervisor.wait(0) == (0 if how == "sigterm" else -signal.SIGKILL)
        assert RESTARTED not in capsys.readouterr().err
        assert collector_pid(collector.output_dir, {pid}) is None


class TestRankZeroCloses:
    """setup_metric_logger in this process as a one-rank job: once rank 0's handler is
    closed (at exit, or by a signal), a collector that dies is not restarted."""

    def test_a_collector_killed_after_rank_0_closed_stays_down(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        from ranklog.rank import setup

        monkeypatch.setenv("TORCHELASTIC_RUN_ID", f"supervise-{os.getpid()}-{time.time_ns()}")
        out = tmp_path / "out"
        handler = setup.setup_metric_logger("async", None, str(out), close_timeout=1)
        assert handler is not None and setup._embedded_collector is not None
        supervisor = setup._embedded_collector
        pid = until(lambda: serving(out, set()), 60, "the collector")
        assert isinstance(pid, int)
        handler.close()  # what logging.shutdown() at exit does, and a SIGTERM's spill
        os.kill(pid, signal.SIGKILL)
        until(lambda: not supervisor.watching, 30, "the supervisor to let go")
        assert setup.finish_metric_logger(timeout=5) == -signal.SIGKILL
        assert RESTARTED not in capsys.readouterr().err
