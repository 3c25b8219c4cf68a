"""The seed's setup functions, and the embedded collector under torchrun."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from ranklog import (
    ConfigError,
    FormatDictFilter,
    finish_metric_logger,
    propagate_package_logs,
    setup_metric_logger,
    setup_root_logger,
)
from ranklog.names import BACKEND_OPTIONS
from ranklog.rank.call_form import plan as _plan
from ranklog.rank.embedded import EmbeddedCollector
from tests.conftest import ranklog, read_jsonl, start_collector
from tests.ranks import start_rank
from tests.test_delivery import tensorboard_loss_steps, wait_for
from tests.wandb_reader import offline_runs, read_run

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


class TestPackageLogs:
    """propagate_package_logs and setup_root_logger behave like InstructLab's."""

    def test_propagation_toggle(self) -> None:
        propagate_package_logs(False)
        assert not logging.getLogger("instructlab.training").propagate
        propagate_package_logs()
        assert logging.getLogger("instructlab.training").propagate

    def test_root_logger_formats_dicts(self, monkeypatch: pytest.MonkeyPatch) -> None:
        root = logging.getLogger()
        monkeypatch.setattr(root, "handlers", [])
        setup_root_logger("INFO")
        assert root.level == logging.INFO
        (handler,) = root.handlers
        assert type(handler).__name__ == "RichHandler"
        assert any(isinstance(f, FormatDictFilter) for f in handler.filters)


class TestEmbeddedCollector:
    """setup_metric_logger under torchrun: rank 0 starts the collector; it leaves when done."""

    def test_demo_run(self, tmp_path: Path) -> None:
        out = tmp_path / "demo"
        proc = subprocess.run(
            [
                str(TORCHRUN),
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                "ranklog.demo",
                "--output_dir",
                str(out),
                "--steps",
                "40",
                "--logger_type",
                "async,tensorboard,wandb",
                "--run_name",
                "demo",
            ],
            env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "ranklog demo finished" in proc.stdout
        for rank in (0, 1):
            rows = read_jsonl(out / f"training_params_and_metrics_global{rank}.jsonl")
            hparams = [r for r in rows if "step" not in r]
            steps = [r["step"] for r in rows if "step" in r]
            assert steps == list(range(40))
            assert hparams[0]["model/hidden"] == 64
            assert all(isinstance(r["loss"], float) for r in rows if "step" in r)
        log = (out / "ranklog-collector.log").read_text()
        assert "every rank finished" in log and "collector stopped: 82 records" in log
        assert f"tensorboard --logdir {out}" in proc.stdout
        assert sorted(tensorboard_loss_steps(out / "demo")) == list(range(40))
        (run,) = [read_run(path) for path in offline_runs(out)]
        assert run.name == "demo" and len(run.history) == 40 and run.config["lr"] == 0.05


NOTHING_LOGGED = "ranklog: rank 0 logged no metrics"


def torchrun_job(
    spec: dict[str, object], *, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``tests/setup_job.py`` under ``torchrun --standalone --nproc-per-node 2``."""
    return subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "tests/setup_job.py",
         json.dumps(spec)],
        env=env or {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


class TestSetupFailsFast:
    """A mistake in setup stops the job before training, with one line naming it."""

    def test_policy_for_a_backend_not_in_loggers_fails_the_job(self, tmp_path: Path) -> None:
        started = time.monotonic()
        spec = {"args": ["async"], "kwargs": {"output_dir": str(tmp_path / "out"),
                                              "policy": {"tensorboard": "mean"}}}  # fmt: skip
        proc = torchrun_job(spec, timeout=60)
        assert proc.returncode != 0
        assert time.monotonic() - started < 30
        assert "ConfigError: policy names backend(s) tensorboard" in proc.stderr

    def test_embedded_collector_that_cannot_listen_raises_its_reason(self, tmp_path: Path) -> None:
        """The port the multi-node default would bind is taken: rank 0 says so."""
        import socket

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            endpoint = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
            out = tmp_path / "out"
            script = (
                "from ranklog.rank.embedded import EmbeddedCollector\n"
                "from pathlib import Path\n"
                f"EmbeddedCollector({endpoint!r}, Path({str(out)!r}), 1).start()\n"
            )
            proc = subprocess.run([sys.executable, "-c", script], capture_output=True,
                                  text=True, timeout=60, cwd=REPO)  # fmt: skip
        assert proc.returncode != 0
        assert "the embedded ranklog collector could not start: cannot listen on" in proc.stderr
        assert str(out / "ranklog-collector.log") in proc.stderr

    def test_a_job_that_fails_at_start_does_not_leave_its_collector_behind(
        self, tmp_path: Path
    ) -> None:
        """Rank 1 fails before its setup; torchrun stops rank 0, which started the
        collector. The collector must not wait for a rank that will never come: it exits,
        and the same job runs into the same output dir right after."""
        out = tmp_path / "out"
        spec = {"args": [str(out)], "fail_rank": 1, "steps": 600, "step_delay": 0.05}
        failed = torchrun_job(spec, timeout=120)
        assert failed.returncode != 0
        marker = out / ".ranklog" / "collector.json"
        wait_for(lambda: not marker.exists(), 30)
        proc = torchrun_job({"args": [str(out)], "steps": 5}, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for rank in (0, 1):  # rank 0 of the failed job may have logged some steps too
            rows = read_jsonl(out / f"training_params_and_metrics_global{rank}.jsonl")
            assert [row["step"] for row in rows if "loss" in row][-5:] == list(range(5))

    def test_a_misspelled_keyword_names_the_function_and_a_suggestion(self) -> None:
        with pytest.raises(
            ConfigError,
            match=r"setup_metric_logger\(\) got unknown argument\(s\): "
            r"'tensorbord_log_dir' \(did you mean 'tensorboard_log_dir'\?\)",
        ):
            setup_metric_logger("out", tensorbord_log_dir="tb", endpoint="tcp://127.0.0.1:9")

    def test_unknown_run_name_placeholder(self) -> None:
        with pytest.raises(ConfigError, match=r"\{rnak\}|unknown placeholder"):
            setup_metric_logger("async", "run_{rnak}", endpoint="tcp://127.0.0.1:9")

    def test_unwritable_output_dir(self, tmp_path: Path) -> None:
        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        collector = EmbeddedCollector("ipc:///tmp/ranklog-test-unused.ipc", blocker / "out", 1)
        with pytest.raises(ConfigError, match=f"cannot write to the output dir {blocker}/out"):
            collector.start()


class TestCallForms:
    """InstructLab's two signatures; the rule that tells them apart."""

    def test_older_form(self) -> None:
        plan = _plan("async,tensorboard", "run", "out", _no_options(), None, [])
        assert plan is not None
        assert (plan.loggers, plan.run_name, plan.output_dir) == (
            ["async", "tensorboard"], "run", Path("out"))  # fmt: skip
        plan = _plan(["wandb"], None, None, _no_options(), None, [])
        assert plan is not None and plan.loggers == ["wandb"]

    def test_todays_form_detects_backends(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("WANDB_PROJECT", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        plan = _plan("out", None, None, _no_options(), None, [])
        assert plan is not None and (plan.loggers, plan.output_dir) == (["async"], Path("out"))
        options = {**_no_options(), "tensorboard_log_dir": "tb", "wandb_project": "p"}
        plan = _plan("out", None, None, options, None, [])
        assert plan is not None and plan.loggers == ["async", "tensorboard", "wandb"]
        assert plan.collector_args()[-4:] == ["--tensorboard-log-dir", "tb",
                                              "--wandb-project", "p"]  # fmt: skip
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
        plan = _plan(None, None, "out", {**_no_options(), "wandb_project": "p"}, None, [])
        assert plan is not None and plan.loggers == ["async", "wandb", "mlflow"]

    def test_a_misspelled_backend_in_a_list_fails(self) -> None:
        with pytest.raises(ConfigError, match="tensorbord"):
            _plan("async,tensorbord", None, None, _no_options(), None, [])

    def test_a_word_a_typo_away_from_a_backend_fails(self, tmp_path: Path) -> None:
        """Not silently an output dir named ./asynx: one or two edits from a backend name."""
        os.chdir(tmp_path)
        for word, meant in (("asynx", "async"), ("tensorbord", "tensorboard"), ("wandbb", "wandb"),
                            ("MLflo", "mlflow"), ("asnyc", "async")):  # fmt: skip
            with pytest.raises(ConfigError, match=f"did you mean '{meant}'"):
                setup_metric_logger(word)
        assert list(tmp_path.iterdir()) == []
        with pytest.raises(ConfigError, match="did you mean 'async' for 'asynx'"):
            setup_metric_logger("asynx", "run")  # the older form
        for word in ("logs", "out", "runs", "./asynx"):  # paths, and words far from any name
            plan = _plan(word, None, None, _no_options(), None, [])
            assert plan is not None and plan.output_dir == Path(word)

    def test_output_dir_given_twice(self) -> None:
        with pytest.raises(ConfigError, match="output dir given twice"):
            _plan("out", None, "other", _no_options(), None, [])

    def test_explicit_endpoint_warns_about_unused_settings(self) -> None:
        with pytest.warns(RuntimeWarning, match="not used: loggers, run_name, policy"):
            setup_metric_logger("async,tensorboard", "r", policy="tensorboard=mean",
                                endpoint="tcp://127.0.0.1:9", close_timeout=0.1)  # fmt: skip
        finish_metric_logger()


def _no_options() -> dict[str, str | None]:
    return dict.fromkeys(BACKEND_OPTIONS)


class TestJobsInOneOutputDir:
    """InstructLab users reuse output dirs: every job's records land, once."""

    def test_two_embedded_jobs_then_a_standalone_collector(self, tmp_path: Path) -> None:
        out = tmp_path / "out"
        for job in ("first", "second"):
            spec = {"args": ["async"], "kwargs": {"output_dir": str(out)}, "also": {"job": job}}
            proc = torchrun_job(spec)
            assert proc.returncode == 0, proc.stderr[-3000:]
        c = start_collector(out, "--world-size", "2", "--exit-when-done")
        try:
            env = {**os.environ, "RANKLOG_ENDPOINT": c.endpoint, "WANDB_MODE": "offline"}
            proc = torchrun_job({"also": {"job": "third"}}, env=env)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert c.wait(60) == 0, c.log()
        finally:
            c.terminate(signal.SIGKILL)
        for rank in (0, 1):
            rows = read_jsonl(out / f"training_params_and_metrics_global{rank}.jsonl")
            seen = Counter((row["job"], row["step"]) for row in rows if "step" in row)
            expected = {(job, step) for job in ("first", "second", "third") for step in range(20)}
            assert set(seen) == expected and set(seen.values()) == {1}, seen


class TestInstructLabToday:
    """main_ds.py's call: setup_metric_logger(out, wandb_project=..., tensorboard_log_dir=...)."""

    def test_jsonl_tensorboard_and_wandb_from_the_keywords(self, tmp_path: Path) -> None:
        out, tb = tmp_path / "out", tmp_path / "tb"
        spec = {
            "args": [str(out)],
            "kwargs": {"wandb_project": "p", "tensorboard_log_dir": str(tb)},
        }
        proc = torchrun_job(spec)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for rank in (0, 1):
            rows = read_jsonl(out / f"training_params_and_metrics_global{rank}.jsonl")
            assert [r["step"] for r in rows if "step" in r] == list(range(20))
        (run_dir,) = [path for path in tb.iterdir() if path.is_dir()]
        assert sorted(tensorboard_loss_steps(run_dir)) == list(range(20))
        (run,) = [read_run(path) for path in offline_runs(out)]
        assert run.project == "p" and len(run.history) == 20 and run.config["lr"] == 0.1
        assert NOTHING_LOGGED not in proc.stderr

    def test_a_script_logging_to_another_logger_is_told(self, tmp_path: Path) -> None:
        """Metrics logged to the package's logger rather than its metrics logger reach no
        backend; the job's terminal says so once (rank 0), naming the logger to use."""
        out = tmp_path / "out"
        spec = {"args": ["async", None, str(out)], "logger": "instructlab.training", "steps": 5}
        proc = torchrun_job(spec)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not list(out.glob("*.jsonl"))
        assert proc.stderr.count(NOTHING_LOGGED) == 1, proc.stderr[-3000:]
        assert "logging.getLogger('instructlab.training.metrics').info(" in proc.stderr

    def test_wandb_settings_made_in_the_script_reach_the_collector(self, tmp_path: Path) -> None:
        """WANDB_MODE and WANDB_PROJECT set by the training script itself, not torchrun's
        environment: the embedded collector still runs W&B offline in that project."""
        out = tmp_path / "out"
        env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
        spec = {"args": [str(out)], "env": {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                                            "WANDB_PROJECT": "from-the-script"}}  # fmt: skip
        proc = torchrun_job(spec, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (run,) = [read_run(path) for path in offline_runs(out)]
        assert run.project == "from-the-script" and len(run.history) == 20
        assert "API key" not in (out / "ranklog-collector.log").read_text()


def _free_port_pair() -> int:
    """A port P with P+1 free too (the multi-node default listens on MASTER_PORT + 1)."""
    import socket

    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise AssertionError("no free port pair")


class TestMultiNodeDefault:
    """Two torchrun agents as two nodes: the embedded collector listens on MASTER_PORT + 1,
    authenticated with the job's CURVE keys (shared through torch.distributed)."""

    def test_a_peer_without_the_key_lands_nothing(self, tmp_path: Path) -> None:
        out, port = tmp_path / "out", _free_port_pair()
        spec = {"args": ["async"], "kwargs": {"output_dir": str(out)}, "steps": 60,
                "step_delay": 0.05}  # fmt: skip
        nodes = [
            subprocess.Popen(
                [
                    str(TORCHRUN),
                    "--nnodes",
                    "2",
                    "--nproc-per-node",
                    "1",
                    "--node-rank",
                    str(node),
                    "--master-addr",
                    "127.0.0.1",
                    "--master-port",
                    str(port),
                    "tests/setup_job.py",
                    json.dumps(spec),
                ],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for node in (0, 1)
        ]
        log = out / "ranklog-collector.log"
        deadline = time.monotonic() + 60
        while not (log.exists() and "listening on" in log.read_text()):
            assert time.monotonic() < deadline, "the embedded collector never listened"
            time.sleep(0.1)
        assert f"listening on tcp://127.0.0.1:{port + 1}" in log.read_text()
        # An attacker on the network: its own valid key pair, and the collector's public key
        # (public: readable in the key folder, or sniffed from the wire).
        (server_key,) = (out / ".ranklog" / "keys").glob("*/collector.key")
        attacker = tmp_path / "attacker"
        assert ranklog("keys", "--out", str(attacker), "--name", "intruder").returncode == 0
        intruder = start_rank(
            f"tcp://127.0.0.1:{port + 1}", 5, 6, 50, "--close-timeout", "2", "--say-steps",
            "--curve-server-key", str(server_key),
            "--curve-key-file", str(attacker / "intruder.key_secret"),
        )  # fmt: skip
        stdout, stderr = intruder.communicate(timeout=60)
        assert intruder.returncode == 0, stderr
        assert "logged step 49" in stderr  # it started and logged everything
        stats = json.loads(stdout.strip().splitlines()[-1])
        assert stats["held"] == 51, (stats, stderr)  # 50 records and the goodbye: none acked
        assert "rank 5 could not deliver 50 record(s)" in stderr  # and its goodbye
        # It connected, and the collector refused its key: one line, however often it tried.
        intruder_key = (attacker / "intruder.key").read_text().split('public-key = "')[1][:40]
        refused = [line for line in log.read_text().splitlines() if "refused a client" in line]
        assert len(refused) == 1 and intruder_key in refused[0], refused
        for node in nodes:
            _, err = node.communicate(timeout=120)
            assert node.returncode == 0, err[-3000:]
        for rank in (0, 1):
            rows = read_jsonl(out / f"training_params_and_metrics_global{rank}.jsonl")
            assert [r["step"] for r in rows if "step" in r] == list(range(60))
        assert not (out / "training_params_and_metrics_global5.jsonl").exists()
        assert "rank 5 joined" not in log.read_text()
