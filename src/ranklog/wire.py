"""Wire format v1: versioned msgpack maps, one envelope per ZeroMQ frame (see docs/protocol.md).

Never pickle: a frame decodes to plain maps, lists, strings and numbers, and every field is
checked before the collector trusts it. Shared by the rank side (which packs envelopes,
``ranklog.rank.encoder``) and the collector (which decodes and validates them). The
collector first tries msgspec decoders generated from the same table (typed, checked in
C; its ``collector`` extra, which the rank side never imports) into the static record type
of ``ranklog.envelope``; what they refuse goes to msgpack and the table, which decide and
name the reason.
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict

import msgpack

from ranklog.errors import ProtocolError
from ranklog.names import MAX_NAME_CHARS

if TYPE_CHECKING:
    from msgspec.msgpack import Decoder

    from ranklog.envelope import FlatRecordEnvelope, Message, RecordEnvelope

PROTOCOL_VERSION = 1
RECORD, HELLO, HEARTBEAT, GOODBYE, ACK = "record", "hello", "heartbeat", "goodbye", "ack"
KINDS = frozenset({RECORD, HELLO, HEARTBEAT, GOODBYE, ACK})

MAX_FRAME_BYTES = 16 * 1024 * 1024

# Attributes every LogRecord has; anything else on a record came from `extra=`.
STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
RESERVED_EXTRA_KEYS = STANDARD_ATTRS | {"rank", "local_rank", "world_size", "host", "run_id"}


class Rule(NamedTuple):
    """What a field's value must be.

    ``check`` is the rule itself (its argument is ``_MISSING`` when the key is absent). The
    collector's typed fast path has the same rule as a type (``ranklog.envelope``), which
    may be stricter, never more lenient; ``rest``: what the type cannot say (which keys are
    reserved), checked on a value the type took.
    """

    check: Callable[[Any], bool]
    rest: Callable[[Any], bool] | None = None


class Field(NamedTuple):
    """One envelope key: the kinds that carry it and the rule its value follows."""

    name: str
    kinds: frozenset[str]
    rule: Rule


_MISSING: Any = object()


def _int(minimum: int) -> Rule:
    return Rule(lambda v: type(v) is int and v >= minimum)


def _optional_int(minimum: int) -> Rule:
    """An int >= ``minimum``, or absent: a field v1 ranks or collectors may leave out."""
    return Rule(lambda v: v is _MISSING or (type(v) is int and v >= minimum))


def _is_extra(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and k not in RESERVED_EXTRA_KEYS for k in value
    )


_NAME = Rule(
    lambda v: isinstance(v, str) and 0 < len(v) <= MAX_NAME_CHARS,
)
_NUMBER = Rule(lambda v: isinstance(v, int | float))
_FLAG = Rule(lambda v: isinstance(v, bool))
# Present even when nil: a missing key reads as ``_MISSING``, which neither form accepts.
_INT_OR_NIL = Rule(
    lambda v: v is None or type(v) is int,
)
_MAP_OR_TEXT = Rule(
    lambda v: isinstance(v, dict | str),
)
_EXTRA = Rule(
    _is_extra,
    rest=RESERVED_EXTRA_KEYS.isdisjoint,
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
    # Optional: records the rank sent again (a resend after a reconnect or a lost batch).
    Field("resent", _COUNTERS, _optional_int(0)),
    # Optional: records the rank left in its spill file at exit (its goodbye ends it anyway).
    Field("spilled", frozenset({GOODBYE}), _optional_int(0)),
    # Optional: the highest seq the collector received but could not accept (its journal
    # could not be written): the rank sends everything after ``seq`` again.
    Field("got", frozenset({ACK}), _optional_int(0)),
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


def pack_ack(job: str, rank: int, incarnation: str, seq: int, got: int | None = None) -> bytes:
    """The collector's acknowledgement: every seq up to ``seq`` is safe; ``got`` (when
    given): seqs up to it arrived but were not kept, so the rank should send them again."""
    ack: dict[str, Any] = {
        "v": PROTOCOL_VERSION, "kind": ACK, "run": job, "rank": rank, "inc": incarnation, "seq": seq
    }  # fmt: skip
    if got is not None:
        ack["got"] = got
    packed: bytes = msgpack.packb(ack)
    return packed


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("unsupported-type", f"msgpack extension type {code} is not part of v1")


def decode(frame: bytes) -> dict[str, Any]:
    """Decode and validate one frame into a map; raise :class:`ProtocolError` with a
    counted reason. (The collector reads :func:`decode_message`'s static types instead.)"""
    _check_size(frame)
    typed = (_TYPED or _typed_records()).envelope(frame)
    if typed is not None:
        return typed
    return _decode_untyped(frame)


def decode_message(frame: bytes) -> Message:
    """:func:`decode`, into the static type of the envelope's kind
    (:data:`ranklog.envelope.Message`): what the collector reads. Needs msgspec (the
    collector extra). The same frames are accepted, with the same reasons for the rest."""
    _check_size(frame)
    typed = _TYPED or _typed_records()
    record = typed.record(frame)
    if record is not None:
        return record
    return typed.message(_decode_untyped(frame))


def _check_size(frame: bytes) -> None:
    if not frame:
        raise ProtocolError("empty-frame", "expected a msgpack map, got 0 bytes")
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError("too-large", f"{len(frame)} bytes exceeds {MAX_FRAME_BYTES}")


def _decode_untyped(frame: bytes) -> dict[str, Any]:
    """:func:`decode` by msgpack and the table: what decides, and names the reason."""
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
    _validate(envelope, kind)
    return envelope


class _TypedRecords:
    """msgspec decoders of ``ranklog.envelope``'s static record type: a record envelope as
    ranks send it, decoded and checked in C. Whatever they refuse goes the untyped way,
    which decides."""

    def __init__(self) -> None:
        self.general: Decoder[RecordEnvelope] | None = None
        self.checked: Any = None  # a Decoder of a TypedDict made below, at run time
        self.header: tuple[bytes, ...] = ()
        self.flat: Decoder[FlatRecordEnvelope] | None = None
        self.rest: tuple[tuple[str, Callable[[Any], bool]], ...] = ()
        self.by_kind: dict[str, type[Message]] = {}
        fields = [f for f in ENVELOPE if RECORD in f.kinds]
        try:
            import msgspec

            from ranklog import envelope
        except ImportError:  # the collector extra is not installed: the untyped way only
            return
        names = envelope.RecordEnvelope.__struct_fields__
        if {"v", "kind"} - set(names) or [n for n in names if n not in ("v", "kind")] != [
            f.name for f in fields
        ]:
            return  # the struct does not say what the table says: the table decides alone
        hints = typing.get_type_hints(envelope.RecordEnvelope, include_extras=True)
        # For decode: a plain dict, checked in C, with the struct's types. A TypedDict skips
        # unknown keys, so the map must have exactly these (the untyped way keeps unknown
        # ones: it decides).
        spec = {name: hints[name] for name in names}
        checked = TypedDict("RecordEnvelopeMap", spec)  # type: ignore[misc]
        self.checked = msgspec.msgpack.Decoder(checked)
        self.header = _map_headers(len(spec))
        self.general = msgspec.msgpack.Decoder(envelope.RecordEnvelope)
        self.flat = msgspec.msgpack.Decoder(envelope.FlatRecordEnvelope)
        self.rest = tuple((f.name, f.rule.rest) for f in fields if f.rule.rest is not None)
        self.by_kind = envelope.BY_KIND

    def envelope(self, frame: bytes) -> dict[str, Any] | None:
        """The envelope :func:`decode`'s untyped way would return, or None: let it decide."""
        if self.checked is None or not frame.startswith(self.header):
            return None
        try:
            envelope: dict[str, Any] = self.checked.decode(frame)
        except Exception:  # msgspec's DecodeError or ValidationError: not the plain shape
            return None
        for name, rest in self.rest:
            if not rest(envelope[name]):
                return None
        return envelope

    def record(self, frame: bytes) -> RecordEnvelope | None:
        """A record as ranks send it, decoded and checked in C, or None: let the table
        decide (the same frames as :meth:`envelope`: the struct has the map's types and
        forbids other keys)."""
        if self.general is None or not frame.startswith(self.header):
            return None
        try:
            record = self.general.decode(frame)
        except Exception:  # msgspec's DecodeError or ValidationError: not the plain shape
            return None
        for name, rest in self.rest:
            if not rest(getattr(record, name)):
                return None
        return record

    def message(self, envelope: dict[str, Any]) -> Message:
        """The static type of an envelope the table checked, built from its map (whose
        values the table's rules make the struct's types; keys it does not know are left
        out)."""
        if not self.by_kind:
            raise RuntimeError("decoding into ranklog.envelope's types needs msgspec")
        cls = self.by_kind[envelope["kind"]]
        fields = {name: envelope[name] for name in cls.__struct_fields__ if name in envelope}
        fields["v"] = PROTOCOL_VERSION  # the table takes any value equal to it (1.0, True)
        return cls(**fields)

    def journaled(self, frame: bytes) -> RecordEnvelope | None:
        if self.general is None or self.flat is None:
            return None
        try:
            return self.flat.decode(frame)
        except Exception:
            pass
        try:
            return self.general.decode(frame)
        except Exception:
            return None


def _map_headers(count: int) -> tuple[bytes, ...]:
    """Every msgpack map header that says ``count`` entries."""
    heads = [b"\xde" + count.to_bytes(2, "big"), b"\xdf" + count.to_bytes(4, "big")]
    return (bytes([0x80 | count]), *heads) if count < 16 else tuple(heads)


_TYPED: _TypedRecords | None = None


def _typed_records() -> _TypedRecords:
    global _TYPED
    if _TYPED is None:
        _TYPED = _TypedRecords()
    return _TYPED


def _validate(envelope: dict[Any, Any], kind: str) -> None:
    for name, check in _CHECKS[kind]:
        if not check(envelope.get(name, _MISSING)):
            got = envelope.get(name, "<missing>")
            raise ProtocolError("bad-field", f"field {name!r} has an invalid value {got!r:.80}")
