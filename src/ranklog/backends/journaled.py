"""A journal entry read back: an envelope the collector accepted on its way in
(the journal's checksum guards the bytes since), so it is not validated again. The backends'
process reads records this way: as :class:`~ranklog.envelope.RecordEnvelope` where the typed
decoder takes them, else as a :class:`RecordMap`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypedDict, cast

import msgpack

from ranklog.wire import RECORD, _typed_records

if TYPE_CHECKING:
    from ranklog.envelope import RecordEnvelope


class RecordMap(TypedDict):
    """A record envelope as msgpack decodes it: the keys of
    :class:`~ranklog.envelope.RecordEnvelope`, with values as loose as the table's rules
    let through (``msg`` and ``extra`` values of any depth). What a journaled record the
    typed path does not take is."""

    v: int
    kind: str
    run: str
    rank: int
    inc: str
    local_rank: int
    world_size: int
    host: str
    pid: int
    seq: int
    time: float
    logger: str
    level: int
    step: int | None
    hparams: bool
    msg: object
    extra: dict[str, object]


def decode_journaled(frame: bytes) -> dict[str, object]:
    """Decode a journal entry: an envelope :func:`decode` accepted on its way in (the
    journal's checksum guards the bytes since), so it is not validated again."""
    envelope: dict[str, object] = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    return envelope


def decode_journaled_map(frame: bytes) -> RecordMap | None:
    """A journaled record as a :class:`RecordMap` (None: a goodbye), for a record
    :func:`decode_journaled_record` does not take."""
    envelope = decode_journaled(frame)
    # The table checked every field of it before it was journaled.
    return cast(RecordMap, envelope) if envelope.get("kind") == RECORD else None


def decode_journaled_record(frame: bytes) -> RecordEnvelope | None:
    """A journaled record as a :class:`~ranklog.envelope.RecordEnvelope`, or None: not a
    record, not the shape the typed path takes, or no msgspec (then use
    :func:`decode_journaled`). Its class's ``flat`` is True when ``msg`` is a dict of
    str keys and plain values (numbers, text, flags, nil), as ranks usually send."""
    return _typed_records().journaled(frame)


def journaled_record_decoder() -> Callable[[bytes], RecordEnvelope | None]:
    """:func:`decode_journaled_record` itself, for a loop over many entries."""
    return _typed_records().journaled
