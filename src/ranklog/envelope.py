"""The record envelope as one static type: a ``msgspec.Struct`` the collector and the
backends decode a record into (checked in C), and that ``build_record`` and the JSONL
backend read. The rank side never imports this module (nor msgspec): it packs the same
fields from ``ranklog.wire``'s table, which this struct must match field for field and in
order (``wire._TypedRecords`` checks that, and turns the typed path off otherwise).

Each type here may be stricter than the table's rule (a record it refuses goes the table's
way, which decides and names the field) but never more lenient.
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


class RecordEnvelope(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A ``record`` envelope (docs/protocol.md), attributes named as its keys. gc=False:
    nothing in an envelope refers back to it (its dicts are still tracked)."""

    v: Literal[1]
    kind: Literal["record"]
    run: Name
    rank: Count
    inc: Name
    local_rank: Count
    world_size: Annotated[int, msgspec.Meta(ge=1)]
    host: Name
    pid: Count
    seq: Annotated[int, msgspec.Meta(ge=1)]
    time: int | float
    logger: Name
    level: Count
    step: int | None
    hparams: bool
    msg: dict[str, Value] | str
    extra: dict[str, Value]

    #: True when ``msg`` is a dict of str keys and plain values, as ranks usually send.
    flat: ClassVar[bool] = False


class FlatRecordEnvelope(RecordEnvelope, forbid_unknown_fields=True, gc=False):
    """A record whose ``msg`` is flat: a dict of plain values, written as it is."""

    msg: dict[str, Scalar]  # type: ignore[assignment]
    flat: ClassVar[bool] = True
