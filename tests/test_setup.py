"""The seed's setup functions, and the embedded collector under torchrun."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ranklog import FormatDictFilter, propagate_package_logs, setup_root_logger
from tests.conftest import read_jsonl
from tests.test_delivery import tensorboard_loss_steps
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
