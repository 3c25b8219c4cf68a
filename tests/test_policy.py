"""Rank policies: what each backend sees of several ranks' records."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

from ranklog import ConfigError
from ranklog.backends.policies import (
    AllRanksPolicy,
    FirstPolicy,
    Rank0Policy,
    RankPolicy,
    ReducePolicy,
    make_policy,
)
from ranklog.names import format_policy_spec, parse_policy_spec
from tests.conftest import CollectorProcess, read_jsonl
from tests.ranks import REPO, finish, start_rank


def rec(rank: int, step: int | None, msg: Any, *, world_size: int = 2, **extra: Any) -> Any:
    """A record as the collector rebuilds it from rank ``rank``."""
    return logging.makeLogRecord(
        {
            "name": "instructlab.training.metrics",
            "levelno": logging.INFO,
            "msg": msg,
            "step": step,
            "rank": rank,
            "local_rank": rank,
            "world_size": world_size,
            "hparams": False,
            **extra,
        }
    )


def feed(policy: RankPolicy, *records: Any, now: float = 0.0) -> list[Any]:
    out: list[Any] = []
    for record in records:
        out += policy.accept(record, now)
    return out


def tb_scalars(log_dir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """run -> tag -> [(step, value)] in file order, read with TensorBoard's multiplexer."""
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(log_dir))
    mux.Reload()
    return {
        run: {tag: [(e.step, e.value) for e in mux.Scalars(run, tag)] for tag in tags["scalars"]}
        for run, tags in mux.Runs().items()
    }


def stop(collector: CollectorProcess) -> int:
    collector.terminate(signal.SIGTERM)
    return collector.wait(30)


class TestPolicySpec:
    """``--policy tensorboard=mean,wandb=rank0`` is checked before anything starts."""

    def test_round_trip(self) -> None:
        spec = parse_policy_spec(" tensorboard=mean , wandb=rank0 ")
        assert spec == {"tensorboard": "mean", "wandb": "rank0"}
        assert parse_policy_spec(format_policy_spec(spec)) == spec
        assert parse_policy_spec({"tb": "all"}) == {"tb": "all"}

    @pytest.mark.parametrize(
        ("spec", "message"),
        [("tensorboard=median", "unknown rank policy 'median'"), ("wandb", "BACKEND=POLICY")],
    )
    def test_bad_spec_says_what_is_expected(self, spec: str, message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            parse_policy_spec(spec)

    def test_cli_rejects_bad_policy_and_unknown_backend(self, tmp_path: Path) -> None:
        def collect(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "ranklog",
                    "collect",
                    "--bind",
                    "tcp://127.0.0.1:*",
                    "--output-dir",
                    str(tmp_path),
                    *args,
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )

        bad = collect("--policy", "tensorboard=median")
        assert bad.returncode == 2
        assert "unknown rank policy 'median' for tensorboard" in bad.stderr
        unknown = collect("--logger-type", "async", "--policy", "wandb=mean")
        assert unknown.returncode == 2
        assert "wandb" in unknown.stderr and "configured: async" in unknown.stderr

    def test_setup_metric_logger_rejects_bad_policy_on_the_rank(self) -> None:
        from ranklog import setup_metric_logger

        with pytest.raises(ConfigError, match="unknown rank policy"):
            setup_metric_logger("async", policy="tensorboard=avg", endpoint="tcp://127.0.0.1:9")


class TestSelectionPolicies:
    """rank0, first and all decide which ranks' values pass, record by record."""

    def test_rank0_passes_rank_0_only(self) -> None:
        out = feed(Rank0Policy(), rec(1, 0, {"loss": 2.0}), rec(0, 0, {"loss": 1.0}))
        assert [(r.rank, r.msg) for r in out] == [(0, {"loss": 1.0})]

    def test_first_keeps_the_first_value_per_step_and_key(self) -> None:
        out = feed(
            FirstPolicy(),
            rec(1, 5, {"loss": 2.0, "lr": 0.1}),
            rec(0, 5, {"loss": 1.0, "acc": 0.5}),
            rec(0, 5, {"loss": 1.0}),
            rec(0, 6, {"loss": 0.9}),
        )
        assert [(r.step, r.msg) for r in out] == [
            (5, {"loss": 2.0, "lr": 0.1}),
            (5, {"acc": 0.5}),
            (6, {"loss": 0.9}),
        ]

    def test_first_drops_a_step_that_left_its_window_even_after_a_restart(self) -> None:
        """A rank far behind (records resent after a collector restart) must not pass a
        step as "first" again once the step has left the window, nor after a restart."""
        policy = FirstPolicy()
        policy.window = 4
        out = feed(policy, *(rec(0, step, {"loss": float(step)}) for step in range(10)))
        assert [r.step for r in out] == list(range(10))
        assert feed(policy, rec(1, 2, {"loss": 9.0}), rec(1, 7, {"loss": 9.0})) == []
        assert policy.late == 1  # step 2 left the window; step 7 is still in it
        restarted = FirstPolicy()
        restarted.window = 4
        restarted.restore(policy.checkpoint())
        assert restarted.remember(rec(1, 3, {"loss": 9.0}), 0.0) == []
        assert restarted.late == 0  # seen again to remember it: judged when it first came
        assert feed(restarted, rec(1, 3, {"loss": 9.0})) == []
        assert restarted.late == 1
        assert [r.step for r in feed(restarted, rec(1, 10, {"loss": 1.0}))] == [10]
        other_job = rec(1, 3, {"loss": 9.0}, run_id="next-job")
        assert feed(restarted, other_job) != []  # each job counts its own steps

    def test_all_makes_per_rank_series_without_touching_the_original(self) -> None:
        original = rec(1, 3, {"train": {"loss": 2.0}})
        (out,) = feed(AllRanksPolicy(), original)
        assert out.msg == {"rank1/train/loss": 2.0} and out.step == 3
        assert original.msg == {"train": {"loss": 2.0}}  # other backends share it
        (kept,) = feed(AllRanksPolicy(rename=False), original)
        assert kept is original

    @pytest.mark.parametrize("name", ["rank0", "first", "all", "mean", "max"])
    def test_hparams_reach_the_backend_once(self, name: str) -> None:
        policy = make_policy(name, world_size=2)
        hparams = [rec(r, None, {"lr": 0.1, "model": {"layers": 2}}, hparams=True) for r in (0, 1)]
        out = feed(policy, *hparams, *hparams)
        assert [r.msg for r in out] == [{"lr": 0.1, "model": {"layers": 2}}]
        changed = rec(0, None, {"lr": 0.2}, hparams=True)
        assert feed(policy, changed) == [changed]  # new values are new hyper-parameters


class TestReducePolicy:
    """mean/min/max/sum: one value per (step, key) across ranks, in step order."""

    @pytest.mark.parametrize(
        ("op", "expected"), [("mean", 2.0), ("min", 1.0), ("max", 3.0), ("sum", 4.0)]
    )
    def test_reduces_across_ranks_once_all_reported(self, op: str, expected: float) -> None:
        policy = make_policy(op, world_size=2)
        assert feed(policy, rec(0, 7, {"loss": 1.0, "phase": "warmup"})) == []
        (out,) = feed(policy, rec(1, 7, {"loss": 3.0, "phase": "main"}))
        assert out.msg == {"loss": expected, "phase": "warmup", "ranks_reported": 2}
        assert out.step == 7 and out.rank == 0 and out.partial is False

    def test_integer_sum_stays_an_integer(self) -> None:
        policy = make_policy("sum", world_size=2)
        (out,) = feed(policy, rec(0, 1, {"tokens": 10}), rec(1, 1, {"tokens": 12}))
        assert out.msg["tokens"] == 22 and isinstance(out.msg["tokens"], int)

    def test_missing_rank_times_out_into_a_partial_step(self) -> None:
        policy = ReducePolicy("mean", timeout=5.0, world_size=2)
        assert feed(policy, rec(0, 1, {"loss": 1.0}), now=100.0) == []
        assert policy.next_deadline() == 105.0
        assert policy.due(104.9) == []
        (out,) = policy.due(105.0)
        assert out.msg == {"loss": 1.0, "ranks_reported": 1} and out.partial is True

    def test_steps_leave_in_order_and_late_records_are_dropped(self) -> None:
        policy = ReducePolicy("mean", timeout=5.0, world_size=2)
        # rank 0 runs ahead; step 2 completes before step 1 but must wait for it
        early = feed(policy, rec(0, 1, {"x": 1.0}), rec(0, 2, {"x": 2.0}), rec(1, 2, {"x": 4.0}))
        assert early == []
        (one, two) = feed(policy, rec(1, 1, {"x": 3.0}))
        assert [(one.step, one.msg["x"]), (two.step, two.msg["x"])] == [(1, 2.0), (2, 3.0)]
        assert feed(policy, rec(1, 1, {"y": 1.0})) == [] and policy.late == 1

    def test_drain_emits_what_is_still_waiting(self) -> None:
        policy = ReducePolicy("max", timeout=60.0, world_size=3)
        feed(policy, rec(0, 2, {"x": 1.0}, world_size=3), rec(2, 1, {"x": 5.0}, world_size=3))
        assert [(r.step, r.msg["ranks_reported"], r.partial) for r in policy.drain()] == [
            (1, 1, True),
            (2, 1, True),
        ]

    def test_a_second_record_at_the_same_step_does_not_hold_the_first(self) -> None:
        policy = ReducePolicy("mean", timeout=60.0, world_size=2)
        out = feed(
            policy,
            rec(0, 9, {"loss": 1.0}),
            rec(0, 9, {"val/loss": 5.0}),
            rec(1, 9, {"loss": 3.0}),
            rec(1, 9, {"val/loss": 7.0}),
        )
        assert [r.msg for r in out] == [
            {"loss": 2.0, "ranks_reported": 2},
            {"val/loss": 6.0, "ranks_reported": 2},
        ]


class TestPoliciesInTheCollector:
    """Real ranks -> ``ranklog collect --policy`` -> TensorBoard, read back with its reader."""

    def test_mean_with_a_rank_that_stops(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        timeout = 5.0
        c = collector(
            "--logger-type",
            "async,tensorboard",
            "--run-name",
            "job",
            "--policy",
            "tensorboard=mean",
            "--policy-timeout",
            str(timeout),
        )
        # Rank 1 logs steps 0..99 and stops; rank 0 goes on to step 299.
        started = time.monotonic()
        finish([start_rank(c.endpoint, 0, 2, 300), start_rank(c.endpoint, 1, 2, 100)])

        # The steps rank 1 never sent come out after the timeout, while the collector runs.
        run: dict[str, list[tuple[int, float]]] = {}
        while time.monotonic() < started + 30:
            run = tb_scalars(c.output_dir).get("job", {})
            if run.get("loss", [(0, 0)])[-1][0] == 299:
                break
            time.sleep(0.25)
        assert time.monotonic() - started >= timeout
        assert stop(c) == 0

        loss, reported = tb_scalars(c.output_dir)["job"]["loss"], run["ranks_reported"]
        assert [step for step, _ in loss] == list(range(300))  # once each, in step order
        for step, value in loss:
            both = step < 100
            assert value == pytest.approx(1 / (step + 1) + (0.5 if both else 0.0), rel=1e-6)
        assert reported[:100] == [(s, 2.0) for s in range(100)]
        assert reported[100:] == [(s, 1.0) for s in range(100, 300)]
        assert "step 100 had 1 of 2 ranks after 5s; emitted as partial" in c.log()
        # JSONL keeps its own default: every rank's own file, untouched by TensorBoard's policy
        assert len(read_jsonl(c.output_dir / "training_params_and_metrics_global1.jsonl")) == 100

    def test_setup_metric_logger_forwards_the_policy(self, tmp_path: Path) -> None:
        out = tmp_path / "out"
        script = (
            "import logging\n"
            "from ranklog import finish_metric_logger, setup_metric_logger\n"
            f"setup_metric_logger('async,tensorboard', 'job', {str(out)!r},"
            " policy={'tensorboard': 'all'})\n"
            "log = logging.getLogger('instructlab.training.metrics')\n"
            "for step in range(5):\n"
            "    log.info({'loss': step / 10}, extra={'step': step})\n"
            "print('collector exit', finish_metric_logger(timeout=60))\n"
        )
        env = {
            **os.environ,
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "TORCHELASTIC_RUN_ID": uuid.uuid4().hex,
        }
        env.pop("RANKLOG_ENDPOINT", None)
        proc = subprocess.run(
            [sys.executable, "-c", script],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "collector exit 0" in proc.stdout, proc.stdout + proc.stderr
        series = tb_scalars(out)["job"]
        assert list(series) == ["rank0/loss"]
        assert [s for s, _ in series["rank0/loss"]] == [0, 1, 2, 3, 4]
