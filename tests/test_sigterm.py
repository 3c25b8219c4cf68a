"""SIGTERM (Slurm's scancel, a pod deletion, torchrun's tear-down) loses nothing: each rank
spills first, names its spill in one line, and the signal then does what it would have done."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ranklog.journal import read_file, spill_path
from tests.conftest import CollectorProcess, start_collector
from tests.ranks import REPO
from tests.test_delivery import assert_exactly_once, wait_for

TORCHRUN = Path(sys.executable).with_name("torchrun")
BEFORE, BURST = 100, 60_000


def start_job(spec: dict[str, object], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``tests/signal_job.py`` under ``torchrun --standalone --nproc-per-node 2``."""
    return subprocess.Popen(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "tests/signal_job.py",
         json.dumps(spec)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})}, start_new_session=True,
    )  # fmt: skip


def burst_then_sigterm(job: subprocess.Popen[str], talk: Path, collector_pid: int | None) -> str:
    """Once both ranks delivered their first steps: stop the collector (SIGSTOP), let the
    ranks log a burst it cannot absorb, SIGTERM torchrun, let the collector go on. Returns
    the job's stderr (torchrun's and the ranks')."""
    try:
        wait_for(lambda: all((talk / f"ready{r}").exists() for r in (0, 1)), 120)
        pid = collector_pid or int((talk / "ready0").read_text())
        os.kill(pid, signal.SIGSTOP)
        try:
            (talk / "go").touch()
            wait_for(lambda: all((talk / f"burst{r}").exists() for r in (0, 1)), 60)
            for rank in (0, 1):
                burst = json.loads((talk / f"burst{rank}").read_text())
                assert burst == {"logged": BEFORE + BURST, "held": burst["held"]}
                assert burst["held"] >= 50_000, burst  # not absorbed by the collector
            job.send_signal(signal.SIGTERM)
            _, err = job.communicate(timeout=60)
        finally:
            os.kill(pid, signal.SIGCONT)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(10)
    return err


def spill_lines(err: str, rank: int) -> list[str]:
    return [line for line in err.splitlines()
            if f"ranklog: rank {rank} got SIGTERM" in line and ".spill" in line]  # fmt: skip


class TestEmbedded:
    """The embedded default: its collector takes in the spills before it exits by itself."""

    def test_burst_is_spilled_and_ingested(self, tmp_path: Path) -> None:
        out, talk = tmp_path / "out", tmp_path / "talk"
        talk.mkdir()
        job = start_job({"kwargs": {"output_dir": str(out)}, "dir": str(talk),
                         "before": BEFORE, "burst": BURST})  # fmt: skip
        err = burst_then_sigterm(job, talk, None)
        for rank in (0, 1):
            (line,) = spill_lines(err, rank)
            assert str(spill_path(out)) in line, line
        marker = out / ".ranklog" / "collector.json"
        wait_for(lambda: not marker.exists(), 60)  # it exits by itself
        assert not list(spill_path(out).glob("*.spill"))
        assert_exactly_once(out, 2, BEFORE + BURST)
        log = (out / "ranklog-collector.log").read_text()
        assert log.count("ingested spill") == 2, log

    def test_the_scripts_own_handler_still_runs(self, tmp_path: Path) -> None:
        """A SIGTERM handler installed before setup runs after the spill; its exit code is
        the rank's (torchrun reports it)."""
        out, talk = tmp_path / "out", tmp_path / "talk"
        talk.mkdir()
        job = start_job({"kwargs": {"output_dir": str(out)}, "dir": str(talk),
                         "before": BEFORE, "burst": BURST, "own_handler": 7})  # fmt: skip
        err = burst_then_sigterm(job, talk, None)
        assert err.count("own handler ran") == 2, err[-3000:]
        marker = out / ".ranklog" / "collector.json"
        wait_for(lambda: not marker.exists(), 60)
        assert_exactly_once(out, 2, BEFORE + BURST)


class TestStandalone:
    """A collector of its own: the spill lands where the README says (here the rank's
    local folder: the ranks' output dir has no .ranklog/), the rank's line names it, and
    the README's recovery steps bring everything in."""

    def test_recovery_steps_bring_everything_in(
        self, tmp_path: Path, local_spill_folder: Path
    ) -> None:
        out, talk = tmp_path / "out", tmp_path / "talk"
        talk.mkdir()
        c: CollectorProcess = start_collector(out, "--world-size", "2")
        try:
            spec = {"kwargs": {"endpoint": c.endpoint, "output_dir": str(tmp_path / "logs")},
                    "dir": str(talk), "before": BEFORE, "burst": BURST}  # fmt: skip
            err = burst_then_sigterm(start_job(spec), talk, c.proc.pid)
            files = []
            for rank in (0, 1):
                (line,) = spill_lines(err, rank)
                (path,) = re.findall(r"spilled to (\S+\.spill)", line)
                assert Path(path).parent == local_spill_folder, line
                assert f"move the file into {tmp_path / 'logs'}/.ranklog/spill/" in line, line
                files.append(Path(path))
            for path in files:  # the README: move it into <output-dir>/.ranklog/spill/
                shutil.move(path, spill_path(out) / path.name)
            wait_for(lambda: c.log().count("ingested spill") == 2, 60)  # within 2 s, loaded
        finally:
            c.terminate()
            assert c.wait(60) == 0, c.log()
        assert_exactly_once(out, 2, BEFORE + BURST)


class TestExitStatus:
    """The signal does what it would have done: the same exit status as without ranklog."""

    SCRIPT = """
import logging, signal, sys, time
from ranklog import ZMQSocketHandler
if sys.argv[2] == "own":
    signal.signal(signal.SIGTERM, lambda n, f: sys.exit(5))
handler = ZMQSocketHandler(sys.argv[1], rank=0, world_size=1, spill_dir=sys.argv[3],
                           close_timeout=30)
logging.getLogger("m").addHandler(handler)
for step in range(1000):
    logging.getLogger("m").warning({"loss": 1.0}, extra={"step": step})
print("logged", flush=True)
time.sleep(60)
"""

    def run(self, tmp_path: Path, mode: str, env: dict[str, str]) -> tuple[int, str]:
        # A collector that never answers: everything stays unacknowledged.
        proc = subprocess.Popen(
            [sys.executable, "-c", self.SCRIPT, "tcp://127.0.0.1:9", mode, str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
            env={**os.environ, **env},
        )  # fmt: skip
        assert proc.stdout is not None
        assert proc.stdout.readline() == "logged\n"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        # Bounded (about 2 s; SIGKILL comes later), not the close timeout of 30 s.
        assert time.monotonic() - started < 15
        return proc.returncode, err

    def test_default_action_status_and_the_spill(self, tmp_path: Path) -> None:
        code, err = self.run(tmp_path, "default", {})
        assert code == -signal.SIGTERM
        (line,) = [line for line in err.splitlines() if "got SIGTERM" in line]
        (path,) = re.findall(r"spilled to (\S+\.spill)", line)
        assert "1000 record(s) are spilled" in line
        assert len(list(read_file(Path(path)))) >= 1000  # records and its goodbye

    def test_own_handler_status(self, tmp_path: Path) -> None:
        code, err = self.run(tmp_path, "own", {})
        assert code == 5, err

    def test_turned_off(self, tmp_path: Path) -> None:
        code, err = self.run(tmp_path, "default", {"RANKLOG_HANDLE_SIGNALS": "0"})
        assert code == -signal.SIGTERM
        assert "got SIGTERM" not in err
        assert not list(tmp_path.glob("*.spill"))
