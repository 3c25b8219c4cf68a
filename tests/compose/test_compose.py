"""docker/compose.yaml end to end: a collector and 2 nodes x 2 ranks in containers.

The images are built from this checkout; the ranks run the demo trainer under torchrun with
c10d rendezvous across the node containers and log to the collector by its service name.
What the collector wrote to the host volume is read back with the backends' own readers:
``json`` for the JSONL files, TensorBoard's ``EventAccumulator`` for the event files.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.compose.compose_project import TIMINGS, ComposeRun, run

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

WORLD_SIZE = 4
RUN_TIMEOUT = 300  # compose up -> every container exited


def loss_rows(output_dir: Path, rank: int) -> list[dict[str, object]]:
    """The loss records of ``rank``'s JSONL file (complete lines only)."""
    path = output_dir / f"training_params_and_metrics_global{rank}.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]  # a line still being written has no newline yet
    rows = [json.loads(line) for line in lines if line.strip()]
    return [row for row in rows if "loss" in row]


def jsonl_problems(output_dir: Path, steps: int) -> list[str]:
    """Every (rank, step) must appear exactly once: what is missing, doubled or stray."""
    problems = []
    for rank in range(WORLD_SIZE):
        counts = Counter(row["step"] for row in loss_rows(output_dir, rank))
        missing = sorted(set(range(steps)) - set(counts))
        doubled = sorted(step for step, n in counts.items() if n > 1)
        stray = sorted(step for step in counts if step not in range(steps))  # type: ignore[operator]
        if missing:
            problems.append(f"rank {rank}: {len(missing)} step(s) missing, e.g. {missing[:10]}")
        if doubled:
            problems.append(f"rank {rank}: {len(doubled)} step(s) doubled, e.g. {doubled[:10]}")
        if stray:
            problems.append(f"rank {rank}: unexpected steps {stray[:10]}")
    return problems


def tensorboard_loss(output_dir: Path) -> tuple[list[tuple[int, float]], set[str]]:
    """Every ``loss`` scalar in the event files under ``output_dir``, and all scalar tags."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: list[tuple[int, float]] = []
    tags: set[str] = set()
    run_dirs = sorted({path.parent for path in output_dir.rglob("events.out.tfevents.*")})
    for run_dir in run_dirs:
        accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        accumulator.Reload()
        run_tags = accumulator.Tags()["scalars"]
        tags.update(run_tags)
        if "loss" in run_tags:
            points += [(event.step, event.value) for event in accumulator.Scalars("loss")]
    return points, tags


def tensorboard_problems(output_dir: Path, steps: int) -> list[str]:
    """TensorBoard must hold rank 0's loss once for every step, equal to its JSONL value."""
    points, tags = tensorboard_loss(output_dir)
    if not points:
        found = sorted(output_dir.rglob("events.out.tfevents.*"))
        return [f"no TensorBoard 'loss' scalars; event files {found}, scalar tags {sorted(tags)}"]
    problems = []
    counts = Counter(step for step, _ in points)
    missing = sorted(set(range(steps)) - set(counts))
    doubled = sorted(step for step, n in counts.items() if n > 1)
    if missing:
        problems.append(f"TensorBoard: {len(missing)} step(s) missing, e.g. {missing[:10]}")
    if doubled:
        problems.append(f"TensorBoard: {len(doubled)} step(s) doubled, e.g. {doubled[:10]}")
    rank0 = {row["step"]: row["loss"] for row in loss_rows(output_dir, 0)}
    wrong = [
        (step, value, rank0.get(step))
        for step, value in points
        if not math.isclose(value, float(rank0.get(step, math.nan)), rel_tol=1e-5)  # type: ignore[arg-type]
    ]
    if wrong:
        problems.append(
            f"TensorBoard: {len(wrong)} loss value(s) differ from rank 0's JSONL "
            f"(step, tensorboard, jsonl), e.g. {wrong[:5]}"
        )
    return problems


class TestCompose:
    """Four ranks in two containers log through one collector container."""

    def test_run_writes_every_rank_and_step(self, compose_run: ComposeRun) -> None:
        steps = 60
        compose_run.settings.update({"RANKLOG_STEPS": str(steps), "RANKLOG_STEP_DELAY": "0"})
        started = time.monotonic()
        compose_run.up()
        codes = compose_run.wait_exited(RUN_TIMEOUT)
        TIMINGS["compose run"] = time.monotonic() - started
        assert codes == dict.fromkeys(codes, 0), f"exit codes {codes}\n{compose_run.logs()}"

        output = compose_run.output_dir
        assert jsonl_problems(output, steps) == []
        for rank in range(WORLD_SIZE):
            for row in loss_rows(output, rank):
                assert isinstance(row["loss"], float)
                assert isinstance(row["timestamp"], str)
        assert tensorboard_problems(output, steps) == []

    def test_collector_killed_mid_run_loses_and_doubles_nothing(
        self, compose_run: ComposeRun
    ) -> None:
        steps = 150
        compose_run.settings.update({"RANKLOG_STEPS": str(steps), "RANKLOG_STEP_DELAY": "0.1"})
        started = time.monotonic()
        compose_run.up()
        output = compose_run.output_dir

        # Kill once every rank has records on disk and training is well under way.
        deadline = time.monotonic() + RUN_TIMEOUT
        while min(len(loss_rows(output, rank)) for rank in range(WORLD_SIZE)) < 30:
            if time.monotonic() > deadline:
                pytest.fail(f"no records reached the collector's files\n{compose_run.logs()}")
            time.sleep(0.2)
        collector = compose_run.ids["collector"]
        run(["docker", "kill", collector])  # SIGKILL: no drain, no goodbye
        written_at_kill = {rank: len(loss_rows(output, rank)) for rank in range(WORLD_SIZE)}
        nodes = {node: compose_run.state(node)[0] for node in ("node0", "node1")}
        assert set(nodes.values()) == {"running"}, (
            "the training finished before the collector was killed; the fault run proves "
            f"nothing: {nodes}\n" + compose_run.logs()
        )
        time.sleep(3)  # the ranks keep training and logging while no collector listens
        run(["docker", "start", collector])

        codes = compose_run.wait_exited(RUN_TIMEOUT)
        TIMINGS["compose fault run"] = time.monotonic() - started
        assert codes == dict.fromkeys(codes, 0), f"exit codes {codes}\n{compose_run.logs()}"
        assert min(written_at_kill.values()) < steps, written_at_kill

        problems = jsonl_problems(output, steps) + tensorboard_problems(output, steps)
        assert problems == [], (
            f"after killing the collector (loss lines per rank at the kill: {written_at_kill}):\n"
            + "\n".join(problems)
        )
