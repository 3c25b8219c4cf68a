"""Wire format v1: versioned msgpack maps, one envelope per ZeroMQ frame (see docs/protocol.md).

Never pickle: a frame decodes to plain maps, lists, strings and numbers, and every field is
checked before the collector trusts it. Shared by the rank side (which packs envelopes,
``ranklog.rank.encoder``) and the collector (which decodes and validates them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

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


class Rule(NamedTuple):
    """What a field's value must be.

    ``check`` is the rule itself. ``inline`` is a Python expression over ``{v}`` (the value,
    ``_MISSING`` when the key is absent) for the fast path in :func:`decode`; it may be
    stricter than ``check`` (a value it refuses goes to ``check``, which decides) but never
    more lenient.
    """

    check: Callable[[Any], bool]
    inline: str


class Field(NamedTuple):
    """One envelope key: the kinds that carry it and the rule its value follows."""

    name: str
    kinds: frozenset[str]
    rule: Rule


_MISSING: Any = object()


def _int(minimum: int) -> Rule:
    return Rule(
        lambda v: type(v) is int and v >= minimum, f"type({{v}}) is int and {{v}} >= {minimum}"
    )


def _is_extra(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and k not in RESERVED_EXTRA_KEYS for k in value
    )


_NAME = Rule(
    lambda v: isinstance(v, str) and 0 < len(v) <= MAX_NAME_CHARS,
    "type({v}) is str and 0 < len({v}) <= MAX_NAME_CHARS",
)
_NUMBER = Rule(lambda v: isinstance(v, int | float), "type({v}) is float")
_FLAG = Rule(lambda v: isinstance(v, bool), "type({v}) is bool")
# Present even when nil: a missing key reads as ``_MISSING``, which neither form accepts.
_INT_OR_NIL = Rule(lambda v: v is None or type(v) is int, "({v} is None or type({v}) is int)")
_MAP_OR_TEXT = Rule(lambda v: isinstance(v, dict | str), "(type({v}) is dict or type({v}) is str)")
_EXTRA = Rule(
    _is_extra,
    "type({v}) is dict and (not {v} or (RESERVED_EXTRA_KEYS.isdisjoint({v})"
    " and all(type(k) is str for k in {v})))",
)

_FROM_RANK = frozenset({RECORD, HELLO, HEARTBEAT, GOODBYE})
_EVERY = _FROM_RANK | {ACK}
_COUNTERS = frozenset({HELLO, HEARTBEAT, GOODBYE})
_RECORD = frozenset({RECORD})

# The envelope schema: every key besides ``v`` and ``kind``, in the order they are checked
# (so the first bad one is the one named). docs/protocol.md describes it; this is the truth.
ENVELOPE: tuple[Field, ...] = (
    Field("run", _EVERY, _NAME),
    Field("rank", _EVERY, _int(0)),
    Field("inc", _EVERY, _NAME),
    Field("seq", frozenset({ACK}), _int(0)),
    Field("local_rank", _FROM_RANK, _int(0)),
    Field("world_size", _FROM_RANK, _int(1)),
    Field("host", _FROM_RANK, _NAME),
    Field("pid", _FROM_RANK, _int(0)),
    Field("base", _COUNTERS, _int(0)),
    Field("dropped", _COUNTERS, _int(0)),
    Field("converted", _COUNTERS, _int(0)),
    Field("seq", frozenset({RECORD, GOODBYE}), _int(1)),
    Field("time", _RECORD, _NUMBER),
    Field("logger", _RECORD, _NAME),
    Field("level", _RECORD, _int(0)),
    Field("step", _RECORD, _INT_OR_NIL),
    Field("hparams", _RECORD, _FLAG),
    Field("msg", _RECORD, _MAP_OR_TEXT),
    Field("extra", _RECORD, _EXTRA),
)

# What every envelope from a rank carries (the encoder packs these once per process), and
# what a record carries besides, in the order the encoder packs them.
IDENTITY_FIELDS = tuple(f.name for f in ENVELOPE if f.kinds >= _FROM_RANK)
RECORD_FIELDS = tuple(
    f.name for f in ENVELOPE if RECORD in f.kinds and f.name not in IDENTITY_FIELDS
)
_CHECKS = {
    kind: tuple((f.name, f.rule.check) for f in ENVELOPE if kind in f.kinds) for kind in KINDS
}


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


def _compile_fast_record_check() -> Callable[[dict[Any, Any]], bool]:
    """One expression over every field of a record, generated from ``ENVELOPE``.

    Decoding is most of the collector's receive loop. Calling each field's ``check`` costs a
    Python call per field; this is what a hand-unrolled check would be, written once from the
    table: ``_r0 = e.get("run", _MISSING)`` ... ``return type(_r0) is str and ...``.
    """
    fields = [f for f in ENVELOPE if RECORD in f.kinds]
    gets = "".join(f"    _r{i} = e.get({f.name!r}, _MISSING)\n" for i, f in enumerate(fields))
    test = "\n        and ".join(f.rule.inline.format(v=f"_r{i}") for i, f in enumerate(fields))
    source = f"def plainly_valid_record(e):\n{gets}    return (\n        {test}\n    )\n"
    namespace: dict[str, Any] = {
        "_MISSING": _MISSING,
        "MAX_NAME_CHARS": MAX_NAME_CHARS,
        "RESERVED_EXTRA_KEYS": RESERVED_EXTRA_KEYS,
    }
    exec(compile(source, "<ranklog.wire record check>", "exec"), namespace)
    check: Callable[[dict[Any, Any]], bool] = namespace["plainly_valid_record"]
    return check


# True for a record envelope as ranks send them; anything else goes to ``_validate``, which
# decides and names the field.
_plainly_valid_record = _compile_fast_record_check()


def _validate(envelope: dict[Any, Any], kind: str) -> None:
    for name, check in _CHECKS[kind]:
        if not check(envelope.get(name, _MISSING)):
            got = envelope.get(name, "<missing>")
            raise ProtocolError("bad-field", f"field {name!r} has an invalid value {got!r:.80}")
