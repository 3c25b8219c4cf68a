"""ranklog.integrations end to end: a real 2-process DDP job (gloo, CPU) per framework, its
JSONL and TensorBoard read back, and a job that raises mid-way.

HuggingFace runs under ``torchrun``, Lightning under its own launcher, Accelerate under
``accelerate launch``. Where a framework is not installed its tests skip with the reason;
``RANKLOG_REQUIRE_INTEGRATIONS=1`` (set by ``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ranklog import ConfigError
from ranklog.integrations._session import RankSession, check_settings
from tests.conftest import read_jsonl
from tests.ranks import REPO
from tests.test_delivery import tensorboard_loss_steps
from tests.test_tensorboard import accumulator, hparams_written
from tests.test_watch import mid_run, wait_for
from tests.witness import noted

BIN = Path(sys.executable).parent
CRASH_AFTER = 10


def framework(module: str) -> None:
    """Skip without ``module``, or fail where RANKLOG_REQUIRE_INTEGRATIONS=1 requires it."""
    if importlib.util.find_spec(module) is not None:
        return
    reason = f"{module} is not installed (pip install 'ranklog[integrations]')"
    if os.environ.get("RANKLOG_REQUIRE_INTEGRATIONS") == "1":
        pytest.fail(f"{reason}; RANKLOG_REQUIRE_INTEGRATIONS=1 requires it", pytrace=False)
    pytest.skip(reason)


def launch(command: list[str], spec: dict[str, Any]) -> subprocess.Popen[str]:
    """A job from tests/, started as a user would, with nothing to download."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(Path(spec["work_dir"]) / "hf"),
        "ACCELERATE_USE_CPU": "1",
    }
    return subprocess.Popen(
        [*command, json.dumps(spec)], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def ended(job: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str]:
    try:
        out, _ = job.communicate(timeout=timeout)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, 9)
            job.wait(10)
    return job.returncode, out


def spec_for(tmp_path: Path, name: str, *, tensorboard: bool = True, **more: Any) -> dict[str, Any]:
    base = tmp_path / name
    settings = {"output_dir": str(base / "out")}
    if tensorboard:
        settings["tensorboard_log_dir"] = str(base / "tb")
    return {"settings": settings, "work_dir": str(base / "work"),
            "witness": str(base / "witness"), **more}  # fmt: skip


def collector_gone(spec: dict[str, Any]) -> None:
    """The embedded collector exits by itself once it took in every rank's records."""
    marker = Path(spec["settings"]["output_dir"]) / ".ranklog" / "collector.json"
    wait_for(lambda: not marker.exists(), 60, "the collector to finish")


def steps_with(rows: list[dict[str, Any]], key: str) -> list[int]:
    return [row["step"] for row in rows if key in row and row.get("step") is not None]


def rank_rows(spec: dict[str, Any], rank: int) -> list[dict[str, Any]]:
    out = Path(spec["settings"]["output_dir"])
    return read_jsonl(out / f"training_params_and_metrics_global{rank}.jsonl")


def assert_each_logged_step_once(spec: dict[str, Any], key: str = "loss") -> list[int]:
    """Each rank's JSONL has every step the job logged ``key`` at (its own account), once;
    returns rank 0's steps."""
    per_rank = []
    for rank in (0, 1):
        logged = [n["step"] for n in noted(Path(spec["witness"]), rank) if key in n["keys"]]
        assert logged, f"rank {rank} logged no {key}"
        assert steps_with(rank_rows(spec, rank), key) == logged, rank
        per_rank.append(logged)
    return per_rank[0]


def tensorboard_run(spec: dict[str, Any]) -> Path:
    (run_dir,) = [p for p in Path(spec["settings"]["tensorboard_log_dir"]).iterdir()]
    return run_dir


def assert_hparams_once(spec: dict[str, Any], expected: dict[str, Any]) -> None:
    """Hyper-parameters: once in each rank's JSONL, once in TensorBoard (rank 0's)."""
    for rank in (0, 1):
        rows = [row for row in rank_rows(spec, rank) if "step" not in row and expected.keys()
                <= row.keys()]  # fmt: skip
        assert len(rows) == 1, rows
        assert {key: rows[0][key] for key in expected} == expected
    count, values = hparams_written(accumulator(tensorboard_run(spec)))
    assert count == 1 and {key: values[key] for key in expected} == expected, values


MISSPELLED = {"output_dir": "x", "tensorbord_log_dir": "x"}


def assert_crash_kept_everything(spec: dict[str, Any], code: int, out: str) -> None:
    assert code != 0 and "fails on purpose" in out, out[-3000:]
    assert (
        "() got unknown setting(s): 'tensorbord_log_dir' (did you mean 'tensorboard_log_dir'?)"
        in out
    ), out[-3000:]
    collector_gone(spec)
    steps = assert_each_logged_step_once(spec)
    assert max(steps) >= CRASH_AFTER - 2, steps  # it did train up to the crash


class TestSettingsAndTheSession:
    """What every adapter shares, without a framework: settings checked when it is built,
    nothing dropped without a word."""

    def test_a_misspelled_setting_names_the_adapter_and_a_suggestion(self) -> None:
        with pytest.raises(ConfigError, match=r"RanklogX\(\) got unknown setting\(s\): "
                           r"'wandb_projekt' \(did you mean 'wandb_project'\?\)"):  # fmt: skip
            check_settings("RanklogX", {"output_dir": "x", "wandb_projekt": "p"})

    @pytest.mark.parametrize(
        ("settings", "problem"),
        [({"policy": "tensorboard=avg"}, "unknown rank policy 'avg'"),
         ({"loggers": "async,tensorbord"}, "unknown logger type"),
         ({"run_name": "{hour}"}, "hour")],
    )  # fmt: skip
    def test_names_are_checked_too(self, settings: dict[str, Any], problem: str) -> None:
        with pytest.raises(ConfigError, match=re.escape(problem)):
            check_settings("RanklogX", settings)

    def test_values_outside_training_are_said_once(self) -> None:
        session = RankSession({"output_dir": "x"})
        with pytest.warns(RuntimeWarning, match="values at step 3 arrived before training"):
            session.record({"loss": 1.0}, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            session.record({"loss": 1.0}, 4)
            session.hparams({"lr": 0.1})


HF = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "tests/hf_job.py"]
LIGHTNING = [sys.executable, "tests/lightning_job.py"]


def accelerate_launch() -> list[str]:
    """``accelerate launch`` for 2 CPU processes; its rendezvous port is fixed (29500)
    unless given, and two jobs of these tests may run at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), "tests/accelerate_job.py"]  # fmt: skip


Crash = tuple[dict[str, Any], subprocess.Popen[str]]


def crash_run(
    module: str, command: Callable[[], list[str]], name: str
) -> Callable[..., Iterator[Crash]]:
    """A job that raises after step ``CRASH_AFTER``, started when its test class starts so
    that it runs beside the class's other job (the suite's time)."""

    @pytest.fixture(scope="class")
    def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crash]:
        framework(module)
        path = tmp_path_factory.mktemp(name)
        spec = spec_for(
            path, name, crash_after=CRASH_AFTER, misspelled=MISSPELLED, tensorboard=False
        )  # JSONL is what these check
        job = launch(command(), spec)
        yield spec, job
        ended(job)

    return started


hf_crash = crash_run("transformers", lambda: HF, "hf")
accelerate_crash = crash_run("accelerate", accelerate_launch, "acc")


@pytest.mark.usefixtures("hf_crash")
class TestHuggingFaceTrainer:
    """RanklogCallback in a Trainer (tiny GPT-2 from GPT2Config) under torchrun."""

    def test_every_rank_logs_each_step_once_and_top_sees_both(self, tmp_path: Path) -> None:
        framework("transformers")
        spec = spec_for(tmp_path, "hf", step_delay=0.3)
        job = launch(HF, spec)
        try:
            snapshot = wait_for(mid_run(Path(spec["settings"]["output_dir"]), 2), 120,
                                "both ranks stepping")  # fmt: skip
        finally:
            code, out = ended(job)
        assert code == 0, out[-3000:]
        assert sorted(row["rank"] for row in snapshot["ranks"]) == [0, 1]
        steps = assert_each_logged_step_once(spec)
        assert steps == list(range(2, 21, 2))
        for rank in (0, 1):  # the evaluations: once each, at the step they ran
            assert steps_with(rank_rows(spec, rank), "eval_loss") == [10, 20]
        assert tensorboard_loss_steps(tensorboard_run(spec)) == steps
        assert_hparams_once(spec, {"learning_rate": 0.001, "logging_steps": 2, "max_steps": 20})

    def test_a_crash_after_step_10_keeps_what_was_logged(self, hf_crash: Crash) -> None:
        spec, job = hf_crash
        assert_crash_kept_everything(spec, *ended(job))


class TestLightning:
    """RanklogLogger under Lightning's own DDP launcher (devices=2, strategy="ddp")."""

    def test_both_ranks_log_the_same_steps_once(self, tmp_path: Path) -> None:
        framework("lightning")
        spec = spec_for(tmp_path, "pl")
        code, out = ended(launch(LIGHTNING, spec))
        assert code == 0, out[-3000:]
        steps = assert_each_logged_step_once(spec)
        assert steps_with(rank_rows(spec, 1), "loss") == steps and len(steps) >= 9
        for rank in (0, 1):  # each rank's own values
            assert {row["rank_seen"] for row in rank_rows(spec, rank) if "step" in row} == {rank}
        assert tensorboard_loss_steps(tensorboard_run(spec)) == steps
        assert_hparams_once(spec, {"lr": 0.1, "hidden": 4})
        # Live, not from a spill at exit: rank 1 (started by rank 0's process) found the
        # collector rank 0 started.
        log = (Path(spec["settings"]["output_dir"]) / "ranklog-collector.log").read_text()
        assert "rank 1 joined" in log and "ingested spill" not in log, log

    def test_a_crash_after_step_10_keeps_what_was_logged(self, tmp_path: Path) -> None:
        framework("lightning")
        spec = spec_for(
            tmp_path, "pl", crash_after=CRASH_AFTER, misspelled=MISSPELLED, tensorboard=False
        )  # JSONL is what these check
        assert_crash_kept_everything(spec, *ended(launch(LIGHTNING, spec)))


@pytest.mark.usefixtures("accelerate_crash")
class TestAccelerate:
    """RanklogTracker under ``accelerate launch`` with 2 CPU processes."""

    def test_both_ranks_log_each_step_once(self, tmp_path: Path) -> None:
        framework("accelerate")
        spec = spec_for(tmp_path, "acc")
        code, out = ended(launch(accelerate_launch(), spec))
        assert code == 0, out[-3000:]
        steps = assert_each_logged_step_once(spec)
        assert steps == list(range(20))
        for rank in (0, 1):
            assert {row["rank_seen"] for row in rank_rows(spec, rank) if "step" in row} == {rank}
        assert tensorboard_loss_steps(tensorboard_run(spec)) == steps
        assert_hparams_once(spec, {"lr": 0.1, "hidden": 4})

    def test_a_crash_after_step_10_keeps_what_was_logged(self, accelerate_crash: Crash) -> None:
        spec, job = accelerate_crash
        assert_crash_kept_everything(spec, *ended(job))
