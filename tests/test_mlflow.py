"""MLflowHandler: a file-store run read back with MLflow's own client (needs ranklog[mlflow])."""

from __future__ import annotations

from pathlib import Path

import pytest

from ranklog import MLflowHandler
from tests.test_policy import rec

mlflow = pytest.importorskip("mlflow")


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
