"""Fuzzing: the codec under hypothesis, and a live collector under 100,000 hostile frames."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from ranklog.errors import ProtocolError
from ranklog.rank.encoder import RecordEncoder
from ranklog.rank.identity import detect_identity
from ranklog.wire import decode
from tests.conftest import CollectorProcess, read_jsonl
from tests.ranks import run_ranks

ENCODER = RecordEncoder(detect_identity(rank=1, world_size=2, run_id="fuzz"))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
metrics = st.recursive(
    scalars, lambda inner: st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=20
)


def _record(msg: object, step: int | None) -> logging.LogRecord:
    record = logging.LogRecord("fuzz", logging.INFO, "f", 1, msg, None, None)
    record.step = step
    return record


class TestCodecProperties:
    """Whatever a rank logs round-trips; whatever arrives decodes or is rejected cleanly."""

    @settings(max_examples=300, deadline=None)
    @given(
        st.dictionaries(st.text(max_size=10), metrics, max_size=8),
        st.one_of(st.none(), st.integers(0, 2**40)),
    )
    def test_round_trip(self, msg: dict[str, object], step: int | None) -> None:
        envelope = decode(ENCODER.record(5, _record(msg, step)))
        assert envelope["msg"] == msg and envelope["step"] == step

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=512))
    def test_arbitrary_bytes(self, frame: bytes) -> None:
        with contextlib.suppress(ProtocolError):  # anything else is a bug
            decode(frame)

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def test_mutated_valid_frames(self, data: st.DataObject) -> None:
        frame = bytearray(ENCODER.record(1, _record({"loss": 0.5, "x": {"y": 1}}, 3)))
        for _ in range(data.draw(st.integers(1, 8))):
            index = data.draw(st.integers(0, len(frame) - 1))
            frame[index] = data.draw(st.integers(0, 255))
        try:
            envelope = decode(bytes(frame))
        except ProtocolError:
            return
        assert envelope["kind"] in {"record", "hello", "heartbeat", "goodbye", "ack"}


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _hostile_frames(rng: random.Random, count: int) -> list[bytes]:
    valid = ENCODER.record(1, _record({"loss": 0.5, "nested": {"a": [1, 2, 3]}}, 7))
    templates = [valid, msgpack.packb({"v": 1, "kind": "heartbeat"}), msgpack.packb([1, {}])]
    frames = []
    for i in range(count):
        if i % 3 == 0:
            frames.append(rng.randbytes(rng.randrange(0, 300)))
        else:
            frame = bytearray(rng.choice(templates))
            for _ in range(rng.randrange(1, 6)):
                frame[rng.randrange(len(frame))] = rng.randrange(256)
            frames.append(bytes(frame))
    return frames


class TestLiveCollector:
    """100,000 random and mutated frames: no crash, bounded memory, real ranks still served."""

    def test_hundred_thousand_frames(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        c = collector("--status-interval", "2", output_dir=tmp_path / "out")
        rng = random.Random(1234)
        frames = _hostile_frames(rng, 100_000)
        ctx = zmq.Context()
        try:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.connect(c.endpoint)
            rss_before = _rss_kib(c.proc.pid)
            for start in range(0, len(frames), 100):
                sock.send_multipart(frames[start : start + 100])
            # Every message is acknowledged or ignored; wait until the collector went through
            # them all (its status line counts rejections).
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and c.proc.poll() is None:
                while sock.poll(0):
                    sock.recv_multipart()
                if "rejected {" in c.log() and _rejected_total(c.log()) >= 60_000:
                    break
                time.sleep(0.5)
        finally:
            ctx.destroy(linger=0)  # a failed wait must not leave term() waiting on sock
        assert c.proc.poll() is None, c.log()
        rss_after = _rss_kib(c.proc.pid)
        assert rss_after - rss_before < 64 * 1024, (rss_before, rss_after)
        run_ranks(c.endpoint, 1, 1000)
        c.terminate()
        assert c.wait(30) == 0, c.log()
        rows = read_jsonl(tmp_path / "out" / "training_params_and_metrics_global0.jsonl")
        assert [row["step"] for row in rows if row.get("tag") == ""][-1000:] == list(range(1000))


def _rejected_total(log: str) -> int:
    import ast

    line = [ln for ln in log.splitlines() if "rejected {" in ln][-1]
    return sum(ast.literal_eval(line[line.index("rejected {") + 9 :]).values())
