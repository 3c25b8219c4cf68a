"""Device (CUDA) scalars leave the caller's thread unread; the sender packs them later.

No GPU here: a ``DeviceScalar`` stands for a one-element CUDA tensor, and the encoder's
``host_copy`` hook hands back a :class:`HostCopy` whose ``done()`` the test controls, which is
all ``start_cuda_copy`` does with a pinned buffer and a ``torch.cuda.Event``. The tests
that need a real GPU skip without one (``make gpu-check`` with RANKLOG_REQUIRE_CUDA=1 fails
instead).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

from ranklog import ZMQSocketHandler
from ranklog.rank.encoder import RecordEncoder
from ranklog.rank.identity import detect_identity
from ranklog.rank.outbox import Outbox
from ranklog.rank.values import DeferredRecord, HostCopy, start_cuda_copy
from ranklog.wire import decode
from tests.conftest import CollectorProcess, read_jsonl


class DeviceScalar:
    """A value that lives on a device until its copy to the host completes."""

    def __init__(self, value: float) -> None:
        self.value = value


class Buffer:
    def __init__(self, value: float) -> None:
        self._value = value

    def item(self) -> float:
        return self._value


class FakeDevice:
    """``host_copy`` for DeviceScalar: every copy completes when ``finish()`` is called."""

    def __init__(self) -> None:
        self.finished = threading.Event()
        self.copies = 0

    def __call__(self, value: Any) -> HostCopy | None:
        if not isinstance(value, DeviceScalar):
            return None
        self.copies += 1
        return HostCopy(Buffer(value.value), self.finished.is_set)

    def finish(self) -> None:
        self.finished.set()


def _record(msg: object, **extra: object) -> logging.LogRecord:
    return logging.getLogger("m").makeRecord(
        "m", logging.INFO, "f.py", 1, msg, None, None, extra=extra or None
    )


@pytest.fixture
def device() -> FakeDevice:
    return FakeDevice()


@pytest.fixture
def encoder(device: FakeDevice) -> RecordEncoder:
    return RecordEncoder(detect_identity(rank=1, world_size=2, run_id="gpu"), host_copy=device)


class TestDeferredRecord:
    """A record with device values is packed once every copy is done, not before."""

    def test_waits_for_the_copy(self, encoder: RecordEncoder, device: FakeDevice) -> None:
        deferred = encoder.record(3, _record({"loss": DeviceScalar(0.25), "lr": 1e-4}, step=9))
        assert isinstance(deferred, DeferredRecord)
        assert deferred.result() is None and deferred.nbytes > 0
        device.finish()
        frame = deferred.result()
        assert frame is not None and deferred.result() is frame
        env = decode(frame)
        assert env["msg"] == {"loss": 0.25, "lr": 1e-4}
        assert (env["seq"], env["step"], env["rank"], env["kind"]) == (3, 9, 1, "record")

    def test_nested_values_and_a_device_step(
        self, encoder: RecordEncoder, device: FakeDevice
    ) -> None:
        msg = {"train": {"loss": DeviceScalar(2.0), "norms": [DeviceScalar(1.5), 3]}}
        deferred = encoder.record(1, _record(msg, step=DeviceScalar(12.0), tag="t"))
        assert isinstance(deferred, DeferredRecord) and device.copies == 3
        device.finish()
        env = decode(deferred.result() or b"")
        assert env["msg"] == {"train": {"loss": 2.0, "norms": [1.5, 3]}}
        assert env["step"] == 12 and env["extra"] == {"tag": "t"}

    def test_a_fractional_device_step_becomes_none(
        self, encoder: RecordEncoder, device: FakeDevice
    ) -> None:
        deferred = encoder.record(1, _record({"x": 1}, step=DeviceScalar(1.5)))
        device.finish()
        assert isinstance(deferred, DeferredRecord)
        assert decode(deferred.result() or b"")["step"] is None

    def test_the_callers_dict_may_change_afterwards(
        self, encoder: RecordEncoder, device: FakeDevice
    ) -> None:
        msg: dict[str, Any] = {"loss": DeviceScalar(0.5), "other": 1}
        deferred = encoder.record(1, _record(msg))
        msg["other"] = 2
        msg["new"] = 3
        device.finish()
        assert isinstance(deferred, DeferredRecord)
        assert decode(deferred.result() or b"")["msg"] == {"loss": 0.5, "other": 1}

    def test_other_odd_values_are_still_converted_once(
        self, encoder: RecordEncoder, device: FakeDevice
    ) -> None:
        class Thing:
            def __repr__(self) -> str:
                return "<thing>"

        deferred = encoder.record(1, _record({"d": DeviceScalar(1.0), "t": Thing()}))
        device.finish()
        assert isinstance(deferred, DeferredRecord)
        assert decode(deferred.result() or b"")["msg"] == {"d": 1.0, "t": "<thing>"}
        assert encoder.converted == 1

    def test_a_value_that_cannot_be_read_is_sent_as_none(self, encoder: RecordEncoder) -> None:
        class Broken:
            def item(self) -> float:
                raise RuntimeError("device lost")

        def broken_copy(value: Any) -> HostCopy | None:
            return HostCopy(Broken(), lambda: True) if isinstance(value, DeviceScalar) else None

        enc = RecordEncoder(detect_identity(rank=0, world_size=1), host_copy=broken_copy)
        deferred = enc.record(1, _record({"loss": DeviceScalar(1.0), "ok": 2}))
        assert isinstance(deferred, DeferredRecord)
        assert decode(deferred.result() or b"")["msg"] == {"loss": None, "ok": 2}

    def test_a_failing_readiness_check_does_not_hold_the_record_forever(
        self, encoder: RecordEncoder
    ) -> None:
        def failing() -> bool:
            raise RuntimeError("cudaErrorLaunchFailure")

        def copy(value: Any) -> HostCopy | None:
            return (
                HostCopy(Buffer(value.value), failing) if isinstance(value, DeviceScalar) else None
            )

        enc = RecordEncoder(detect_identity(rank=0, world_size=1), host_copy=copy)
        deferred = enc.record(1, _record({"loss": DeviceScalar(1.0)}))
        assert isinstance(deferred, DeferredRecord)
        assert decode(deferred.result() or b"")["msg"] == {"loss": 1.0}


class TestHostValues:
    """CPU tensors and numpy scalars are numbers at once; the record is plain bytes."""

    def test_cpu_values_are_not_deferred(self, encoder: RecordEncoder, device: FakeDevice) -> None:
        msg = {
            "t": torch.tensor(0.5),
            "p": torch.nn.Parameter(torch.tensor([2.0])),
            "n": np.float16(1.5),
            "i": np.int32(4),
        }
        frame = encoder.record(1, _record(msg, step=torch.tensor(3)))
        assert isinstance(frame, bytes) and device.copies == 0
        env = decode(frame)
        assert env["msg"] == {"t": 0.5, "p": 2.0, "n": 1.5, "i": 4} and env["step"] == 3

    def test_start_cuda_copy_ignores_host_values(self) -> None:
        for value in (torch.tensor(1.0), torch.ones(3), np.float32(1.0), 1.0, "x", None):
            assert start_cuda_copy(value) is None


class TestOutboxOrder:
    """A deferred record keeps its place: nothing behind it is sent before it."""

    def test_batches_stop_in_front_of_it(self, encoder: RecordEncoder, device: FakeDevice) -> None:
        box = Outbox(100, 1 << 20)
        box.put(1, encoder.record(1, _record({"a": 1})))
        box.put(2, encoder.record(2, _record({"gpu": DeviceScalar(7.0)})))
        box.put(3, encoder.record(3, _record({"b": 2})))
        assert [seq for seq, _ in box.take(10, 1 << 20)] == [1]
        assert box.take(10, 1 << 20) == [] and box.pending() == 3 and box.has_unsent()
        device.finish()
        batch = box.take(10, 1 << 20)
        assert [seq for seq, _ in batch] == [2, 3]
        assert decode(batch[0][1])["msg"] == {"gpu": 7.0}
        box.ack(3)
        assert box.pending() == 0 and box._nbytes == 0

    def test_a_deferred_record_can_be_dropped_like_any_other(self, encoder: RecordEncoder) -> None:
        box = Outbox(2, 1 << 20)
        box.put(1, encoder.record(1, _record({"gpu": DeviceScalar(1.0)})))
        box.put(2, encoder.record(2, _record({"a": 1})))
        box.put(3, encoder.record(3, _record({"b": 1})))
        assert box.dropped == 1 and box.base() == 2
        assert [seq for seq, _ in box.take(10, 1 << 20)] == [2, 3]


class TestThroughTheCollector:
    """End to end: records behind a pending copy wait, then all arrive, in order."""

    def test_delivery_waits_for_the_copy(
        self, collector: Callable[..., CollectorProcess], device: FakeDevice
    ) -> None:
        c = collector()
        handler = ZMQSocketHandler(c.endpoint, rank=0, world_size=1, close_timeout=10)
        handler._encoder = RecordEncoder(handler.identity, host_copy=device)
        logger = logging.getLogger("test.cuda.e2e")
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.info({"loss": 1.0}, extra={"step": 0})
        logger.info({"loss": DeviceScalar(0.5)}, extra={"step": 1})
        logger.info({"loss": 0.25}, extra={"step": 2})
        time.sleep(0.5)
        assert handler.stats["held"] == 2  # step 1 waits for its copy, step 2 behind it
        assert handler.outbox.in_flight() == 0
        device.finish()
        handler.flush()
        assert handler.stats == {"held": 0, "dropped": 0, "converted": 0}
        handler.close()
        c.terminate()
        assert c.wait(30) == 0
        rows = read_jsonl(c.output_dir / "training_params_and_metrics_global0.jsonl")
        assert [(row["step"], row["loss"]) for row in rows] == [(0, 1.0), (1, 0.5), (2, 0.25)]


@pytest.fixture
def cuda_device() -> None:
    """Skip without a CUDA device; fail instead under RANKLOG_REQUIRE_CUDA=1 (a GPU runner,
    `make gpu-check`)."""
    if torch.cuda.is_available():
        return
    reason = (f"needs a CUDA device (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda or 'none'}: torch.cuda.is_available() is False)")  # fmt: skip
    if os.environ.get("RANKLOG_REQUIRE_CUDA") == "1":
        pytest.fail(f"RANKLOG_REQUIRE_CUDA=1: {reason}")
    pytest.skip(reason)


@pytest.mark.usefixtures("cuda_device")
class TestRealCuda:
    """On a GPU machine: the copy really is asynchronous and really arrives."""

    def test_cuda_scalar_round_trip(self) -> None:
        enc = RecordEncoder(detect_identity(rank=0, world_size=1))
        value = torch.randn(256, 256, device="cuda").square().mean()
        deferred = enc.record(1, _record({"loss": value, "plain": 1}, step=torch.tensor(5)))
        assert isinstance(deferred, DeferredRecord)
        torch.cuda.synchronize()
        frame = deferred.result()
        assert frame is not None
        env = msgpack.unpackb(frame)
        assert env["msg"]["loss"] == pytest.approx(value.item()) and env["step"] == 5

    def test_emit_makes_no_host_sync_and_the_values_arrive(
        self, collector: Callable[..., CollectorProcess]
    ) -> None:
        """Through the handler, with torch's sync debug mode set to raise on any host sync
        while the training thread logs CUDA scalars as values and a CUDA scalar as the
        step; the collector's JSONL holds both as numbers."""
        c = collector()
        handler = ZMQSocketHandler(c.endpoint, rank=0, world_size=1, close_timeout=30)
        logger = logging.getLogger("test.cuda.nosync")
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)
        weights = torch.randn(512, 512, device="cuda")
        steps = torch.arange(20, device="cuda")  # steps[i] is a 0-d CUDA tensor, no copy
        losses = []
        handler.start()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(20):
                loss = (weights @ weights).square().mean() / (step + 1)
                losses.append(loss)
                logger.info({"loss": loss, "norm": weights.norm()}, extra={"step": steps[step]})
        finally:
            torch.cuda.set_sync_debug_mode("default")
        expected = [value.item() for value in losses]
        handler.close()
        c.terminate()
        assert c.wait(30) == 0
        rows = read_jsonl(c.output_dir / "training_params_and_metrics_global0.jsonl")
        assert [row["step"] for row in rows] == list(range(20))
        assert [row["loss"] for row in rows] == pytest.approx(expected, rel=1e-6)
