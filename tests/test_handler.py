"""ZMQSocketHandler against a real collector: fork safety, never raising, rank fields."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ranklog import ZMQSocketHandler
from ranklog.rank.identity import detect_identity
from tests.conftest import CollectorProcess, read_jsonl

REPO = Path(__file__).resolve().parents[1]

FORK_SCRIPT = """
import logging, os, sys
from ranklog import ZMQSocketHandler
h = ZMQSocketHandler(sys.argv[1], rank=0, world_size=1, close_timeout=20)
log = logging.getLogger("m"); log.addHandler(h); log.setLevel(logging.INFO)
for i in range(50):
    log.info({"who": "parent", "i": i}, extra={"step": i})
pid = os.fork()
if pid == 0:
    for i in range(50):
        log.info({"who": "child", "i": i}, extra={"step": 100 + i})
    h.close()
    os._exit(0 if h.stats["held"] == 0 else 3)
for i in range(50, 100):
    log.info({"who": "parent", "i": i}, extra={"step": i})
_, status = os.waitpid(pid, 0)
h.close()
sys.exit(os.waitstatus_to_exitcode(status) or (4 if h.stats["held"] else 0))
"""


class TestFork:
    """After fork() the child logs through its own socket and sender thread."""

    def test_parent_and_child_both_delivered(
        self, collector: Callable[..., CollectorProcess]
    ) -> None:
        c = collector()
        proc = subprocess.run(
            [sys.executable, "-c", FORK_SCRIPT, c.endpoint],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        c.terminate()
        assert c.wait(30) == 0
        rows = read_jsonl(c.output_dir / "training_params_and_metrics_global0.jsonl")
        parent = sorted(r["i"] for r in rows if r["who"] == "parent")  # type: ignore[type-var]
        child = sorted(r["i"] for r in rows if r["who"] == "child")  # type: ignore[type-var]
        assert parent == list(range(100)) and child == list(range(50))


SETUP_FORK_SCRIPT = """
import logging, os, sys
from ranklog import setup_metric_logger
setup_metric_logger("async", None, sys.argv[1], endpoint=sys.argv[2], rank=0, world_size=1)
pid = os.fork()
if pid == 0:
    sys.exit(0)  # a helper process of rank 0: logs nothing, exits normally (atexit runs)
os.waitpid(pid, 0)
for step in range(5):
    logging.getLogger("instructlab.training.metrics").info({"loss": 1.0}, extra={"step": step})
"""


class TestForkedHelper:
    """A child forked from rank 0 that logs nothing does not say "logged no metrics"."""

    def test_only_the_process_that_logs_the_metrics_speaks_of_them(
        self, collector: Callable[..., CollectorProcess]
    ) -> None:
        c = collector()
        proc = subprocess.run(
            [sys.executable, "-c", SETUP_FORK_SCRIPT, str(c.output_dir), c.endpoint],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "logged no metrics" not in proc.stderr, proc.stderr
        c.terminate()
        assert c.wait(30) == 0
        rows = read_jsonl(c.output_dir / "training_params_and_metrics_global0.jsonl")
        assert [row["step"] for row in rows] == list(range(5))


class TestNeverRaises:
    """A broken value or a closed handler never raises into the training loop."""

    def test_broken_repr_goes_to_handle_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        class Broken:
            def __repr__(self) -> str:
                raise RuntimeError("no repr for you")

        handler = ZMQSocketHandler("tcp://127.0.0.1:9", close_timeout=0.1)
        logger = logging.getLogger("test.raise")
        logger.addHandler(handler)
        logger.propagate = False
        logger.error({"bad": Broken()})  # must not raise
        with pytest.warns(RuntimeWarning):
            handler.close()
        logger.error({"after": "close"})  # must not raise either
        assert "Logging error" in capsys.readouterr().err

    def test_stats_and_start(self) -> None:
        handler = ZMQSocketHandler("tcp://127.0.0.1:9", close_timeout=0.1)
        handler.start()
        assert handler.stats == {"held": 0, "dropped": 0, "converted": 0}
        with pytest.warns(RuntimeWarning, match="could not deliver its goodbye"):
            handler.close()  # only its goodbye was left


class TestRankFields:
    """Rank fields come from torchrun's environment unless given."""

    def test_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name, value in {
            "RANK": "5",
            "LOCAL_RANK": "1",
            "WORLD_SIZE": "8",
            "LOCAL_WORLD_SIZE": "4",
            "TORCHELASTIC_RUN_ID": "job7",
        }.items():
            monkeypatch.setenv(name, value)
        ident = detect_identity()
        assert (
            ident.rank,
            ident.local_rank,
            ident.world_size,
            ident.local_world_size,
            ident.run_id,
        ) == (5, 1, 8, 4, "job7")
        assert detect_identity(rank=2, world_size=3).rank == 2

    def test_defaults(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
            monkeypatch.delenv(name, raising=False)
        ident = detect_identity()
        assert (ident.rank, ident.world_size, ident.run_id) == (0, 1, "none")

    def test_torch_distributed(self, tmp_path: Path) -> None:
        script = (
            "import sys, torch.distributed as dist\n"
            "from ranklog.rank.identity import detect_identity\n"
            f"dist.init_process_group('gloo', init_method='file://{tmp_path}/init', "
            "rank=int(sys.argv[1]), world_size=2)\n"
            "i = detect_identity(); print(i.rank, i.world_size)\n"
            "dist.destroy_process_group()\n"
        )
        # No torchrun variables in the environment: the ranks come from torch.distributed.
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(r)],
                stdout=subprocess.PIPE,
                text=True,
                env={"PATH": "/usr/bin:/bin"},
            )
            for r in (0, 1)
        ]
        outputs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
        assert outputs == ["0 2", "1 2"]


class TestRankSideImports:
    """A rank imports only the standard library, pyzmq and msgpack."""

    def test_no_backend_sdk_or_torch_on_import(self) -> None:
        script = (
            "import sys, logging, ranklog\n"
            "h = ranklog.ZMQSocketHandler('tcp://127.0.0.1:9', close_timeout=0.1)\n"
            "logging.getLogger('m').addHandler(h)\n"
            "logging.getLogger('m').warning({'x': 1})\n"
            "heavy = ('torch', 'wandb', 'tensorboard', 'numpy', 'mlflow', 'rich', 'yaml')\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n"
        )
        out = subprocess.run([sys.executable, "-W", "ignore", "-c", script],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.stdout.strip() == "[]", out.stderr
