"""One output directory, many jobs: one TensorBoard run and one W&B run per job, live and
in ``ranklog replay``, and run names that do not depend on which rank came first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ranklog.backends.policies import ReducePolicy
from ranklog.backends.tensorboard import TensorBoardHandler
from tests.conftest import CollectorProcess, read_jsonl
from tests.ranks import finish, start_rank
from tests.test_delivery import tensorboard_loss_steps
from tests.test_policy import feed, rec
from tests.wandb_reader import offline_runs, read_run

BACKENDS = ("--logger-type", "async,tensorboard,wandb", "--run-name", "job_{time}")
STEPS = 20


def wandb_env(tmp_path: Path) -> dict[str, str]:
    """Offline W&B for a collector subprocess."""
    return {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
    }


def run_job(
    collector: Callable[..., CollectorProcess], env: dict[str, str], job: str, *args: str
) -> CollectorProcess:
    """A collector of its own for one job of 2 ranks, stopped (SIGTERM) when they are done."""
    c = collector(*args, env=env)
    finish([start_rank(c.endpoint, r, 2, STEPS, "--run-id", job, "--tag", job) for r in (0, 1)])
    c.terminate(signal.SIGTERM)
    assert c.wait(60) == 0, c.log()
    return c


def jsonl_rows(out: Path, rank: int) -> Counter[tuple[Any, Any]]:
    rows = read_jsonl(out / f"training_params_and_metrics_global{rank}.jsonl")
    return Counter((row["tag"], row["step"]) for row in rows)


def tensorboard_runs(out: Path) -> dict[str, list[int]]:
    """run folder -> its loss steps, for every folder TensorBoard finds a run in."""
    folders = {path.parent for path in out.rglob("events.out.tfevents.*")}
    return {folder.name: sorted(tensorboard_loss_steps(folder)) for folder in folders}


def wandb_runs(out: Path) -> dict[str, list[int]]:
    """W&B run id -> its steps, over every offline run segment under ``out``."""
    runs: dict[str, list[int]] = {}
    for path in offline_runs(out):
        run = read_run(path)
        runs.setdefault(run.run_id, []).extend(row["_step"] for row in run.history)
    return {run_id: sorted(steps) for run_id, steps in runs.items()}


class TestJobs:
    """Two jobs, one after the other, into one output directory (a collector each)."""

    def test_each_job_its_own_runs_live_and_replayed(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        out, env = tmp_path / "out", wandb_env(tmp_path)
        for job in ("job-a", "job-b"):
            run_job(collector, env, job, *BACKENDS)

        def assert_two_jobs() -> None:
            expected = Counter((job, step) for job in ("job-a", "job-b") for step in range(STEPS))
            assert jsonl_rows(out, 0) == expected and jsonl_rows(out, 1) == expected
            tensorboard = tensorboard_runs(out)
            assert len(tensorboard) == 2, tensorboard
            assert all(name.startswith("job_") for name in tensorboard)
            assert list(tensorboard.values()) == [list(range(STEPS))] * 2

        assert_two_jobs()
        live = wandb_runs(out)
        assert list(live.values()) == [list(range(STEPS))] * 2, live
        assert {read_run(path).name[:4] for path in offline_runs(out)} == {"job_"}

        replay = [sys.executable, "-m", "ranklog", "replay", "--output-dir", str(out)]
        done = subprocess.run(
            [*replay, "--from-start", *BACKENDS],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **env},
        )
        assert done.returncode == 0, done.stderr
        assert_two_jobs()  # the same two TensorBoard runs, rebuilt, not one merged
        replayed = {run: steps for run, steps in wandb_runs(out).items() if run not in live}
        # W&B cannot take rows back: a rebuild writes each job to a new run.
        assert list(replayed.values()) == [list(range(STEPS))] * 2, replayed

    def test_a_restarted_collector_starts_the_next_jobs_run(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        """A run name without ``{time}``: the second job's folder gets its run id."""
        out = tmp_path / "out"
        for job in ("first", "second"):
            run_job(collector, {}, job, "--logger-type", "tensorboard", "--run-name", "demo")
        assert tensorboard_runs(out) == {
            "demo": list(range(STEPS)),
            "demo_second": list(range(STEPS)),
        }


class Killed(BaseException):
    """A kill -9, where the test chooses: not an Exception, so no handler catches it."""


class TestJobsInOneHandler:
    """Job changes seen by one handler, record by record."""

    def test_tensorboard_switches_runs_and_rewinds_into_the_right_one(self, tmp_path: Path) -> None:
        handler = TensorBoardHandler(run_name="r", log_dir=tmp_path)
        handler.handle(rec(0, 0, {"loss": 0.0}, run_id="a"))
        state = handler.checkpoint()
        handler.handle(rec(0, 1, {"loss": 1.0}, run_id="a"))
        handler.handle(rec(0, 0, {"loss": 5.0}, run_id="b"))
        handler.flush()
        handler.rewind_to(state)  # a write error: back to step 0 of job a, read again
        handler.handle(rec(0, 1, {"loss": 1.0}, run_id="a"))
        handler.handle(rec(0, 0, {"loss": 5.0}, run_id="b"))
        handler.close()
        assert tensorboard_runs(tmp_path) == {"r": [0, 1], "r_b": [0]}
        restored = TensorBoardHandler(run_name="r", log_dir=tmp_path)
        restored.restore(handler.checkpoint() | {"files": {}})
        restored.handle(rec(0, 1, {"loss": 4.0}, run_id="b"))  # job b goes on in its folder
        restored.close()
        assert tensorboard_runs(tmp_path) == {"r": [0, 1], "r_b": [0, 1]}

    def test_killed_as_the_first_event_file_is_created_the_run_keeps_its_folder(
        self, tmp_path: Path
    ) -> None:
        """A kill -9 after the run's event file exists (its header written) but before the
        next checkpoint: the restart writes the job on in its folder, not in ``r_a``."""
        handler = TensorBoardHandler(run_name="r", log_dir=tmp_path)
        written: list[dict[str, Any]] = []  # the checkpoints, up to the kill

        def checkpoint_or_die() -> None:
            if any(tmp_path.rglob("events.out.tfevents.*")):
                raise Killed  # the event file exists: the process dies before checkpointing
            written.append(handler.checkpoint())

        handler.owned_files.on_open = checkpoint_or_die
        with pytest.raises(Killed):
            handler.handle(rec(0, 0, {"loss": 0.0}, run_id="a"))
        handler.close()  # the header only, as the killed process left it
        restarted = TensorBoardHandler(run_name="r", log_dir=tmp_path)
        restarted.restore(written[-1] if written else None)
        restarted.handle(rec(0, 0, {"loss": 0.0}, run_id="a"))  # the journal read again
        restarted.close()
        assert {path.parent.name for path in tmp_path.rglob("events.out.tfevents.*")} == {"r"}
        assert tensorboard_runs(tmp_path) == {"r": [0]}

    def test_a_reducing_policy_starts_each_job_afresh(self) -> None:
        policy = ReducePolicy("mean", world_size=2)
        first = feed(policy, *(rec(r, 5, {"loss": 1.0}, run_id="a") for r in (0, 1)))
        held = feed(policy, rec(0, 6, {"loss": 2.0}, run_id="a"))
        second = feed(policy, *(rec(r, 0, {"loss": 3.0}, run_id="b") for r in (0, 1)))
        assert [r.step for r in first] == [5] and held == []
        # Job a's held step goes out partial when job b begins; b's step 0 is not "late".
        assert [(r.step, r.run_id, r.partial) for r in second] == [
            (6, "a", True),
            (0, "b", False),
        ]

    def test_hparams_reach_the_backend_once_per_job(self) -> None:
        policy = ReducePolicy("mean", world_size=2)
        hparams = [
            rec(r, None, {"lr": 0.1}, hparams=True, run_id=job) for job in "aab" for r in (0, 1)
        ]
        assert [r.run_id for r in feed(policy, *hparams)] == ["a", "b"]

    def test_mlflow_starts_a_run_per_job(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        mlflow = pytest.importorskip("mlflow")
        from ranklog import MLflowHandler

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (tmp_path / "mlruns").as_uri()
        handler = MLflowHandler(run_name="m", tracking_uri=uri, experiment_name="jobs")
        run_ids = []
        for job in ("a", "b"):
            for step in range(2):
                handler.handle(rec(0, step, {"loss": 1.0}, run_id=job))
            run_ids.append(handler.run_id)
        handler.close()
        client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        assert len(set(run_ids)) == 2
        for run_id in run_ids:
            assert client.get_run(run_id).info.status == "FINISHED"
            assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1]


class TestRunNames:
    """``{rank}`` in a run name under a policy that merges ranks is the job's rank 0."""

    @pytest.mark.parametrize("name", ["mean", "max"])
    def test_a_merged_records_run_is_named_for_rank_0(self, name: str, tmp_path: Path) -> None:
        policy = ReducePolicy(name, world_size=2, timeout=1.0)
        (partial,) = feed(policy, rec(1, 0, {"loss": 1.0})) + policy.due(2.0)  # rank 1 alone
        assert partial.rank == 1 and partial.partial
        handler = TensorBoardHandler(run_name="myrun_{rank}", log_dir=tmp_path)
        handler.handle(partial)
        handler.close()
        assert handler.run_dir == tmp_path / "myrun_0"

    def test_tensorboard_folder_under_mean_is_myrun_0(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        """Rank 1 logs alone first (its steps go out partial), then rank 0."""
        c = collector(
            "--logger-type",
            "tensorboard",
            "--run-name",
            "myrun_{rank}",
            "--policy",
            "tensorboard=mean",
            "--policy-timeout",
            "0.2",
        )
        finish([start_rank(c.endpoint, 1, 2, 3)])
        finish([start_rank(c.endpoint, 0, 2, 3, "--first-step", "3")])
        c.terminate(signal.SIGTERM)
        assert c.wait(60) == 0, c.log()
        assert list(tensorboard_runs(tmp_path / "out")) == ["myrun_0"]
