"""The collector's typed (msgspec) fast path says what wire.py's table says.

``decode`` tries a msgspec decoder generated from ``wire.ENVELOPE`` first and falls back to
msgpack and the table, which decide (and name the reason). So the typed path must never be
more lenient than the table, and what it returns must be exactly what the table's way
returns: checked here on the encoder's envelopes and on mutations of every field. The
backends' typed structs and the JSONL backend's batch way are checked against the
LogRecord way they replace.
"""

from __future__ import annotations

import logging
import math
import random
import warnings
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ranklog.backends.journaled import decode_journaled, decode_journaled_record
from ranklog.backends.jsonl import AsyncStructuredHandler
from ranklog.backends.records import build_record
from ranklog.backends.route import Route
from ranklog.backends.sink import Sink
from ranklog.envelope import (
    AckEnvelope,
    GoodbyeEnvelope,
    HeartbeatEnvelope,
    HelloEnvelope,
    LooseRecordEnvelope,
    RecordEnvelope,
)
from ranklog.errors import ProtocolError
from ranklog.filters import IsMappingFilter
from ranklog.rank.encoder import RecordEncoder
from ranklog.rank.identity import detect_identity
from ranklog.wire import (
    ENVELOPE,
    RECORD,
    _decode_untyped,
    _typed_records,
    decode,
    decode_message,
    pack_ack,
)

ENCODER = RecordEncoder(detect_identity(rank=2, local_rank=1, world_size=4, run_id="typed"))
RECORD_FIELDS = [f.name for f in ENVELOPE if RECORD in f.kinds]
JUNK: list[Any] = [
    None, -1, 0, 1, 2**64 - 1, -(2**63), 2.5, math.nan, math.inf, "", "x", "x" * 1025, True,
    False, [], [1, "a"], [[1]], {}, {"a": 1}, {"a": {"b": 1}}, {"a": {"b": {"c": 1}}},
    {1: 2}, {"rank": 1}, {"step": 3}, b"bytes", msgpack.ExtType(3, b"x"), {"a": b"b"},
]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _record(msg: object, step: object = 1, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("metrics", logging.INFO, "f", 1, msg, None, None)
    record.step = step
    record.__dict__.update(extra)
    return record


def _same(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down (1 is not 1.0 nor True; NaN is NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


def _outcome(decoder: Any, frame: bytes) -> Any:
    try:
        return decoder(frame)
    except ProtocolError as exc:
        return ("rejected", exc.reason, str(exc))


def _agree(frame: bytes) -> dict[str, Any] | None:
    """The typed path's answer agrees with the table's; the typed result, if any."""
    typed = _typed_records().envelope(frame)
    untyped = _outcome(_decode_untyped, frame)
    if typed is not None:
        assert isinstance(untyped, dict), (typed, untyped)  # never more lenient
        assert _same(typed, untyped), (typed, untyped)  # and the same envelope
    outcome = _outcome(decode, frame)
    if isinstance(untyped, dict):
        assert isinstance(outcome, dict) and _same(outcome, untyped)
    else:
        assert outcome == untyped  # the same reason, the same message
    _message_agrees(frame, typed, untyped)
    return typed


def _message_agrees(frame: bytes, typed: dict[str, Any] | None, untyped: Any) -> None:
    """``decode_message`` (the collector's static types) takes the same frames, gives the
    same reasons, and its struct holds the map's values; the C-decoded record struct takes
    exactly what the typed map path takes."""
    message = _outcome(decode_message, frame)
    if not isinstance(untyped, dict):
        assert message == untyped
        return
    assert isinstance(message, msgspec.Struct), message
    assert message.kind == untyped["kind"] and message.v == 1
    assert (type(message) is RecordEnvelope) == (typed is not None)
    for name in message.__struct_fields__:
        if name in untyped and name != "v":
            assert _same(getattr(message, name), untyped[name]), name


class TestTypedDecodeAgreesWithTheTable:
    def test_the_typed_path_is_on(self) -> None:
        typed = _typed_records()
        assert typed.checked is not None and typed.general is not None
        frame = ENCODER.record(1, _record({"loss": 1.0}))
        assert _agree(frame) is not None  # a rank's record takes the typed path

    @settings(max_examples=300, deadline=None)
    @given(
        st.dictionaries(st.text(max_size=8), values, max_size=6),
        st.one_of(st.none(), st.integers(0, 2**40)),
        st.dictionaries(st.sampled_from(["tag", "note", "k"]), scalars, max_size=2),
    )
    def test_what_ranks_send(self, msg: dict[str, Any], step: int | None, extra: Any) -> None:
        _agree(ENCODER.record(7, _record(msg, step, **extra)))

    @pytest.mark.parametrize("name", [*RECORD_FIELDS, "v", "kind"])
    def test_every_field_mutated(self, name: str) -> None:
        base = msgpack.unpackb(ENCODER.record(3, _record({"a": 1.5}, 4)))
        for value in JUNK:
            envelope = dict(base)
            envelope[name] = value
            _agree(msgpack.packb(envelope))
            del envelope[name]
            _agree(msgpack.packb(envelope))

    def test_random_mutations_and_unknown_keys(self) -> None:
        rng = random.Random(11)
        base = msgpack.unpackb(ENCODER.record(3, _record({"a": 1.5, "b": "t"}, None, tag="x")))
        for _ in range(3000):
            envelope = dict(base)
            for _ in range(rng.randint(1, 3)):
                key = rng.choice([*envelope, "unknown", "resent", 1])
                if rng.random() < 0.2:
                    envelope.pop(key, None)
                else:
                    envelope[key] = rng.choice(JUNK)
            _agree(msgpack.packb(envelope))

    def test_duplicate_keys_and_garbage(self) -> None:
        frame = ENCODER.record(3, _record({"a": 1.5}, 4))
        envelope = msgpack.unpackb(frame)
        pairs = [*envelope.items(), ("seq", 0)]  # a second seq, invalid: the last one wins
        body = b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in pairs)
        assert _agree(b"\xde" + len(pairs).to_bytes(2, "big") + body) is None
        pairs = [*list(envelope.items())[1:], ("v", 1)]  # same count, an entry moved
        body = b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in pairs)
        _agree(b"\xde" + len(pairs).to_bytes(2, "big") + body)
        for cut in range(0, len(frame), 7):
            _agree(frame[:cut] or b"\xc1")
        _agree(frame + b"\x00")
        _agree(frame.replace(b"metrics", b"metr\xffcs"))


class TestJournaledStructs:
    @settings(max_examples=200, deadline=None)
    @given(
        st.one_of(st.dictionaries(st.text(max_size=8), values, max_size=6), st.text(max_size=9)),
        st.one_of(st.none(), st.integers(0, 2**40)),
    )
    def test_the_struct_has_the_envelopes_fields(self, msg: Any, step: int | None) -> None:
        frame = ENCODER.record(2, _record(msg, step))
        envelope = decode_journaled(frame)
        typed = decode_journaled_record(frame)
        if typed is None:  # a value the typed path does not take (say a float NaN key)
            return
        assert all(_same(getattr(typed, k), v) for k, v in envelope.items())
        flat = type(msg) is dict and all(
            type(v) in (bool, int, float, str, type(None)) for v in msg.values()
        )
        assert typed.flat is flat
        rebuilt, expected = build_record(typed, 5, 9), build_record(envelope, 5, 9)
        assert rebuilt.__dict__.keys() == expected.__dict__.keys()
        assert all(_same(rebuilt.__dict__[k], v) for k, v in expected.__dict__.items())

    def test_a_goodbye_is_none(self) -> None:
        goodbye = ENCODER.control("goodbye", seq=4, base=0, dropped=0, converted=0)
        assert decode(goodbye)["kind"] == "goodbye"
        assert decode_journaled_record(goodbye) is None

    def test_a_record_the_struct_refuses_reaches_a_backend_the_tables_way(self) -> None:
        """A value nested deeper than the struct takes: the sink builds its LogRecord from
        the map instead, the same as for any record; a goodbye builds none."""
        msg = {"a": {"b": {"c": 1}}, "bytes": b"x"}
        frame = ENCODER.record(3, _record(msg, 7))
        assert decode_journaled_record(frame) is None
        sink = Sink(logging.NullHandler(), Route([logging.getLogger()]))
        record = sink.record(frame, 5, 9)
        assert record is not None
        assert (record.msg, record.step, record.rank, record.run_id) == (msg, 7, 2, "typed")
        goodbye = ENCODER.control("goodbye", seq=4, base=0, dropped=0, converted=0)
        assert sink.record(goodbye, 9, 20) is None
        assert sink.failed == 0  # nothing reported: a goodbye is no record


MESSAGES: list[Any] = [
    {"loss": 0.5, "lr": 1e-4, "n": 3, "ok": True, "none": None, "s": "x"},
    {"loss": math.nan, "g": math.inf, "h": -math.inf},
    {"a": {"b": 1.0, "c": 2}, "d": [1, 2.5]},  # typed, not flat: flattened
    {"step": 99, "timestamp": "mine", "v": 1.0},
    {},
    "a text message",
]


@pytest.mark.parametrize("filtered", [True, False])
def test_jsonl_batch_way_writes_the_record_ways_bytes(tmp_path: Path, filtered: bool) -> None:
    frames = []
    for seq, msg in enumerate(MESSAGES * 2, 1):
        step = None if seq % 4 == 0 else seq
        record = _record(msg, step, hparams=seq == 3)
        record.created += seq * 0.123457
        frames.append(ENCODER.record(seq, record))
    ways = {}
    for way in ("records", "envelopes"):
        handler = AsyncStructuredHandler(log_dir=tmp_path / way)
        if filtered:
            handler.addFilter(IsMappingFilter())
        assert handler.takes_envelopes()
        batch = [(decode_journaled_record(f), 0, i) for i, f in enumerate(frames)]
        assert all(typed is not None for typed, _, _ in batch)
        with warnings.catch_warnings():  # unfiltered, a text message warns (and is skipped)
            warnings.simplefilter("ignore")
            if way == "records":
                for _, start, end in batch:
                    handler.handle(build_record(decode_journaled(frames[end]), start, end))
            else:
                handler.handle_envelopes(batch)
        handler.close()
        (path,) = (tmp_path / way).glob("*.jsonl")
        ways[way] = path.read_bytes()
    assert ways["records"] == ways["envelopes"]
    assert ways["records"].count(b"\n") == len(frames) - 2  # text: skipped either way


def test_a_subclass_that_changes_emit_gets_log_records() -> None:
    class Slow(AsyncStructuredHandler):
        def emit(self, record: logging.LogRecord) -> None:
            super().emit(record)

    assert not Slow(log_dir="unused").takes_envelopes()
    plain = AsyncStructuredHandler(log_dir="unused")
    plain.addFilter(lambda record: True)
    assert not plain.takes_envelopes()


class TestEveryKindHasAStaticType:
    """``decode_message`` reads each kind into its own struct, optional fields at their
    wire default when a rank leaves them out; what ``decode`` rejects it rejects alike."""

    def test_control_kinds(self) -> None:
        hello = decode_message(ENCODER.control("hello", base=1, dropped=2, converted=3))
        assert isinstance(hello, HelloEnvelope)
        assert (hello.run, hello.rank, hello.base, hello.dropped, hello.converted) == (
            "typed",
            2,
            1,
            2,
            3,
        )
        assert hello.resent == 0  # absent: a rank that does not report it
        beat = decode_message(ENCODER.control("heartbeat", base=0, dropped=0, converted=0))
        assert isinstance(beat, HeartbeatEnvelope)
        bye = decode_message(
            ENCODER.control("goodbye", seq=9, base=0, dropped=0, converted=0, spilled=4)
        )
        assert isinstance(bye, GoodbyeEnvelope) and (bye.seq, bye.spilled) == (9, 4)
        ack = decode_message(pack_ack("typed", 2, "inc", 7, 9))
        assert isinstance(ack, AckEnvelope) and (ack.seq, ack.got) == (7, 9)
        plain = decode_message(pack_ack("typed", 2, "inc", 7))
        assert isinstance(plain, AckEnvelope) and plain.got is None

    def test_a_record_the_struct_refuses_is_loose(self) -> None:
        frame = ENCODER.record(3, _record({"a": {"b": {"c": 1}}}, 7))
        record = decode_message(frame)
        assert isinstance(record, LooseRecordEnvelope)
        assert (record.msg, record.step, record.seq) == ({"a": {"b": {"c": 1}}}, 7, 3)

    def test_a_control_field_out_of_its_rule_is_rejected(self) -> None:
        frame = ENCODER.control("heartbeat", base=0, dropped=-1, converted=0)
        with pytest.raises(ProtocolError) as info:
            decode_message(frame)
        assert info.value.reason == "bad-field" and "dropped" in str(info.value)
