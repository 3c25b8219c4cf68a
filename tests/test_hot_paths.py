"""The fast paths measured in bench/ say exactly what the slow paths they replaced said.

Caller side: the prepacked envelope head, the extra-attribute check. Collector side: the
one-expression record check in ``decode``, JSONL's flat-dict and timestamp shortcuts. Sender
thread: the in-flight window, sleeping until a record or a heartbeat is due, heartbeats only
when the rank is otherwise silent, and the outbox's acknowledgement hook.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from types import MappingProxyType
from typing import Any

import msgpack
import pytest
import zmq

from ranklog import ZMQSocketHandler
from ranklog.backends.jsonl import _flatten, _Timestamps
from ranklog.collector import router as router_module
from ranklog.collector.router import Router
from ranklog.collector.settings import ServeSettings
from ranklog.errors import ProtocolError
from ranklog.flatten import flatten_dict
from ranklog.rank.encoder import RecordEncoder
from ranklog.rank.identity import detect_identity
from ranklog.rank.outbox import Outbox
from ranklog.rank.sender import SenderSettings
from ranklog.wire import PROTOCOL_VERSION, _validate, decode, pack_ack


def _record(msg: object, **extra: object) -> logging.LogRecord:
    return logging.getLogger("m").makeRecord(
        "m", logging.INFO, "f.py", 1, msg, None, None, extra=extra or None
    )


@pytest.fixture
def encoder() -> RecordEncoder:
    return RecordEncoder(detect_identity(rank=2, local_rank=0, world_size=4, run_id="hot"))


class TestRecordEnvelope:
    """The prepacked head plus the record's own fields is the whole envelope, as one map."""

    def test_same_map_as_packing_everything(self, encoder: RecordEncoder) -> None:
        record = _record({"loss": 0.5, "nested": {"a": [1, 2]}}, step=4, hparams=False, note="n")
        env = msgpack.unpackb(encoder.record(9, record))
        ident = encoder._identity_fields
        expected = {
            **ident,
            "kind": "record",
            "seq": 9,
            "time": record.created,
            "logger": "m",
            "level": logging.INFO,
            "step": 4,
            "hparams": False,
            "msg": {"loss": 0.5, "nested": {"a": [1, 2]}},
            "extra": {"note": "n"},
        }
        assert env == expected and env["v"] == PROTOCOL_VERSION

    def test_attributes_added_after_the_record_was_made_are_extras(
        self, encoder: RecordEncoder
    ) -> None:
        record = _record({"x": 1}, step=1)
        logging.Formatter("%(asctime)s %(message)s").format(record)  # adds message, asctime
        assert decode(encoder.record(1, record))["extra"] == {}
        record.custom = "c"
        assert decode(encoder.record(2, record))["extra"] == {"custom": "c"}

    def test_a_mapping_that_is_not_a_dict_is_sent_as_a_map(self, encoder: RecordEncoder) -> None:
        env = decode(encoder.record(1, _record(MappingProxyType({"a": 1}))))
        assert env["msg"] == {"a": 1} and encoder.converted == 0

    def test_truthy_hparams_and_float_steps(self, encoder: RecordEncoder) -> None:
        env = decode(encoder.record(1, _record({"lr": 1}, hparams=1, step=3.0)))
        assert env["hparams"] is True and env["step"] == 3


class TestDecodeFastPath:
    """Whatever the one-expression check lets through, the field-by-field check accepts too;
    what it does not, the field-by-field check decides."""

    def _valid(self) -> dict[str, Any]:
        enc = RecordEncoder(detect_identity(rank=0, world_size=1, run_id="r"))
        env: dict[str, Any] = msgpack.unpackb(enc.record(1, _record({"loss": 1.0}, step=1)))
        return env

    @pytest.mark.parametrize(
        ("field", "value", "ok"),
        [
            ("extra", {"step": 3}, True),  # allowed in extra, only the fast check says no
            ("time", 5, True),  # an int time is valid
            ("step", None, True),
            ("msg", "text", True),
            ("extra", {"rank": 1}, False),
            ("extra", {1: "x"}, False),
            ("time", "now", False),
            ("seq", True, False),
            ("host", "", False),
            ("pid", -1, False),
        ],
    )
    def test_agrees_with_the_field_checks(self, field: str, value: Any, ok: bool) -> None:
        env = self._valid()
        env[field] = value
        frame = msgpack.packb(env)
        if ok:
            assert decode(frame)[field] == value
            _validate(env, "record")
        else:
            with pytest.raises(ProtocolError) as info:
                decode(frame)
            assert info.value.reason == "bad-field" and field in str(info.value)

    def test_random_mutations(self) -> None:
        rng = random.Random(6)
        junk: list[Any] = [None, -1, 0, 1, 2.5, "", "x", True, [], {}, {"msg": 1}, b"b"]
        base = self._valid()
        for _ in range(2000):
            env = dict(base)
            env[rng.choice(list(env))] = rng.choice(junk)
            try:
                _validate(env, "record")
                expected_ok = True
            except ProtocolError:
                expected_ok = False
            try:
                decode(msgpack.packb(env))
                ok = True
            except ProtocolError:
                ok = False
            assert ok == expected_ok or env.get("v") != 1 or env.get("kind") != "record", env


class TestJsonlShortcuts:
    """The JSONL backend's flat-dict and timestamp shortcuts produce the same text."""

    @pytest.mark.parametrize(
        "msg",
        [
            {"a": 1.0, "b": 2, "c": "s", "d": None, "e": True},
            {"a": {"b": {"c": 1}}, "d": 2},
            {1: 2.0, "x": 3},
            {"a": MappingProxyType({"b": 1})},
            {"t": (1, 2), "l": [1]},
            {},
        ],
    )
    def test_flatten(self, msg: dict[Any, Any]) -> None:
        assert _flatten(msg) == flatten_dict(msg)
        assert list(_flatten(msg)) == list(flatten_dict(msg))

    def test_timestamps_match_datetime(self) -> None:
        stamp = _Timestamps()
        rng = random.Random(1)
        values = [rng.uniform(-1e9, 4e9) for _ in range(20_000)]
        values += [1764211200 + k / 2_000_000 for k in range(-3, 4_000)]  # half-microseconds
        values += [0.0, -0.5, 1.9999999999, 1764211200.9999995, 1764211200.0000005]
        for value in values:
            assert stamp(value) == datetime.fromtimestamp(value).isoformat(), value


class TestOutboxHooks:
    """``on_ack`` reports releases; ``in_flight`` counts what waits for one."""

    def test_on_ack(self) -> None:
        box = Outbox(10, 1 << 20)
        acked: list[int] = []
        box.on_ack = acked.append
        for seq in (1, 2, 3):
            box.put(seq, b"x")
        box.take(2, 1 << 20)
        assert box.in_flight() == 2
        box.ack(0)  # releases nothing
        box.ack(2)
        assert acked == [2] and box.in_flight() == 0 and box.pending() == 1

    def test_resending_waits_longer_for_a_collector_that_acks_slowly(self) -> None:
        box = Outbox(10, 1 << 20)
        box.put(1, b"a")
        box.take(1, 1 << 20)
        time.sleep(0.05)
        box.ack(1)  # acknowledgements take about 50 ms
        box.put(2, b"b")
        box.take(1, 1 << 20)
        time.sleep(0.03)
        assert box.requeue(stale_after=0.01) == 0  # patient: 3 x 50 ms, at most 10 x 10 ms
        time.sleep(0.09)
        assert box.requeue(stale_after=0.01) == 1
        assert [seq for seq, _ in box.take(10, 1 << 20)] == [2]


@pytest.fixture
def router() -> Iterator[tuple[zmq.Socket[bytes], str]]:
    """A bare ROUTER standing in for the collector, to see exactly what a rank sends."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, f"tcp://127.0.0.1:{port}"
    sock.close(0)
    ctx.term()


def _receive(sock: zmq.Socket[bytes], seconds: float) -> list[tuple[bytes, dict[str, Any]]]:
    """Every envelope that arrives within ``seconds``, with its route."""
    got = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(max(1, int(left * 1000))):
            route, *frames = sock.recv_multipart()
            got.extend((route, msgpack.unpackb(frame)) for frame in frames)
    return got


def _handler(endpoint: str, **settings: Any) -> tuple[ZMQSocketHandler, logging.Logger]:
    handler = ZMQSocketHandler(
        endpoint, rank=0, world_size=1, close_timeout=0.2, settings=SenderSettings(**settings)
    )
    logger = logging.getLogger(f"test.hot.{id(handler)}")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return handler, logger


class TestGather:
    """The receive loop waits for the rest of a step's records only while that pays."""

    def test_stops_waiting_when_the_ranks_log_out_of_step(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A long gather, so that "a frame 0.1 s behind the first joins its batch" does not
        # depend on the machine's speed.
        monkeypatch.setattr(router_module, "_GATHER_S", 0.5)
        with Router(ServeSettings(bind="tcp://127.0.0.1:*")) as router:
            ctx = zmq.Context()
            rank = ctx.socket(zmq.DEALER)
            try:
                rank.connect(router.endpoint)
                self._in_step_then_out_of_step(router, rank)
            finally:
                # Also after a failed assertion: a context left to the garbage collector
                # with its socket open hangs in term() (the socket's weak reference is
                # cleared first), and stalled a later test until pytest-timeout.
                ctx.destroy(linger=0)

    @staticmethod
    def _in_step_then_out_of_step(router: Router, rank: zmq.Socket[bytes]) -> None:
        def batch(*, second_after: float | None) -> int:
            """Frames in the batch ``receive`` returns for one frame (and another sent
            ``second_after`` seconds into the receive, while it gathers)."""
            rank.send(b"first")
            if second_after is not None:
                # Sent while receive runs (the main thread does not touch ``rank`` then):
                # sent before it, both frames could be taken at once, a gather that caught
                # nothing.
                later = threading.Timer(second_after, rank.send, (b"second",))
                later.start()
            try:
                return sum(len(payload) for _, payload in router.receive(2000))
            finally:
                if second_after is not None:
                    later.join()

        # In step: a step's second record joins the first one's batch.
        assert batch(second_after=0.1) == 2
        # Out of step: the gathers catch nothing ...
        for _ in range(router_module._GATHER_MISSES):
            started = time.monotonic()
            assert batch(second_after=None) == 1
            assert time.monotonic() - started >= 0.4  # it waited
        # ... so a lone record no longer waits; one in _GATHER_RETRY batches still does.
        waited = 0
        for _ in range(router_module._GATHER_RETRY):
            started = time.monotonic()
            assert batch(second_after=None) == 1
            waited += time.monotonic() - started >= 0.4
        assert waited == 1


class TestSender:
    """What the sender thread puts on the wire, and when."""

    def test_in_flight_window(self, router: tuple[zmq.Socket[bytes], str]) -> None:
        sock, endpoint = router
        handler, logger = _handler(endpoint, max_in_flight=10, batch_records=4)
        for step in range(50):
            logger.info({"x": step}, extra={"step": step})
        records = [env for _, env in _receive(sock, 1.0) if env["kind"] == "record"]
        assert [env["seq"] for env in records] == list(range(1, 11))  # never acknowledged
        assert handler.outbox.in_flight() == 10 and handler.stats["held"] == 50
        with pytest.warns(RuntimeWarning):
            handler.close()

    def test_sleeps_when_idle_and_wakes_for_a_record(
        self, router: tuple[zmq.Socket[bytes], str]
    ) -> None:
        sock, endpoint = router
        handler, logger = _handler(endpoint, heartbeat_interval=30.0)
        handler.start()
        route, hello = _receive(sock, 1.0)[0]
        assert hello["kind"] == "hello"
        deadline = time.monotonic() + 2
        while not (handler._sender and handler._sender.asleep) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert handler._sender is not None and handler._sender.asleep
        sent = time.monotonic()
        logger.info({"x": 1}, extra={"step": 1})
        got = _receive(sock, 0.5)
        assert [env["seq"] for _, env in got if env["kind"] == "record"] == [1]
        assert time.monotonic() - sent < 1.0  # not at the next heartbeat, 30 s away
        sock.send_multipart([route, pack_ack(hello["run"], 0, hello["inc"], 1)])
        handler.flush()
        assert handler.stats["held"] == 0
        with pytest.warns(RuntimeWarning):  # nobody acknowledges its goodbye
            handler.close()

    def test_a_lone_records_ack_waits_for_the_next_pass(
        self, router: tuple[zmq.Socket[bytes], str]
    ) -> None:
        """At training cadence the thread does not wake for each ack (one wake-up per
        record, not two); a flush or a handled signal still reads it first: nothing
        delivered is spilled or counted as held."""
        sock, endpoint = router
        handler, logger = _handler(endpoint, heartbeat_interval=30.0, ack_timeout=30.0)
        handler.start()
        route, hello = _receive(sock, 1.0)[0]
        logger.info({"x": 1}, extra={"step": 1})
        assert [env["seq"] for _, env in _receive(sock, 0.5)] == [1]
        sock.send_multipart([route, pack_ack(hello["run"], 0, hello["inc"], 1)])
        time.sleep(0.3)  # ample for an ack on loopback: the thread sleeps on
        assert handler.outbox.in_flight() == 1
        sender = handler._sender
        assert sender is not None
        assert sender.spill_now("SIGUSR1", 1.0) is None  # nothing unacknowledged to spill
        assert handler.stats["held"] == 0
        logger.info({"x": 2}, extra={"step": 2})
        assert [env["seq"] for _, env in _receive(sock, 0.5)] == [2]
        sock.send_multipart([route, pack_ack(hello["run"], 0, hello["inc"], 2)])
        started = time.monotonic()
        handler.flush()
        assert handler.stats["held"] == 0 and time.monotonic() - started < 1.0
        with pytest.warns(RuntimeWarning):  # nobody acknowledges its goodbye
            handler.close()

    def test_heartbeats_only_when_otherwise_silent(
        self, router: tuple[zmq.Socket[bytes], str]
    ) -> None:
        sock, endpoint = router
        handler, logger = _handler(endpoint, heartbeat_interval=0.3)
        kinds: list[str] = []
        step = 0
        until = time.monotonic() + 1.5
        while time.monotonic() < until:  # records every 20 ms, each acknowledged
            logger.info({"x": step}, extra={"step": step})
            step += 1
            for route, env in _receive(sock, 0.02):
                kinds.append(env["kind"])
                if env["kind"] == "record":
                    sock.send_multipart([route, pack_ack(env["run"], 0, env["inc"], env["seq"])])
        # Every 0.3 s that would be 5 heartbeats; allow one for a stall of a loaded machine.
        assert kinds.count("hello") == 1 and kinds.count("heartbeat") <= 1 + 1
        quiet = [env["kind"] for _, env in _receive(sock, 1.0)]
        assert quiet.count("heartbeat") >= 2  # silent now: the heartbeat is back
        with pytest.warns(RuntimeWarning):
            handler.close()

    def test_changed_counters_are_reported_while_records_flow(
        self, router: tuple[zmq.Socket[bytes], str]
    ) -> None:
        sock, endpoint = router
        handler, logger = _handler(endpoint, heartbeat_interval=0.3)
        beats: list[dict[str, Any]] = []
        until = time.monotonic() + 1.5
        step = 0
        while time.monotonic() < until:
            logger.info({"odd": object()} if step == 5 else {"x": step}, extra={"step": step})
            step += 1
            for route, env in _receive(sock, 0.02):
                if env["kind"] == "heartbeat":
                    beats.append(env)
                if env["kind"] == "record":
                    sock.send_multipart([route, pack_ack(env["run"], 0, env["inc"], env["seq"])])
        assert any(beat["converted"] == 1 for beat in beats) and len(beats) <= 2
        with pytest.warns(RuntimeWarning):
            handler.close()
