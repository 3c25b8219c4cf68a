"""Wire format v1: versioned msgpack maps, one envelope per ZeroMQ frame (see docs/protocol.md).

Never pickle: a frame decodes to plain maps, lists, strings and numbers, and every field is
checked before the collector trusts it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import msgpack

from ranklog._errors import ProtocolError
from ranklog._identity import RankIdentity

PROTOCOL_VERSION = 1
RECORD, HELLO, HEARTBEAT, GOODBYE, ACK = "record", "hello", "heartbeat", "goodbye", "ack"
KINDS = frozenset({RECORD, HELLO, HEARTBEAT, GOODBYE, ACK})

MAX_FRAME_BYTES = 16 * 1024 * 1024
MAX_NAME_CHARS = 1024
_MAX_SANITIZE_DEPTH = 64

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_HANDLED_EXTRAS = frozenset({"step", "hparams"})
RESERVED_EXTRA_KEYS = _STANDARD_ATTRS | {"rank", "local_rank", "world_size", "host", "run_id"}


class RecordEncoder:
    """Builds and packs envelopes for one process identity (caller thread only).

    Values msgpack cannot carry are converted: numpy and torch scalars (and one-element
    CPU tensors) to Python numbers, anything else to its ``repr``; ``converted`` counts the
    ``repr`` fallbacks so they reach the collector.
    """

    def __init__(self, identity: RankIdentity) -> None:
        self.converted = 0
        self._identity_fields: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "run": identity.run_id,
            "rank": identity.rank,
            "local_rank": identity.local_rank,
            "world_size": identity.world_size,
            "host": identity.host,
            "pid": identity.pid,
            "inc": identity.incarnation,
        }
        self._packer = msgpack.Packer(default=self._to_wire)

    def record(self, seq: int, record: logging.LogRecord) -> bytes:
        """Pack one LogRecord as a ``record`` envelope."""
        msg: Any = record.msg
        if not isinstance(msg, Mapping):
            msg = record.getMessage()
        extra = {
            key: value
            for key, value in record.__dict__.items()
            if key not in RESERVED_EXTRA_KEYS and key not in _HANDLED_EXTRAS
        }
        envelope = {
            **self._identity_fields,
            "kind": RECORD,
            "seq": seq,
            "time": record.created,
            "logger": record.name,
            "level": record.levelno,
            "step": self._step(record.__dict__.get("step")),
            "hparams": bool(record.__dict__.get("hparams", False)),
            "msg": msg,
            "extra": extra,
        }
        return self._pack(envelope)

    def control(self, kind: str, **fields: Any) -> bytes:
        """Pack a hello, heartbeat or goodbye envelope."""
        return self._pack({**self._identity_fields, "kind": kind, **fields})

    def _pack(self, envelope: dict[str, Any]) -> bytes:
        try:
            packed: bytes = self._packer.pack(envelope)
        except (TypeError, ValueError, OverflowError):
            # Rare slow path: huge ints, odd keys, cycles or absurd nesting. Rebuild a safe copy.
            self._packer.reset()
            packed = self._packer.pack(self._sanitize(envelope, 0))
        return packed

    def _step(self, value: Any) -> int | None:
        if value is None or type(value) is int:
            return value
        number = value if isinstance(value, int | float) else self._to_wire(value)
        if isinstance(number, int) or (isinstance(number, float) and number.is_integer()):
            return int(number)
        self.converted += 1
        return None

    def _to_wire(self, value: Any) -> Any:
        module = type(value).__module__
        if module == "numpy" and getattr(value, "ndim", None) == 0:
            return value.item()
        if module == "torch" and "torch" in sys.modules:
            if isinstance(value, sys.modules["torch"].Tensor) and value.numel() == 1:
                return value.item()
        if isinstance(value, set | frozenset):
            return list(value)
        self.converted += 1
        return repr(value)

    def _sanitize(self, value: Any, depth: int) -> Any:
        if depth > _MAX_SANITIZE_DEPTH:
            self.converted += 1
            return repr(value)[:256]
        if isinstance(value, Mapping):
            return {
                key if isinstance(key, str) else str(key): self._sanitize(item, depth + 1)
                for key, item in value.items()
            }
        if isinstance(value, list | tuple | set | frozenset):
            return [self._sanitize(item, depth + 1) for item in value]
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
            self.converted += 1
            return repr(value)
        if value is None or isinstance(value, str | bytes | int | float):
            return value
        return self._sanitize(self._to_wire(value), depth + 1)


def pack_ack(run: str, rank: int, incarnation: str, seq: int) -> bytes:
    """The collector's acknowledgement: every seq up to ``seq`` is safe."""
    packed: bytes = msgpack.packb(
        {"v": PROTOCOL_VERSION, "kind": ACK, "run": run, "rank": rank, "inc": incarnation, "seq": seq}
    )
    return packed


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("unsupported-type", f"msgpack extension type {code} is not part of v1")


def _is_int(value: Any, minimum: int) -> bool:
    return type(value) is int and value >= minimum


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_CHARS


def _check(envelope: dict[Any, Any], field: str, ok: bool) -> None:
    if not ok:
        got = envelope.get(field, "<missing>")
        raise ProtocolError("bad-field", f"field {field!r} has an invalid value {got!r:.80}")


def decode(frame: bytes) -> dict[str, Any]:
    """Decode and validate one frame; raise :class:`ProtocolError` with a counted reason."""
    if not frame:
        raise ProtocolError("empty-frame", "expected a msgpack map, got 0 bytes")
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError("too-large", f"{len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        envelope = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=False,
            ext_hook=_reject_ext,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several types for garbage; all mean the same here
        raise ProtocolError("not-msgpack", f"{type(exc).__name__}: {exc}"[:200]) from None
    if not isinstance(envelope, dict):
        raise ProtocolError("not-a-map", f"expected a msgpack map, got {type(envelope).__name__}")
    if envelope.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            "bad-version", f"expected v={PROTOCOL_VERSION}, got {envelope.get('v')!r:.40}"
        )
    kind = envelope.get("kind")
    if kind not in KINDS:
        raise ProtocolError("unknown-kind", f"expected one of {sorted(KINDS)}, got {kind!r:.40}")
    _validate(envelope, kind)
    return envelope


def _validate(envelope: dict[Any, Any], kind: str) -> None:
    _check(envelope, "run", _is_name(envelope.get("run")))
    _check(envelope, "rank", _is_int(envelope.get("rank"), 0))
    _check(envelope, "inc", _is_name(envelope.get("inc")))
    if kind == ACK:
        _check(envelope, "seq", _is_int(envelope.get("seq"), 0))
        return
    _check(envelope, "local_rank", _is_int(envelope.get("local_rank"), 0))
    _check(envelope, "world_size", _is_int(envelope.get("world_size"), 1))
    _check(envelope, "host", _is_name(envelope.get("host")))
    _check(envelope, "pid", _is_int(envelope.get("pid"), 0))
    if kind in (HELLO, HEARTBEAT, GOODBYE):
        for counter in ("base", "dropped", "converted"):
            _check(envelope, counter, _is_int(envelope.get(counter), 0))
    if kind in (RECORD, GOODBYE):
        _check(envelope, "seq", _is_int(envelope.get("seq"), 1))
    if kind != RECORD:
        return
    _check(envelope, "time", isinstance(envelope.get("time"), int | float))
    _check(envelope, "logger", _is_name(envelope.get("logger")))
    _check(envelope, "level", _is_int(envelope.get("level"), 0))
    step = envelope.get("step")
    _check(envelope, "step", step is None or type(step) is int)
    _check(envelope, "hparams", isinstance(envelope.get("hparams"), bool))
    _check(envelope, "msg", isinstance(envelope.get("msg"), dict | str))
    extra = envelope.get("extra")
    _check(
        envelope,
        "extra",
        isinstance(extra, dict)
        and all(isinstance(k, str) and k not in RESERVED_EXTRA_KEYS for k in extra),
    )
