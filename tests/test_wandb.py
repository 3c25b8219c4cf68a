"""WandbHandler: offline runs read back from disk with tests/wandb_reader.py."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import wandb

from ranklog import WandbHandler
from tests.conftest import CollectorProcess, read_jsonl, run_all_backends
from tests.test_policy import rec, tb_scalars
from tests.wandb_reader import WandbRun, offline_runs, read_run, records


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
    """The one run under ``log_dir``, read at once: complete once ``close()`` returned."""
    (run_dir,) = offline_runs(log_dir)
    return read_run(run_dir)


class Thing:
    """An object W&B cannot encode."""

    def __repr__(self) -> str:
        return "<a thing>"


def summary(log_file: Path) -> dict[str, Any]:
    """The run's summary as its log leaves it: each summary record's updates, in order."""
    values: dict[str, Any] = {}
    for record in records(log_file):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                values[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
    return values


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


@pytest.mark.usefixtures("offline")
class TestWandbDurableClose:
    """``close()`` returns once the offline run's file holds every row it was given."""

    def test_twenty_runs_each_hold_their_three_rows_when_close_returns(
        self, tmp_path: Path
    ) -> None:
        for n in range(20):
            handler = WandbHandler(log_dir=tmp_path / f"run{n}")
            for step in range(3):
                handler.handle(rec(0, step, {"loss": step / 10}))
            handler.close()
            (run_dir,) = offline_runs(tmp_path / f"run{n}")
            run = read_run(run_dir)  # the moment close() returned: no waiting here
            assert [row["_step"] for row in run.history] == [0, 1, 2], f"run {n}"
            assert run.finished, f"run {n}"


@pytest.mark.usefixtures("offline")
class TestWandbResumeAfterAnEarlyCrash:
    """A crash right after ``wandb.init``: the checkpoint may not name the run's log yet,
    and a power cut may leave that log empty. The restart neither logs a row twice nor
    fails on the empty log, and leaves no folder ``wandb sync`` would fail on."""

    def first_run(self, log_dir: Path) -> tuple[WandbHandler, dict[str, Any]]:
        """Steps 0-4 logged; the checkpoint as it stood before ``wandb.init`` returned."""
        handler = WandbHandler(log_dir=log_dir)
        before_init: list[dict[str, Any]] = []
        handler.owned_files.on_open = lambda: before_init.append(handler.checkpoint())
        for step in range(5):
            handler.handle(rec(0, step, {"loss": step / 10}))
        handler.close()
        assert not before_init[0]["sync_file"]  # the run named, its log not yet
        return handler, before_init[0]

    def resume(self, log_dir: Path, state: dict[str, Any]) -> list[WandbRun]:
        wandb.teardown()  # as in the fresh collector process that restarts
        handler = WandbHandler(log_dir=log_dir)
        handler.restore(state)
        for step in range(10):  # the journal read again from its start
            handler.handle(rec(0, step, {"loss": step / 10}))
        handler.close()
        return [read_run(run_dir) for run_dir in offline_runs(log_dir)]

    def test_rows_in_a_log_the_checkpoint_did_not_name_are_not_logged_again(
        self, tmp_path: Path
    ) -> None:
        _, state = self.first_run(tmp_path)
        runs = self.resume(tmp_path, state)
        assert len(runs) == 2 and {run.run_id for run in runs} == {state["run_id"]}
        assert sorted(row["_step"] for run in runs for row in run.history) == list(range(10))

    def test_a_log_left_empty_by_a_power_cut_is_removed(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        handler, state = self.first_run(tmp_path)
        (first,) = offline_runs(tmp_path)
        empty = first.with_name(f"offline-run-29991231_235959-{state['run_id']}")
        empty.mkdir()
        log = empty / f"run-{state['run_id']}.wandb"
        log.touch()  # wandb.init created it, the checkpoint named it, then the power cut
        caplog.set_level(logging.INFO, logger="ranklog")
        runs = self.resume(tmp_path, handler.checkpoint() | {"sync_file": str(log)})
        assert not empty.exists(), "the empty log's folder is left"
        assert f"removed {empty}: a crash left its log empty" in caplog.text
        assert sorted(row["_step"] for run in runs for row in run.history) == list(range(10))

    @pytest.mark.parametrize("named_by", ["log_dir", "dir", "WANDB_DIR"])
    def test_the_folder_checkpointed_before_init_is_where_wandb_writes(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, named_by: str
    ) -> None:
        given = tmp_path / "given"
        given.mkdir()
        if named_by == "WANDB_DIR":
            monkeypatch.setenv("WANDB_DIR", str(given))
        kwargs = {"dir": str(given)} if named_by == "dir" else {}
        handler = WandbHandler(log_dir=tmp_path / "logs", **kwargs)
        before_init: list[dict[str, Any]] = []
        handler.owned_files.on_open = lambda: before_init.append(handler.checkpoint())
        handler.handle(rec(0, 0, {"loss": 0.0}))
        handler.close()
        assert before_init[0]["wandb_dir"] == handler.checkpoint()["wandb_dir"]
        assert offline_runs(tmp_path / "logs" if named_by == "log_dir" else given)


def no_wandb_account(home: Path) -> dict[str, str]:
    """The environment of a W&B run online with no API key, no netrc and no server (port 9
    on loopback): ``wandb.init`` fails for real, as it does for a user without an account."""
    return {
        "WANDB_MODE": "online",
        "WANDB_API_KEY": "",
        "HOME": str(home),
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_CONFIG_DIR": str(home / "wandb-config"),
        "NETRC": str(home / "no-netrc"),
    }


class TestWandbInitFails:
    """W&B that cannot start: what it dropped is said once, however often it is closed."""

    def test_the_drops_are_said_once(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        for name, value in no_wandb_account(tmp_path).items():
            monkeypatch.setenv(name, value)
        handler = WandbHandler(log_dir=tmp_path)
        try:
            for step in range(3):
                handler.handle(rec(0, step, {"loss": 1.0}))
            handler.close()
            handler.close()  # as logging.shutdown does at the process's exit
        finally:
            wandb.teardown()
        said = [r.getMessage() for r in caplog.records if "dropped after" in r.getMessage()]
        assert said == [
            "backend wandb: 3 record(s) dropped after wandb.init failed, 0 dropped for "
            "arriving out of step order"
        ]


@pytest.mark.usefixtures("offline")
class TestWandbOddValues:
    """Values W&B cannot encode become their text; a step-less record joins no row."""

    def test_odd_values_and_a_stepless_record(
        self, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
    ) -> None:
        handler = WandbHandler(log_dir=tmp_path)
        handler.handle(rec(0, 0, {"ok": 0, "raw": b"\xff\x00", "text": b"abc", "none": None}))
        handler.handle(rec(0, 1, {"ok": 1, "list": [1, 2.5], "empty": {}, "thing": Thing()}))
        handler.handle(rec(0, None, {"ok": 100, "note": "between"}))  # no step
        handler.handle(rec(0, 2, {"ok": 2}))
        handler.close()

        assert "Logging error" not in capfd.readouterr().err
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        run = only_run(tmp_path)
        assert [(row["_step"], row["ok"]) for row in run.history] == [(0, 0), (1, 1), (2, 2)]
        first, second, third = run.history
        assert (first["raw"], first["text"], first["none"]) == ("b'\\xff\\x00'", "abc", None)
        assert (second["list"], second["thing"]) == ([1, 2.5], "<a thing>")
        assert "note" not in third
        assert summary(run.path)["note"] == "between"  # the run's summary holds it
        warned = [r.getMessage() for r in caplog.records if "W&B cannot hold" in r.msg]
        assert warned == [
            "backend wandb: 'raw' is a bytes, which W&B cannot hold; logged as its text",
            "backend wandb: 'thing' is a Thing, which W&B cannot hold; logged as its text",
        ]


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

    def test_a_wandb_service_left_in_the_environment_is_not_used(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        """A process that ran wandb (rank 0 that called ``wandb.init`` itself) leaves its
        service's address in ``WANDB_SERVICE``; the collector it starts must not log
        through a service that goes away with that process."""
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        env = {
            "WANDB_MODE": "offline",
            "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
            "WANDB_SERVICE": f"3-{gone.pid}-unix-{tmp_path / 'gone' / 'socket'}",
        }
        c = run_all_backends(collector, 20, env=env)
        assert [row["_step"] for row in only_run(c.output_dir).history] == list(range(20))

    def test_init_failure_is_reported_once_and_the_others_go_on(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        c = run_all_backends(collector, 50, env=no_wandb_account(tmp_path))

        log = c.log()
        assert log.count("backend wandb: wandb.init failed") == 1, log
        assert "50 record(s) dropped after wandb.init failed" in log
        assert [s for s, _ in tb_scalars(c.output_dir)["demo"]["loss"]] == list(range(50))
        for rank in (0, 1):
            rows = read_jsonl(c.output_dir / f"training_params_and_metrics_global{rank}.jsonl")
            assert len(rows) == 50
