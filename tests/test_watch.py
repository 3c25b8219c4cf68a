"""Watching a job, end to end: ``ranklog top`` (``--once --json``, and live in tmux), stall
events, straggler scores, and ``/metrics`` scraped by a real Prometheus server.

Where tmux or Prometheus cannot be had the tests that need them skip with the reason;
``RANKLOG_REQUIRE_TMUX=1`` / ``RANKLOG_REQUIRE_PROMETHEUS=1`` (set by ``.ci/run``) make that
a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CollectorProcess, read_jsonl
from tests.ranks import finish, start_rank

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
PROMETHEUS = Path("/usr/bin/prometheus")


def not_here(tool: str, reason: str) -> None:
    """Skip with ``reason``, or fail where ``RANKLOG_REQUIRE_<TOOL>=1`` requires the tool."""
    require = f"RANKLOG_REQUIRE_{tool.upper()}"
    if os.environ.get(require) == "1":
        pytest.fail(f"{reason}; {require}=1 requires the {tool} tests", pytrace=False)
    pytest.skip(f"{tool} test skipped: {reason}")


def top_json(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "ranklog", "top", "--once", "--json", *args],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    snapshot: dict[str, Any] = json.loads(done.stdout)
    return snapshot


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def mid_run(output_dir: Path, ranks: int) -> Callable[[], dict[str, Any] | None]:
    """A snapshot in which every one of ``ranks`` ranks is running and has stepped."""

    def check() -> dict[str, Any] | None:
        if not (output_dir / ".ranklog" / "status.json").exists():
            return None
        snapshot = top_json("--output-dir", str(output_dir))
        rows = snapshot["ranks"]
        stepping = [r for r in rows if r["state"] == "running" and (r["step"] or 0) > 0]
        return snapshot if len(stepping) == ranks else None

    return check


def torchrun(spec: dict[str, object]) -> subprocess.Popen[str]:
    """``tests/setup_job.py`` under torchrun with 2 ranks, in the background."""
    return subprocess.Popen(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "tests/setup_job.py",
         json.dumps(spec)],
        env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def stepping(endpoint: str, rank: int, world_size: int, records: int, *extra: str) -> Any:
    return start_rank(endpoint, rank, world_size, records, *extra)


class TestTopOnce:
    """``ranklog top --once --json`` mid-run shows every rank at its current step."""

    def test_standalone_collector_under_torchrun(self, collector: Any) -> None:
        c: CollectorProcess = collector()
        job = torchrun({"kwargs": {"endpoint": c.endpoint}, "steps": 100, "step_delay": 0.1})
        snapshot = wait_for(mid_run(c.output_dir, 2), 60, "both ranks stepping")
        assert sorted(row["rank"] for row in snapshot["ranks"]) == [0, 1]
        assert all(0 < row["step"] < 100 for row in snapshot["ranks"])
        assert snapshot["records_total"] > 0 and snapshot["run"]
        out, _ = job.communicate(timeout=120)
        assert job.returncode == 0, out

    def test_embedded_collector(self, tmp_path: Path) -> None:
        out = tmp_path / "out"
        job = torchrun({"kwargs": {"output_dir": str(out),
                                   "collector_args": ["--stall-timeout", "30"]},
                        "steps": 100, "step_delay": 0.1})  # fmt: skip
        try:
            snapshot = wait_for(mid_run(out, 2), 90, "both ranks stepping")
        finally:
            log, _ = job.communicate(timeout=120)
        assert job.returncode == 0, log
        assert sorted(row["rank"] for row in snapshot["ranks"]) == [0, 1]
        assert all(0 < row["step"] < 100 for row in snapshot["ranks"])
        assert snapshot["stall_timeout"] == 30  # collector_args reached the collector
        assert not (out / ".ranklog" / "status.json").exists()  # removed at exit

    def test_no_collector_is_one_line(self, tmp_path: Path) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "ranklog", "top", "--once", "--output-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=30, cwd=REPO,
        )  # fmt: skip
        assert done.returncode == 2
        assert done.stderr.startswith("ranklog top: no collector is serving")
        assert len(done.stderr.splitlines()) == 1


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[list[str]]:
    """A private tmux server (its own socket); killed at the end."""
    if shutil.which("tmux") is None:
        not_here("tmux", "tmux is not installed (apt-get install -y tmux)")
    base = ["tmux", "-S", str(tmp_path / "tmux.sock")]
    yield base
    subprocess.run([*base, "kill-server"], capture_output=True, check=False)


ROW = re.compile(r"^\W*(\d+)\s*│\s*(\S+)\s*│\s*(\S+)\s*│\s*(\d+)\s*│", re.MULTILINE)


class TestTopInATerminal:
    """``ranklog top`` draws a live table in a real terminal (tmux)."""

    def test_steps_advance_between_captures(self, collector: Any, tmux: list[str]) -> None:
        c: CollectorProcess = collector()
        ranks = [stepping(c.endpoint, r, 2, 300, "--step-delay", "0.1") for r in (0, 1)]
        # The terminal's own size, not one pytest may have exported.
        command = (f"env -u COLUMNS -u LINES {sys.executable} -m ranklog top "
                   f"--output-dir {c.output_dir} --metric loss")  # fmt: skip
        subprocess.run([*tmux, "new-session", "-d", "-x", "160", "-y", "40", "-c", str(REPO),
                        command], check=True)  # fmt: skip

        def rows() -> dict[int, int]:
            screen = subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True,
                                    text=True, check=True).stdout  # fmt: skip
            screens.append(screen)
            found = {int(rank): int(step) for rank, _, _, step in ROW.findall(screen)}
            return found if len(found) == 2 and all(found.values()) else {}

        screens: list[str] = []
        try:
            first = wait_for(rows, 30, "a row per rank in tmux")
        except AssertionError:
            raise AssertionError(f"no row per rank in tmux; the screen:\n{screens[-1:]}") from None
        time.sleep(2.5)
        second = rows()
        assert second.keys() == {0, 1}
        for proc in ranks:
            proc.kill()
        assert all(second[rank] > first[rank] for rank in (0, 1)), (first, second)

    def test_q_quits(self, collector: Any, tmux: list[str]) -> None:
        c: CollectorProcess = collector()
        ranks = [stepping(c.endpoint, 0, 1, 300, "--step-delay", "0.1")]
        screen = top_in_tmux(tmux, c.output_dir)
        wait_for(lambda: ROW.search(screen()), 30, "top's table")
        assert "q quits" in screen()
        subprocess.run([*tmux, "send-keys", "q"], check=True)
        wait_for(lambda: "top exited 0" in screen(), 10, "top to exit on q")
        for proc in ranks:
            proc.kill()

    def test_says_once_that_its_collector_exited(self, collector: Any, tmux: list[str]) -> None:
        c: CollectorProcess = collector()
        ranks = [stepping(c.endpoint, 0, 1, 20, "--step-delay", "0.1")]
        screen = top_in_tmux(tmux, c.output_dir)
        wait_for(lambda: ROW.search(screen()), 30, "top's table")
        finish(ranks)
        c.terminate(signal.SIGTERM)
        assert c.wait(60) == 0, c.log()
        shown = wait_for(lambda: "top exited" in screen() and screen(), 20, "top to exit")
        assert "top exited 0" in shown, shown
        assert shown.count(f"the collector serving {c.output_dir} has exited") == 1, shown
        assert "retrying" not in shown, shown


def top_in_tmux(tmux: list[str], output_dir: Path) -> Callable[[], str]:
    """``ranklog top`` live in a tmux pane that stays after it exits; the pane's text."""
    command = (f"env -u COLUMNS -u LINES {sys.executable} -m ranklog top --output-dir "
               f"{output_dir}; echo top exited $?; sleep 60")  # fmt: skip
    subprocess.run([*tmux, "new-session", "-d", "-x", "200", "-y", "40", "-c", str(REPO),
                    command], check=True)  # fmt: skip
    return lambda: subprocess.run([*tmux, "capture-pane", "-p", "-J"], capture_output=True,
                                  text=True, check=True).stdout  # fmt: skip


class TestStalls:
    """A rank that is heard but stops stepping while others step is stalled, then resumes."""

    def test_sleeping_rank_stalls_and_resumes(self, collector: Any) -> None:
        c: CollectorProcess = collector("--stall-timeout", "5")
        ranks = [
            stepping(c.endpoint, 0, 2, 360, "--step-delay", "0.05"),
            stepping(c.endpoint, 1, 2, 60, "--step-delay", "0.05", "--sleep-at", "40:15"),
        ]
        row = wait_for(lambda: [r for r in top_json("--output-dir", str(c.output_dir))["ranks"]
                                if r["state"] == "stalled"], 30, "rank 1 stalled")[0]  # fmt: skip
        # A stalled rank is not stepping: it scores 0, not "-".
        assert (row["rank"], row["relative"], row["individual"]) == (1, 0.0, 0.0), row
        finish(ranks)
        c.terminate(signal.SIGTERM)
        assert c.wait(60) == 0, c.log()
        events = read_jsonl(c.output_dir / ".ranklog" / "events.jsonl")
        progress = [(e["event"], e["rank"]) for e in events
                    if e["event"] in ("rank_stalled", "rank_resumed")]  # fmt: skip
        assert progress == [("rank_stalled", 1), ("rank_resumed", 1)], events
        stalled = next(e for e in events if e["event"] == "rank_stalled")
        assert stalled["step"] == 40
        assert "rank 1 (host" in c.log() and "stalled" in c.log()


class TestStragglers:
    """Relative straggler scores from the ranks' step cadence."""

    def test_a_rank_twice_as_slow_scores_half(self, collector: Any) -> None:
        c: CollectorProcess = collector()
        ranks = [stepping(c.endpoint, r, 3, 300, "--step-delay", "0.05") for r in (0, 1)]
        ranks.append(stepping(c.endpoint, 2, 3, 150, "--step-delay", "0.1"))
        started = time.monotonic()

        def scored() -> dict[int, float] | None:
            if time.monotonic() - started < 10:
                return None
            rows = top_json("--output-dir", str(c.output_dir))["ranks"]
            scores = {row["rank"]: row["relative"] for row in rows}
            return scores if len(scores) == 3 and None not in scores.values() else None

        scores = wait_for(scored, 30, "straggler scores")
        # Said once, as a warning (on the user's terminal: test_alerts.py).
        wait_for(lambda: "is a straggler" in c.log(), 10, "the straggler warning")
        finish(ranks)
        stragglers = re.findall(r"WARNING rank (\d+) \(host .* is a straggler", c.log())
        assert stragglers == ["2"], c.log()
        assert scores[2] == pytest.approx(0.5, abs=0.1), scores
        assert scores[0] > 0.9 and scores[1] > 0.9, scores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    """Start a real Prometheus server scraping ``127.0.0.1:<port>`` every second; returns
    its query URL. Never Debian's service: this process, its own config and storage."""
    if not PROMETHEUS.exists():
        not_here("prometheus", f"{PROMETHEUS} is missing (apt-get install -y prometheus)")
    started: list[subprocess.Popen[bytes]] = []

    def start(port: int) -> str:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: ranklog\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        )
        web = f"127.0.0.1:{free_port()}"
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - for its whole life
        started.append(subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={config}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={web}"],
            stdout=log, stderr=subprocess.STDOUT,
        ))  # fmt: skip
        return f"http://{web}/api/v1/query"

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(30)


def query(url: str, expression: str) -> list[dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{url}?query={expression}", timeout=5) as reply:
            result: list[dict[str, Any]] = json.load(reply)["data"]["result"]
            return result
    except OSError:  # not up yet
        return []


class TestPrometheus:
    """A real Prometheus server scrapes ``--metrics-port`` during a job."""

    def test_scraped_ranks_steps_and_records(self, collector: Any, prometheus: Any) -> None:
        port = free_port()
        c: CollectorProcess = collector("--metrics-port", str(port), "--export-metric", "loss")
        url = prometheus(port)
        ranks = [stepping(c.endpoint, r, 2, 300, "--step-delay", "0.1") for r in (0, 1)]
        try:
            steps = wait_for(lambda: len(query(url, "ranklog_rank_step")) == 2 and
                             query(url, "ranklog_rank_step"), 60, "ranklog_rank_step")  # fmt: skip
            records = wait_for(lambda: query(url, "ranklog_records_total"), 30, "records")
            loss = wait_for(lambda: query(url, "ranklog_metric"), 30, "ranklog_metric")
        finally:
            for proc in ranks:
                proc.kill()
        assert sorted(s["metric"]["rank"] for s in steps) == ["0", "1"]
        assert float(records[0]["value"][1]) > 0
        assert {s["metric"]["name"] for s in loss} == {"loss"}
