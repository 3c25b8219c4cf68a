"""A hung job is named: every rank heard, none stepping for much longer than the job's own
step interval (``job_stalled``, collector/hung.py), and an all-rank pause of the usual kind
(evaluation, checkpoint) is not."""

from __future__ import annotations

import re
from pathlib import Path

from ranklog.collector.hung import JobStall
from ranklog.collector.peers import Peer
from tests.conftest import read_jsonl
from tests.test_watch import top_json, torchrun, wait_for

DDP = {"all_reduce": True, "steps": 80, "step_delay": 0.1}  # about 9 steps/s on 2 ranks


def job_events(out: Path) -> list[dict[str, object]]:
    return [e for e in read_jsonl(out / ".ranklog" / "events.jsonl")
            if str(e["event"]).startswith("job_")]  # fmt: skip


class TestHungDDPJob:
    """One rank sleeps inside a step; the other blocks in the next all_reduce."""

    def test_named_job_stalled_then_resumed(self, tmp_path: Path) -> None:
        out = tmp_path / "out"
        job = torchrun({**DDP, "kwargs": {"output_dir": str(out)},
                        "env": {"RANKLOG_JOB_STALL_TIMEOUT": "6"},
                        "sleep": {"rank": 1, "step": 30, "seconds": 14}})  # fmt: skip
        try:
            snapshot = wait_for(
                lambda: (out / ".ranklog" / "status.json").exists()
                and (s := top_json("--output-dir", str(out)))["job_stalled_s"] is not None
                and s,
                60, "top's header naming the stalled job",
            )  # fmt: skip
        finally:
            output, _ = job.communicate(timeout=120)
        assert job.returncode == 0, output
        assert snapshot["job_stalled_s"] >= 6
        assert {row["state"] for row in snapshot["ranks"]} == {"running"}  # no rank behind
        stalled, resumed = job_events(out)
        assert (stalled["event"], resumed["event"]) == ("job_stalled", "job_resumed")
        # The rule: max(6 s floor, 20 intervals of ~0.11 s, no pause before): 6 s, said
        # within the once-a-second check after it.
        assert stalled["threshold"] == 6.0
        assert 6.0 <= float(stalled["seconds"]) <= 8.0, stalled  # type: ignore[arg-type]
        assert stalled["step"] == 29 and stalled["ranks"] == 2
        assert re.search(r"^ranklog collector: job \S+ looks hung: all 2 ranks", output, re.M)
        assert re.search(r"^ranklog collector: job \S+ is stepping again", output, re.M)


class TestAllRankPause:
    """An evaluation or checkpoint pause of every rank is no hang in the common case."""

    def test_a_20s_pause_after_steady_stepping_is_not_named(self, tmp_path: Path) -> None:
        out = tmp_path / "out"
        job = torchrun({**DDP, "kwargs": {"output_dir": str(out)},
                        "sleep": {"step": 50, "seconds": 20}})  # fmt: skip
        output, _ = job.communicate(timeout=180)
        assert job.returncode == 0, output
        events = read_jsonl(out / ".ranklog" / "events.jsonl")
        finished = [e for e in events if e["event"] == "rank_finished"]
        assert len(finished) == 2, events  # the job ran through its pause
        assert job_events(out) == [], events
        assert "looks hung" not in output


def peer(rank: int, stepped_at: float, step: int, best: float = 5.0) -> Peer:
    p = Peer(rank=rank, world_size=2, host="h", pid=rank)
    p.progress.advanced_at, p.progress.step, p.progress.best = stepped_at, step, best
    return p


class TestRule:
    """The threshold learns the job's pauses: one it came back from is tolerated twice over."""

    def test_a_pause_it_came_back_from_raises_the_threshold(self) -> None:
        watch = JobStall(floor=10.0)
        job = {0: peer(0, 100.0, 50), 1: peer(1, 100.0, 50)}
        assert watch.check("run", job, 105.0) == []
        assert watch.threshold(job) == 10.0  # max(10, 20 x 0.2 s, no pause yet)
        [(name, fields)] = watch.check("run", job, 111.0)
        assert name == "job_stalled" and fields["seconds"] == 11.0
        job[0].progress.advanced_at = 130.0  # an evaluation of 30 s ended
        [(name, fields)] = watch.check("run", job, 130.5)
        assert name == "job_resumed"
        assert watch.threshold(job) == 60.0
        assert watch.check("run", job, 185.0) == []  # 55 s: within twice the last pause
        # A new job learns anew: 55 s is over its 10 s.
        assert [name for name, _ in watch.check("other", job, 185.0)] == ["job_stalled"]
