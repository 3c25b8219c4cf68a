"""MLflow, read back with MLflow's own client: ``MLflowHandler`` in process on a file store,
and ``ranklog collect --logger-type async,mlflow`` logging to a real ``mlflow server``.

The server test needs the full ``mlflow`` package (``ranklog[mlflow-server]``; ``make test``
installs it): ``mlflow-skinny`` has no server and no SQL store. Without it the tests skip
with the reason; ``RANKLOG_REQUIRE_MLFLOW=1`` (set by ``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ranklog import MLflowHandler
from tests.conftest import CollectorProcess
from tests.ranks import run_ranks
from tests.test_policy import rec

REQUIRE_ENV = "RANKLOG_REQUIRE_MLFLOW"
INSTALL_HINT = "pip install -c constraints.txt -e '.[mlflow-server]'"
SERVER_START_TIMEOUT = 120.0  # a cold start creates the SQLite schema: ~10 s on 2 cores


def not_here(reason: str) -> None:
    """Skip with ``reason``, or fail where ``RANKLOG_REQUIRE_MLFLOW=1`` requires MLflow."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}; {REQUIRE_ENV}=1 requires the MLflow tests", pytrace=False)
    pytest.skip(f"MLflow test skipped: {reason}")


def full_mlflow_missing() -> str | None:
    """Why ``mlflow server`` cannot run here, or None."""
    try:
        importlib.metadata.version("mlflow")
    except importlib.metadata.PackageNotFoundError:
        return f"the full mlflow package is not installed ({INSTALL_HINT})"
    return None


try:
    import mlflow
except ImportError as exc:
    if os.environ.get(REQUIRE_ENV) == "1":
        raise
    pytest.skip(
        f"MLflow test skipped: mlflow does not import ({exc}; {INSTALL_HINT})",
        allow_module_level=True,
    )


class TestMLflowHandler:
    """InstructLab's MLflow behaviour: params once, numeric metrics per step, run ended."""

    def test_run_holds_params_and_metrics(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A file store needs no server and no SQLAlchemy (mlflow 3 wants this opt-in for it).
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (tmp_path / "mlruns").as_uri()
        handler = MLflowHandler(run_name="exp_rank{rank}", tracking_uri=uri, experiment_name="t")
        handler.handle(rec(0, None, {"lr": 0.1, "model": {"layers": 2}}, hparams=True))
        for step in range(3):
            handler.handle(rec(0, step, {"train": {"loss": step / 10}, "phase": "warmup"}))
        handler.close()

        client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        run = client.get_run(handler.run_id)
        assert run.info.run_name == "exp_rank0" and run.info.status == "FINISHED"
        assert run.data.params == {"lr": "0.1", "model.layers": "2"}
        history = client.get_metric_history(handler.run_id, "train.loss")
        assert [(m.step, m.value) for m in history] == [(0, 0.0), (1, 0.1), (2, 0.2)]
        assert "phase" not in run.data.metrics  # MLflow metrics are numbers only


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite store and artifacts under tmp_path);
    its tracking URI. Stopped, with its workers, afterwards."""
    missing = full_mlflow_missing()
    if missing:
        not_here(missing)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "mlflow-server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # The server's background job runner (huey consumers) serves GenAI features ranklog
    # does not use; without it the server starts faster and leaves fewer processes.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts-destination", str(tmp_path / "mlartifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with open(log_path, "w") as log_file:
        # Its own session: the server's uvicorn worker goes down with it (killpg).
        proc = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        started = time.monotonic()
        while not answers(url):
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()}")
            if time.monotonic() - started > SERVER_START_TIMEOUT:
                pytest.fail(
                    f"mlflow server did not answer {url}/health within "
                    f"{SERVER_START_TIMEOUT:.0f}s:\n{log_path.read_text()[-4000:]}"
                )
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


class TestMLflowServer:
    """The collector's MLflow backend against a tracking server, as on a cluster."""

    def test_collector_logs_rank0_run_to_server(
        self, collector: Callable[..., CollectorProcess], mlflow_server: str, tmp_path: Path
    ) -> None:
        records = 30
        env = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": "ranklog-test"}
        c = collector("--logger-type", "async,mlflow", "--run-name", "ranklog_rank{rank}", env=env)
        run_ranks(c.endpoint, 2, records, "--hparams")
        c.terminate(signal.SIGTERM)
        assert c.wait(60) == 0, c.log()
        assert "backend mlflow" not in c.log(), c.log()  # no failure to start, nothing dropped

        client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_server)
        experiment = client.get_experiment_by_name("ranklog-test")
        assert experiment is not None, c.log()
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 1, [r.info.run_name for r in runs]  # rank 0's records only
        run = runs[0]
        run_id = run.info.run_id
        assert run.info.run_name == "ranklog_rank0" and run.info.status == "FINISHED"
        assert run.data.params == {"lr": "0.01", "model.layers": "2"}
        loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
        assert loss == [(s, pytest.approx(1.0 / (s + 1))) for s in range(records)]
        tokens = sorted(
            (m.step, m.value) for m in client.get_metric_history(run_id, "train.tokens")
        )
        assert tokens == [(s, s * 10.0) for s in range(records)]
        assert set(run.data.metrics) == {"loss", "train.tokens"}  # "tag" is a string

        # The JSONL backend beside it kept every rank's records.
        for rank in (0, 1):
            path = tmp_path / "out" / f"training_params_and_metrics_global{rank}.jsonl"
            assert path.exists(), c.log()
