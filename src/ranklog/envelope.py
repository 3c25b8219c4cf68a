"""Every envelope kind as one static type, a ``msgspec.Struct``: the collector decodes frames
into them (``ranklog.wire.decode_message``), the backends decode journaled records into them
(``build_record`` and the JSONL backend read them). Attributes are named as the wire's keys.
The rank side never imports this module (nor msgspec): it packs the same fields from
``ranklog.wire``'s table, which :class:`RecordEnvelope` must match field for field and in
order (``wire._TypedRecords`` checks that, and turns the typed path off otherwise).

A record is decoded in C into :class:`RecordEnvelope`, whose types may be stricter than the
table's rules (a record it refuses goes the table's way, which decides and names the field)
but never more lenient; what the table takes and it does not becomes a
:class:`LooseRecordEnvelope`. The other kinds are built from the map the table checked.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec

from ranklog.names import MAX_NAME_CHARS

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
Count = Annotated[int, msgspec.Meta(ge=0)]
# The values ranks send: numbers, text, flags, nil; lists and maps of them one level deep.
# Anything else (bytes, deeper nesting) goes the table's way.
Scalar = bool | int | float | str | None
Value = Scalar | list[Scalar] | dict[str, Scalar]


class _FromRank(msgspec.Struct, gc=False):
    """What every envelope from a rank carries first: who sent it."""

    v: Literal[1]
    run: Name
    rank: Count
    inc: Name
    local_rank: Count
    world_size: Annotated[int, msgspec.Meta(ge=1)]
    host: Name
    pid: Count


class RecordFields(_FromRank, gc=False):
    """What every ``record`` envelope (docs/protocol.md) carries besides its message and its
    extras, attributes named as its keys, in the order ranks pack them. gc=False: nothing in
    an envelope refers back to it (its dicts are still tracked)."""

    kind: Literal["record"]
    seq: Annotated[int, msgspec.Meta(ge=1)]
    time: int | float
    logger: Name
    level: Count
    step: int | None
    hparams: bool


class RecordEnvelope(RecordFields, forbid_unknown_fields=True, gc=False):
    """A ``record`` envelope as ranks send it: decoded and checked in C."""

    msg: dict[str, Value] | str
    extra: dict[str, Value]

    #: True when ``msg`` is a dict of str keys and plain values, as ranks usually send.
    flat: ClassVar[bool] = False


class FlatRecordEnvelope(RecordEnvelope, forbid_unknown_fields=True, gc=False):
    """A record whose ``msg`` is flat: a dict of plain values, written as it is."""

    msg: dict[str, Scalar]  # type: ignore[assignment]
    flat: ClassVar[bool] = True


class LooseRecordEnvelope(RecordFields, gc=False):
    """A ``record`` envelope :class:`RecordEnvelope` does not take but the table does (a
    value nested deeper, bytes, a key that is not text): built from the map the table
    checked, its message and extras as loose as the table lets them be."""

    msg: dict[object, object] | str
    extra: dict[str, object]


class _Counters(_FromRank, kw_only=True, gc=False):
    """The rank's counters, which hello, heartbeat and goodbye carry."""

    base: Count
    dropped: Count
    converted: Count
    resent: Count = 0  # optional on the wire: absent from ranks that do not report it


class HelloEnvelope(_Counters, kw_only=True, gc=False):
    """A rank's first envelope on a connection."""

    kind: Literal["hello"]


class HeartbeatEnvelope(_Counters, kw_only=True, gc=False):
    """A rank's sign of life while it has nothing to send."""

    kind: Literal["heartbeat"]


class GoodbyeEnvelope(_Counters, kw_only=True, gc=False):
    """A rank's last envelope: ``seq`` is the last it sent, ``spilled`` what it left in its
    spill file."""

    kind: Literal["goodbye"]
    seq: Annotated[int, msgspec.Meta(ge=1)]
    spilled: Count = 0  # optional on the wire


class AckEnvelope(msgspec.Struct, kw_only=True, gc=False):
    """The collector's acknowledgement (``ranklog.wire.pack_ack`` packs it)."""

    v: Literal[1]
    kind: Literal["ack"]
    run: Name
    rank: Count
    inc: Name
    seq: Count
    got: Count | None = None  # optional on the wire


#: A record envelope, whichever way it was decoded.
AnyRecord = RecordEnvelope | LooseRecordEnvelope
#: What a rank sends.
FromRank = AnyRecord | HelloEnvelope | HeartbeatEnvelope | GoodbyeEnvelope
#: Any envelope of wire format v1: what ``ranklog.wire.decode_message`` returns.
Message = FromRank | AckEnvelope
#: The class of each kind an envelope's map is built into (a record: the loose one).
BY_KIND: dict[str, type[Message]] = {
    "record": LooseRecordEnvelope,
    "hello": HelloEnvelope,
    "heartbeat": HeartbeatEnvelope,
    "goodbye": GoodbyeEnvelope,
    "ack": AckEnvelope,
}
