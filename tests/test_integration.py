"""Real processes end to end: ranks -> `ranklog collect` -> JSONL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import zmq

from ranklog.rank.encoder import RecordEncoder
from ranklog.rank.identity import detect_identity
from tests.conftest import CollectorProcess, read_jsonl
from tests.ranks import run_ranks


def steps_of(output_dir: Path, rank: int) -> list[int]:
    return [
        row["step"]
        for row in read_jsonl(  # type: ignore[misc]
            output_dir / f"training_params_and_metrics_global{rank}.jsonl"
        )
    ]


class TestEndToEnd:
    """Four ranks, 3,000 records each, one collector that leaves by itself."""

    def test_every_step_exactly_once(self, collector: Callable[..., CollectorProcess]) -> None:
        c = collector("--world-size", "4", "--exit-when-done")
        stats = run_ranks(c.endpoint, 4, 3000)
        assert c.wait(timeout=60) == 0, c.log()
        for rank in range(4):
            rows = read_jsonl(c.output_dir / f"training_params_and_metrics_global{rank}.jsonl")
            assert sorted(row["step"] for row in rows) == list(range(3000))  # type: ignore[type-var]
            assert rows[10]["train/tokens"] == 100  # nested keys flattened as a/b
            assert rows[10]["loss"] == 1.0 / 11 + rank
        assert all(s["dropped"] == 0 and s["held"] == 0 for s in stats)
        assert "every rank finished" in c.log()


def _hostile_dealer_frames() -> list[list[bytes]]:
    enc = RecordEncoder(detect_identity(rank=0, world_size=1, run_id="evil"))
    import logging

    good = msgpack.unpackb(enc.record(1, logging.LogRecord("m", 20, "f", 1, {"x": 1}, None, None)))
    wrong_types = dict(good, rank="zero", seq=-4)
    nested: bytes = b"\x81\xa1a" * 5000 + b"\x01"  # 5,000 nested maps
    return [
        [b""],
        [os.urandom(64)],
        [os.urandom(4096), b"", os.urandom(3)],
        [msgpack.packb(dict(good, v=99))],
        [b"\x00" * (20 * 1024 * 1024)],
        [nested],
        [msgpack.packb(wrong_types)],
        [msgpack.packb({"v": 1, "kind": "ack", "run": "x", "rank": 0, "inc": "i", "seq": 1})],
        [msgpack.packb("just a string")],
    ]


class TestHostileInput:
    """Garbage from DEALER, PUSH and REQ peers never stops a collector serving real ranks."""

    def test_collector_survives_and_serves(
        self, collector: Callable[..., CollectorProcess]
    ) -> None:
        c = collector("--status-interval", "1")
        ctx = zmq.Context()
        try:
            dealer = ctx.socket(zmq.DEALER)
            dealer.connect(c.endpoint)
            for frames in _hostile_dealer_frames():
                dealer.send_multipart(frames)
            push = ctx.socket(zmq.PUSH)  # wrong socket type: ZeroMQ refuses the handshake
            push.connect(c.endpoint)
            push.send(b"garbage", zmq.NOBLOCK) if push.poll(100, zmq.POLLOUT) else None
            req = ctx.socket(zmq.REQ)
            req.connect(c.endpoint)
            req.send(os.urandom(100))
            time.sleep(1.5)
            assert c.proc.poll() is None, c.log()
        finally:
            ctx.destroy(linger=0)  # closes the three sockets, also after a failure
        run_ranks(c.endpoint, 1, 500)
        time.sleep(0.3)
        c.terminate()
        assert c.wait(timeout=30) == 0, c.log()
        assert steps_of(c.output_dir, 0) == list(range(500))
        log = c.log()
        for reason in ("empty-frame", "not-msgpack", "bad-version", "too-large", "bad-field"):
            assert reason in log, f"{reason} not reported:\n{log}"


class TestNoCollector:
    """With nobody listening, logging stays cheap and the process still exits promptly."""

    SCRIPT = """
import logging, time, warnings, json
from ranklog import ZMQSocketHandler
warnings.simplefilter("always")
h = ZMQSocketHandler("tcp://127.0.0.1:{port}", max_records=10_000, close_timeout=1.0)
log = logging.getLogger("m"); log.addHandler(h); log.setLevel(logging.INFO)
worst = 0.0
start = time.perf_counter()
for step in range(100_000):
    t = time.perf_counter()
    log.info({{"loss": 0.1, "acc": 0.9}}, extra={{"step": step}})
    worst = max(worst, time.perf_counter() - t)
print(json.dumps({{"total": time.perf_counter() - start, "worst": worst, **h.stats}}), flush=True)
"""

    def test_emits_never_block_and_losses_are_reported(self) -> None:
        with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as probe:
            port = probe.bind_to_random_port("tcp://127.0.0.1")
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-c", self.SCRIPT.format(port=port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        elapsed = time.monotonic() - started
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["worst"] < 0.5  # no call ever waited for the network
        assert result["dropped"] == 90_000 and result["held"] == 10_000
        # close() says exactly what was lost: its goodbye pushes out no record
        assert "could not deliver 10000 record(s)" in proc.stderr, proc.stderr
        assert "dropped 90000 record(s)" in proc.stderr, proc.stderr
        assert elapsed < 60, f"exit took {elapsed:.1f}s"


class TestSignals:
    """SIGTERM drains: exit 0, every accepted record on disk."""

    def test_sigterm_flushes(self, collector: Callable[..., CollectorProcess]) -> None:
        c = collector("--world-size", "2")
        run_ranks(c.endpoint, 2, 2000)  # returns once every record is acknowledged
        c.terminate(signal.SIGTERM)
        assert c.wait(timeout=30) == 0, c.log()
        assert "SIGTERM received" in c.log()
        for rank in range(2):
            assert steps_of(c.output_dir, rank) == list(range(2000))

    def test_sigint_too(self, collector: Callable[..., CollectorProcess]) -> None:
        c = collector()
        c.terminate(signal.SIGINT)
        assert c.wait(timeout=30) == 0, c.log()
