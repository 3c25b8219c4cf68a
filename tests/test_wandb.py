"""WandbHandler: offline runs read back from disk with tests/wandb_reader.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import wandb

from ranklog import WandbHandler
from tests.conftest import CollectorProcess, read_jsonl, run_all_backends
from tests.test_policy import rec, tb_scalars
from tests.wandb_reader import WandbRun, offline_runs, read_run


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """W&B in offline mode, with nothing from the developer's own W&B setup."""
    for name in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME", "WANDB_DIR", "WANDB_CONSOLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    yield
    # wandb reads the environment once per process, into a singleton: start the next test
    # from scratch, as a fresh collector process would.
    wandb.teardown()


def only_run(log_dir: Path) -> WandbRun:
    """The one run under ``log_dir``, once complete on disk.

    wandb's service writes the log behind ``finish()`` by some milliseconds (it is
    complete once the process that ran wandb exits); wait for the run's exit record.
    """
    (run_dir,) = offline_runs(log_dir)
    deadline = time.monotonic() + 10
    run = read_run(run_dir)
    while not run.finished and time.monotonic() < deadline:
        time.sleep(0.02)
        run = read_run(run_dir)
    return run


@pytest.mark.usefixtures("offline")
class TestWandbHandler:
    """In-process: InstructLab's arguments, config once, rows in step order."""

    def test_rows_config_and_name(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        handler = WandbHandler(run_name="exp_rank{rank}", log_dir=tmp_path, project="ranklog-t")
        handler.handle(rec(0, None, {"lr": 0.1, "model": {"layers": 2}}, hparams=True))
        for step in (0, 1, 2, 1, 3):  # the second 1 goes backwards
            handler.handle(rec(0, step, {"train": {"loss": step / 10}, "phase": "warmup"}))
        handler.close()

        run = only_run(tmp_path)
        assert (run.name, run.project, run.finished) == ("exp_rank0", "ranklog-t", True)
        assert run.config == {"lr": 0.1, "model/layers": 2}
        assert [(row["_step"], row["train/loss"]) for row in run.history] == [
            (0, 0.0),
            (1, 0.1),
            (2, 0.2),
            (3, 0.3),
        ]
        assert {row["phase"] for row in run.history} == {"warmup"}
        assert handler.out_of_order == 1
        warned = [r.getMessage() for r in caplog.records if "arrived after step" in r.msg]
        assert warned == [
            "backend wandb: step 1 arrived after step 2; W&B needs steps in order, so it is "
            "dropped (further ones are counted)"
        ]

    def test_wandb_environment_is_respected(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("WANDB_PROJECT", "from-env")
        monkeypatch.setenv("WANDB_NAME", "env-name")
        monkeypatch.setenv("WANDB_DIR", str(tmp_path / "env-dir"))
        handler = WandbHandler(log_dir=tmp_path / "unused")
        handler.handle(rec(0, 0, {"loss": 1.0}))
        handler.close()
        run = only_run(tmp_path / "env-dir")
        assert (run.name, run.project) == ("env-name", "from-env")
        assert not (tmp_path / "unused").exists()

    def test_the_users_run_id_is_kept(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A job that sets WANDB_RUN_ID (or passes id=) continues that run."""
        monkeypatch.setenv("WANDB_RUN_ID", "fromenv42")
        handler = WandbHandler(log_dir=tmp_path / "a")
        handler.handle(rec(0, 0, {"loss": 1.0}))
        handler.close()
        assert only_run(tmp_path / "a").run_id == "fromenv42"
        monkeypatch.delenv("WANDB_RUN_ID")
        wandb.teardown()
        handler = WandbHandler(log_dir=tmp_path / "b", id="explicit7")
        handler.handle(rec(0, 0, {"loss": 1.0}))
        handler.close()
        assert only_run(tmp_path / "b").run_id == "explicit7"


class TestWandbInTheCollector:
    """Real ranks -> ``ranklog collect --logger-type async,tensorboard,wandb``."""

    def test_offline_run_holds_300_rows_and_the_hparams(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        env = {"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")}
        c = run_all_backends(collector, 300, "--hparams", env=env)

        run = only_run(c.output_dir)  # one run, however many ranks
        assert run.name == "demo" and run.finished
        assert run.config == {"lr": 0.01, "model/layers": 2}
        assert [row["_step"] for row in run.history] == list(range(300))
        # tests/rank_worker.py logs 1/(step+1) + rank: these are rank 0's values
        assert [row["loss"] for row in run.history] == pytest.approx(
            [1 / (s + 1) for s in range(300)]
        )
        assert run.history[-1]["train/tokens"] == 2990

    def test_init_failure_is_reported_once_and_the_others_go_on(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        env = {
            # online with no account and no reachable server: wandb.init raises
            "WANDB_MODE": "online",
            "WANDB_API_KEY": "",
            "WANDB_BASE_URL": "http://127.0.0.1:9",
            "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
            "HOME": str(tmp_path),
            "NETRC": str(tmp_path / "no-netrc"),
        }
        c = run_all_backends(collector, 50, env=env)

        log = c.log()
        assert log.count("backend wandb: wandb.init failed") == 1, log
        assert "50 record(s) dropped after wandb.init failed" in log
        assert [s for s, _ in tb_scalars(c.output_dir)["demo"]["loss"]] == list(range(50))
        for rank in (0, 1):
            rows = read_jsonl(c.output_dir / f"training_params_and_metrics_global{rank}.jsonl")
            assert len(rows) == 50
