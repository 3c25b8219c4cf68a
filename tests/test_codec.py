"""Wire format v1: what a rank packs, the collector decodes, and what it rejects."""

from __future__ import annotations

import logging
import warnings

import msgpack
import numpy as np
import pytest
import torch

from ranklog.errors import ProtocolError
from ranklog.rank.encoder import RecordEncoder
from ranklog.rank.identity import detect_identity
from ranklog.wire import (
    GOODBYE,
    HEARTBEAT,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    decode,
    pack_ack,
)


def _record(msg: object, **extra: object) -> logging.LogRecord:
    return logging.getLogger("m").makeRecord(
        "m", logging.INFO, "f.py", 1, msg, None, None, extra=extra or None
    )


@pytest.fixture
def encoder() -> RecordEncoder:
    return RecordEncoder(detect_identity(rank=3, local_rank=1, world_size=8, run_id="job"))


class TestRecordEnvelope:
    """A record envelope carries every field DESIGN.md lists and round-trips."""

    def test_fields_round_trip(self, encoder: RecordEncoder) -> None:
        frame = encoder.record(7, _record({"a": {"b": 1.5}}, step=12, hparams=True, tag="x"))
        env = decode(frame)
        assert env["v"] == PROTOCOL_VERSION and env["kind"] == "record"
        assert (env["run"], env["rank"], env["local_rank"], env["world_size"]) == ("job", 3, 1, 8)
        assert env["seq"] == 7 and env["step"] == 12 and env["hparams"] is True
        assert env["msg"] == {"a": {"b": 1.5}}
        assert env["extra"] == {"tag": "x"}
        assert env["logger"] == "m" and env["level"] == logging.INFO
        assert isinstance(env["host"], str) and env["pid"] > 0 and env["inc"]

    def test_string_message_is_formatted(self, encoder: RecordEncoder) -> None:
        rec = logging.LogRecord("m", logging.INFO, "f", 1, "hello %s", ("world",), None)
        assert decode(encoder.record(1, rec))["msg"] == "hello world"

    def test_numpy_and_torch_scalars_become_numbers(self, encoder: RecordEncoder) -> None:
        msg = {
            "np32": np.float32(0.5),
            "np64": np.int64(3),
            "t0": torch.tensor(2.5),
            "t1": torch.tensor([4]),
            "step_t": 1,
        }
        env = decode(encoder.record(1, _record(msg, step=np.int64(9))))
        assert env["msg"] == {"np32": 0.5, "np64": 3, "t0": 2.5, "t1": 4, "step_t": 1}
        assert env["step"] == 9
        assert encoder.converted == 0

    def test_unpackable_values_become_repr_and_are_counted(self, encoder: RecordEncoder) -> None:
        class Thing:
            def __repr__(self) -> str:
                return "<thing>"

        env = decode(encoder.record(1, _record({"obj": Thing(), "big": 2**70, "t": torch.ones(3)})))
        assert env["msg"]["obj"] == "<thing>"
        assert env["msg"]["big"] == repr(2**70)
        assert env["msg"]["t"].startswith("tensor(")
        assert encoder.converted == 3

    def test_reserved_extra_keys_stay_off_the_wire(self, encoder: RecordEncoder) -> None:
        env = decode(encoder.record(1, _record({"x": 1}, rank=99, world_size=1000, note="n")))
        assert env["rank"] == 3 and env["extra"] == {"note": "n"}

    def test_control_envelopes(self, encoder: RecordEncoder) -> None:
        beat = decode(encoder.control(HEARTBEAT, base=5, dropped=1, converted=0))
        assert beat["kind"] == "heartbeat" and beat["base"] == 5
        bye = decode(encoder.control(GOODBYE, seq=10, base=10, dropped=0, converted=0))
        assert bye["kind"] == "goodbye" and bye["seq"] == 10
        ack = decode(pack_ack("job", 3, "abc", 42))
        assert ack["kind"] == "ack" and ack["seq"] == 42


def _valid() -> dict[str, object]:
    enc = RecordEncoder(detect_identity(rank=0, world_size=1, run_id="r"))
    env: dict[str, object] = msgpack.unpackb(enc.record(1, _record({"loss": 1.0}, step=1)))
    return env


class TestConversionWarnings:
    """The first value sent as its repr, and the first step dropped, are warned about once,
    by key; the rest only counted."""

    def test_first_repr_names_the_key(self, encoder: RecordEncoder) -> None:
        with pytest.warns(RuntimeWarning, match="'train/odd'"):
            encoder.record(1, _record({"train": {"odd": object()}}))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            encoder.record(2, _record({"other": object()}))
        assert encoder.converted == 2

    def test_first_dropped_step(self, encoder: RecordEncoder) -> None:
        with pytest.warns(RuntimeWarning, match="step 1.5 is not an integer"):
            frame = encoder.record(1, _record({"loss": 1.0}, step=1.5))
        assert msgpack.unpackb(frame)["step"] is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            encoder.record(2, _record({"loss": 1.0}, step="x"))
        assert encoder.converted == 2

    def test_optional_fields_of_newer_ranks_and_collectors(self, encoder: RecordEncoder) -> None:
        bye = decode(encoder.control(GOODBYE, seq=3, base=1, dropped=0, converted=0, resent=4,
                                     spilled=2))  # fmt: skip
        assert (bye["resent"], bye["spilled"]) == (4, 2)
        assert msgpack.unpackb(pack_ack("job", 3, "i", 5, 9))["got"] == 9
        with pytest.raises(ProtocolError, match="spilled"):
            decode(encoder.control(GOODBYE, seq=3, base=1, dropped=0, converted=0, spilled=-1))


class TestRejections:
    """Every hostile frame is rejected with a stable, countable reason."""

    @pytest.mark.parametrize(
        ("frame", "reason"),
        [
            (b"", "empty-frame"),
            (b"\xc1\xc1\xc1", "not-msgpack"),
            (msgpack.packb([1, 2, 3]), "not-a-map"),
            (msgpack.packb({"v": 2, "kind": "record"}), "bad-version"),
            (msgpack.packb({"v": 1, "kind": "launch"}), "unknown-kind"),
            (msgpack.packb({"v": 1, "kind": "record", "run": "r"}), "bad-field"),
            (msgpack.packb(msgpack.ExtType(5, b"x")), "unsupported-type"),
            (b"\x91" * 10_000 + b"\x01", "not-msgpack"),  # 10,000 nested arrays
            (b"\x00" * (MAX_FRAME_BYTES + 1), "too-large"),
        ],
    )
    def test_reason(self, frame: bytes, reason: str) -> None:
        with pytest.raises(ProtocolError) as info:
            decode(frame)
        assert info.value.reason == reason

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("rank", -1),
            ("rank", "0"),
            ("rank", True),
            ("seq", 0),
            ("step", 1.5),
            ("hparams", 1),
            ("msg", 3),
            ("extra", {"msg": 1}),
            ("logger", ""),
            ("world_size", 0),
        ],
    )
    def test_wrong_field_types(self, field: str, value: object) -> None:
        env = _valid()
        env[field] = value
        with pytest.raises(ProtocolError) as info:
            decode(msgpack.packb(env))
        assert info.value.reason == "bad-field" and field in str(info.value)

    def test_valid_frame_passes(self) -> None:
        assert decode(msgpack.packb(_valid()))["msg"] == {"loss": 1.0}
