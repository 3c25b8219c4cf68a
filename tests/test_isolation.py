"""A hung backend delays nobody; the collector's example configs run unchanged."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import READY, CollectorProcess, read_jsonl
from tests.ranks import finish, start_rank
from tests.test_policy import tb_scalars
from tests.wandb_reader import offline_runs, read_run

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "collector").glob("*.yaml"))
DRAIN = 2.0

SLEEPING_HANDLER = '''
import logging
import threading


class SleepingHandler(logging.Handler):
    """Hangs for good on its first record, holding its lock, as a dead network call would."""

    def emit(self, record):
        threading.Event().wait()
'''


def start_in(cwd: Path, *args: str, env: dict[str, str] | None = None) -> CollectorProcess:
    """``ranklog collect`` started in ``cwd`` (configs name paths relative to it)."""
    log_path = cwd / "collector.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ranklog", "collect", "--bind", "tcp://127.0.0.1:*", *args],
            cwd=cwd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        match = READY.search(log_path.read_text())
        if match:
            return CollectorProcess(proc, match.group(1), cwd, log_path)
        assert proc.poll() is None, log_path.read_text()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"collector never became ready:\n{log_path.read_text()}")


@pytest.fixture
def started() -> Iterator[list[CollectorProcess]]:
    """Collectors a test started; any still running at the end are killed."""
    procs: list[CollectorProcess] = []
    yield procs
    for c in procs:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait(10)


@pytest.fixture
def mute_server() -> Iterator[int]:
    """A port where a server accepts connections and never answers (a hung W&B)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)  # closing does not wake a blocked accept(): poll a stop flag
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    done.set()
    thread.join(5)
    server.close()
    for conn in held:
        conn.close()


def eventually(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll ``check`` until it returns something truthy (while the collector keeps running)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (FileNotFoundError, KeyError):
            result = None
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def jsonl_steps(path: Path) -> list[Any]:
    return [row["step"] for row in read_jsonl(path) if "step" in row]


def stop_within(c: CollectorProcess, bound: float) -> tuple[int, float]:
    started = time.monotonic()
    c.terminate(signal.SIGTERM)
    code = c.wait(bound + 10)
    return code, time.monotonic() - started


class TestHungBackend:
    """A backend that never returns: the others go on, shutdown keeps its bound."""

    def test_sleeping_stdlib_handler(self, tmp_path: Path, started: list[CollectorProcess]) -> None:
        (tmp_path / "hanging.py").write_text(SLEEPING_HANDLER)
        config = {
            "version": 1,
            "filters": {"is_mapping": {"()": "ranklog.IsMappingFilter"}},
            "handlers": {
                "hang": {"()": "hanging.SleepingHandler"},  # first in line, on purpose
                "jsonl": {
                    "()": "ranklog.AsyncStructuredHandler",
                    "log_dir": "out",
                    "filters": ["is_mapping"],
                },
                "tensorboard": {
                    "()": "ranklog.TensorBoardHandler",
                    "log_dir": "out",
                    "run_name": "tb",
                    "flush_secs": 0.5,
                    "filters": ["is_mapping"],
                },
            },
            "root": {"level": "NOTSET", "handlers": ["hang", "jsonl", "tensorboard"]},
        }
        (tmp_path / "logging.yaml").write_text(yaml.safe_dump(config))
        pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
        c = start_in(
            tmp_path,
            "--config",
            "logging.yaml",
            "--drain-timeout",
            str(DRAIN),
            env={"PYTHONPATH": pythonpath},
        )
        started.append(c)
        finish([start_rank(c.endpoint, r, 2, 100) for r in (0, 1)])

        out = tmp_path / "out"
        # Everything lands while the hung handler still holds its first record.
        assert eventually(
            lambda: jsonl_steps(out / "training_params_and_metrics_global1.jsonl") == [*range(100)]
        )
        assert eventually(lambda: len(tb_scalars(out)["tb"]["loss"]) == 100)

        code, took = stop_within(c, DRAIN)
        assert took < DRAIN + 5, f"shutdown took {took:.1f}s"  # the bound, plus process exit
        assert code == 1  # not a clean drain, and it says which backend
        log = c.log()
        assert "backend hang did not drain within the drain bound; abandoning it" in log
        assert "exiting without the abandoned backend(s): hang" in log
        assert jsonl_steps(out / "training_params_and_metrics_global0.jsonl") == [*range(100)]

    def test_wandb_init_that_never_answers(
        self, tmp_path: Path, started: list[CollectorProcess], mute_server: int
    ) -> None:
        c = start_in(
            tmp_path,
            "--output-dir",
            "out",
            "--logger-type",
            "async,tensorboard,wandb",
            "--run-name",
            "demo",
            "--drain-timeout",
            str(DRAIN),
            env={
                "WANDB_MODE": "online",
                "WANDB_API_KEY": "k" * 40,
                "WANDB_BASE_URL": f"http://127.0.0.1:{mute_server}",
                "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                "HOME": str(tmp_path),
            },
        )
        started.append(c)
        finish([start_rank(c.endpoint, r, 2, 50) for r in (0, 1)])
        out = tmp_path / "out"
        assert eventually(lambda: len(tb_scalars(out)["demo"]["loss"]) == 50)
        assert eventually(
            lambda: len(read_jsonl(out / "training_params_and_metrics_global1.jsonl")) == 50
        )
        code, took = stop_within(c, DRAIN)
        assert took < DRAIN + 5, f"shutdown took {took:.1f}s"  # the bound, plus process exit
        assert code == 1
        assert "backend wandb did not drain within the drain bound; abandoning it" in c.log()


def _run_with_config(config: Path, tmp_path: Path, started: list[CollectorProcess]) -> str:
    """Run ``config`` (compose configs' /data moved under tmp_path) for 2 ranks x 20 steps."""
    text = config.read_text().replace("/data", str(tmp_path / "data"))
    (tmp_path / config.name).write_text(text)
    c = start_in(
        tmp_path,
        "--config",
        config.name,
        "--world-size",
        "2",
        "--policy-timeout",
        "60",  # only bounds the wait for a missing rank: a slow machine must not make it partial
        env={"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")},
    )
    started.append(c)
    finish([start_rank(c.endpoint, r, 2, 20, "--hparams") for r in (0, 1)])
    code, _ = stop_within(c, 10)
    assert code == 0, c.log()
    return c.log()


class TestCollectorConfigs:
    """Each dictConfig in collector/ runs in the collector as written; what every handler in
    it promises shows up where a user would look."""

    @pytest.mark.parametrize("config", CONFIGS, ids=[p.name for p in CONFIGS])
    def test_config_runs_unchanged(
        self, config: Path, tmp_path: Path, started: list[CollectorProcess]
    ) -> None:
        log = _run_with_config(config, tmp_path, started)
        spec = yaml.safe_load((tmp_path / config.name).read_text())
        for name, handler in spec["handlers"].items():
            factory = handler.get("()", handler.get("class"))
            log_dir = tmp_path / str(handler.get("log_dir", "."))
            rank0_only = "is_rank0" in handler.get("filters", [])
            if factory == "ranklog.AsyncStructuredHandler":
                pattern = f"{handler.get('run_name', 'training_params_and_metrics_global*')}.jsonl"
                files = sorted(log_dir.glob(pattern))
                assert len(files) == (1 if rank0_only else 2), name
                for path in files:
                    assert jsonl_steps(path) == [*range(20)], path
            elif factory == "ranklog.TensorBoardHandler":
                runs = tb_scalars(log_dir)
                assert len(runs) == 1, (name, list(runs))
                (series,) = runs.values()
                policy = handler.get(".", {}).get("rank_policy", "rank0")
                rank_offset = {"rank0": 0.0, "mean": 0.5}[policy]  # loss = 1/(s+1) + rank
                assert [s for s, _ in series["loss"]] == [*range(20)], name
                assert [v for _, v in series["loss"]] == pytest.approx(
                    [1 / (s + 1) + rank_offset for s in range(20)], rel=1e-6
                )
            elif factory == "ranklog.WandbHandler":
                (run_dir,) = offline_runs(log_dir)
                run = read_run(run_dir)
                assert [row["_step"] for row in run.history] == [*range(20)]
                assert run.config == {"lr": 0.01, "model/layers": 2}
            elif factory == "logging.StreamHandler":
                lines = [line for line in log.splitlines() if re.match(r"step \d+ rank ", line)]
                assert len(lines) == 20 if rank0_only else 40, lines
                assert lines[0] == "step 0 rank 0: loss=1.000, train/tokens=0, tag=''"
            else:
                raise AssertionError(f"{config.name}: no check for handler {name} ({factory})")
