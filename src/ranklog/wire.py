"""Wire format v1: versioned msgpack maps, one envelope per ZeroMQ frame (see docs/protocol.md).

Never pickle: a frame decodes to plain maps, lists, strings and numbers, and every field is
checked before the collector trusts it. Shared by the rank side (which packs envelopes,
``ranklog.rank.encoder``) and the collector (which decodes and validates them).
"""

from __future__ import annotations

import logging
from typing import Any

import msgpack

from ranklog.errors import ProtocolError

PROTOCOL_VERSION = 1
RECORD, HELLO, HEARTBEAT, GOODBYE, ACK = "record", "hello", "heartbeat", "goodbye", "ack"
KINDS = frozenset({RECORD, HELLO, HEARTBEAT, GOODBYE, ACK})

MAX_FRAME_BYTES = 16 * 1024 * 1024
MAX_NAME_CHARS = 1024

# Attributes every LogRecord has; anything else on a record came from `extra=`.
STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
RESERVED_EXTRA_KEYS = STANDARD_ATTRS | {"rank", "local_rank", "world_size", "host", "run_id"}
# A record's own envelope fields, after the identity fields and kind (see RecordEncoder.record).
RECORD_FIELDS = ("seq", "time", "logger", "level", "step", "hparams", "msg", "extra")


def pack_ack(run: str, rank: int, incarnation: str, seq: int) -> bytes:
    """The collector's acknowledgement: every seq up to ``seq`` is safe."""
    packed: bytes = msgpack.packb(
        {
            "v": PROTOCOL_VERSION,
            "kind": ACK,
            "run": run,
            "rank": rank,
            "inc": incarnation,
            "seq": seq,
        }
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
    if not isinstance(kind, str) or kind not in KINDS:
        raise ProtocolError("unknown-kind", f"expected one of {sorted(KINDS)}, got {kind!r:.40}")
    if kind != RECORD or not _plainly_valid_record(envelope):
        _validate(envelope, kind)
    return envelope


def decode_journaled(frame: bytes) -> dict[str, Any]:
    """Decode a journal entry: an envelope :func:`decode` accepted on its way in (the
    journal's checksum guards the bytes since), so it is not validated again."""
    envelope: dict[str, Any] = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    return envelope


def _plainly_valid_record(e: dict[Any, Any]) -> bool:
    """True for a record envelope as ranks send them; anything else goes to ``_validate``,
    which decides and names the field. One expression instead of a call per field: decoding
    is most of the collector's receive loop."""
    run, inc, host, logger = e.get("run"), e.get("inc"), e.get("host"), e.get("logger")
    rank, local_rank, world_size = e.get("rank"), e.get("local_rank"), e.get("world_size")
    pid, seq, level, step = e.get("pid"), e.get("seq"), e.get("level"), e.get("step")
    msg, extra = e.get("msg"), e.get("extra")
    return (
        type(run) is str and 0 < len(run) <= MAX_NAME_CHARS
        and type(inc) is str and 0 < len(inc) <= MAX_NAME_CHARS
        and type(host) is str and 0 < len(host) <= MAX_NAME_CHARS
        and type(logger) is str and 0 < len(logger) <= MAX_NAME_CHARS
        and type(rank) is int and rank >= 0
        and type(local_rank) is int and local_rank >= 0
        and type(world_size) is int and world_size >= 1
        and type(pid) is int and pid >= 0
        and type(seq) is int and seq >= 1
        and type(level) is int and level >= 0
        and (step is None or type(step) is int)
        and type(e.get("time")) is float
        and type(e.get("hparams")) is bool
        and (type(msg) is dict or type(msg) is str)
        and type(extra) is dict
        and (not extra or (RESERVED_EXTRA_KEYS.isdisjoint(extra)
                           and all(type(k) is str for k in extra)))
    )  # fmt: skip


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
    _check(envelope, "step", "step" in envelope)  # present, even when nil
    step = envelope["step"]
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
