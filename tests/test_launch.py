"""Launch mistakes, made with real rank processes: named in the collector's log, in
``events.jsonl`` and in ``ranklog top``; the exit rule follows what the ranks report."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ranklog.collector.events import EVENTS_FILE
from tests.conftest import CollectorProcess, ranklog, read_jsonl
from tests.ranks import finish, start_rank


def events(out: Path, name: str) -> list[dict[str, Any]]:
    path = out / EVENTS_FILE
    return [e for e in read_jsonl(path) if e["event"] == name] if path.exists() else []


def top_states(out: Path) -> list[str]:
    done = ranklog("top", "--once", "--json", "--output-dir", str(out))
    return [row["state"] for row in json.loads(done.stdout)["ranks"]] if done.stdout else []


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)


class TestRankClaimedTwice:
    """Two live processes that both say they are rank 0 of one job."""

    def test_both_processes_are_named(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        out = tmp_path / "out"
        c = collector(output_dir=out)
        twins = [start_rank(c.endpoint, 0, 1, 80, "--step-delay", "0.1") for _ in range(2)]
        wait_for(lambda: "two live processes claim rank 0" in c.log(), 30, "the log line")
        wait_for(lambda: any("rank 0 twice" in s for s in top_states(out)), 30, "top's state")
        finish(twins)
        wait_for(lambda: events(out, "rank_claimed_twice"), 10, "the event")
        (line,) = [ln for ln in c.log().splitlines() if "two live processes claim" in ln]
        assert all(f"pid {twin.pid}" in line for twin in twins), line
        (claimed,) = events(out, "rank_claimed_twice")
        assert claimed["rank"] == 0 and claimed["run"] == "test"
        assert sorted(pid for _, pid, _ in claimed["processes"]) == sorted(t.pid for t in twins)

    def test_a_restarted_rank_is_no_mistake(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        """The rank killed, then started again at once: its predecessor is heard no more."""
        out = tmp_path / "out"
        c = collector(output_dir=out)
        first = start_rank(c.endpoint, 0, 1, 1000, "--step-delay", "0.01", "--say-steps")
        assert first.stderr is not None
        while "logged step 20" not in first.stderr.readline():
            pass
        first.kill()
        first.wait()
        finish([start_rank(c.endpoint, 0, 1, 50, "--step-delay", "0.05")])
        assert "claim rank" not in c.log() and not events(out, "rank_claimed_twice")


class TestWorldSize:
    """Ranks whose world size is not --world-size's, or not each other's."""

    def test_the_exit_rule_follows_the_ranks(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        """--world-size 4 --exit-when-done, ranks of a world of 2: said, and done with 2."""
        out = tmp_path / "out"
        c = collector("--world-size", "4", "--exit-when-done", output_dir=out)
        ranks = [start_rank(c.endpoint, r, 2, 60, "--step-delay", "0.1") for r in (0, 1)]
        wait_for(lambda: any("not --world-size 4" in s for s in top_states(out)), 30, "top")
        finish(ranks)
        assert c.wait(60) == 0, c.log()
        wait_for(lambda: events(out, "world_size_mismatch"), 10, "the event")
        line = "the ranks report world size 2, not --world-size 4; the exit rule follows"
        assert c.log().count(line) == 1, c.log()
        (mismatch,) = events(out, "world_size_mismatch")
        assert mismatch["expected"] == 4 and list(mismatch["reported"]) == ["2"]

    def test_ranks_that_disagree_are_waited_for_with_the_reason(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        out = tmp_path / "out"
        c = collector("--world-size", "2", "--exit-when-done", "--status-interval", "1",
                      output_dir=out)  # fmt: skip
        finish([start_rank(c.endpoint, 0, 2, 20), start_rank(c.endpoint, 1, 3, 20)])
        said = "the ranks disagree on the world size: 2 (rank 0), 3 (rank 1)"
        wait_for(lambda: said in c.log(), 30, "the disagreement line")
        waiting = "waiting for rank(s) 2 to connect (the ranks disagree on the world size"
        wait_for(lambda: waiting in c.log(), 30, "the status line's reason")
        assert c.proc.poll() is None  # rank 2 of a world of 3 may still come
        wait_for(lambda: events(out, "world_size_mismatch"), 10, "the event")
        (mismatch,) = events(out, "world_size_mismatch")
        assert mismatch["reported"] == {"2": [0], "3": [1]}
