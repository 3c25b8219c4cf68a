"""Wire format v1: versioned msgpack maps, one envelope per ZeroMQ frame (see docs/protocol.md).

Never pickle: a frame decodes to plain maps, lists, strings and numbers, and every field is
checked before the collector trusts it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
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
_NOT_EXTRA = RESERVED_EXTRA_KEYS | _HANDLED_EXTRAS
# A record's own envelope fields, after the identity fields and kind (see RecordEncoder.record).
_RECORD_FIELDS = ("seq", "time", "logger", "level", "step", "hparams", "msg", "extra")


class HostCopy:
    """A device value on its way to host memory; the sender thread packs it once ``done()``.

    ``buffer`` holds the copy (anything with ``.item()``) and ``done`` says whether the copy
    finished (for CUDA, ``torch.cuda.Event.query``). Reading ``buffer`` before then would
    read garbage; waiting for it on the caller's thread would be the host sync we avoid.
    """

    __slots__ = ("buffer", "done")

    def __init__(self, buffer: Any, done: Callable[[], bool]) -> None:
        self.buffer = buffer
        self.done = done

    def value(self) -> Any:
        return self.buffer.item()


def start_cuda_copy(value: Any) -> HostCopy | None:
    """Start copying a one-element CUDA tensor into pinned host memory; None if not one.

    The copy and the event go on the tensor's device's current stream, after the work that
    produces the value; nothing here waits for the device.
    """
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(value, torch.Tensor):
        return None
    if not value.is_cuda or value.numel() != 1:
        return None
    buffer = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    buffer.copy_(value.detach(), non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(value.device))
    return HostCopy(buffer, event.query)


class _SlowPath(Exception):
    """Raised inside packing: a value needs the careful path (a device copy, or a repr)."""


class DeferredRecord:
    """A record envelope waiting for its :class:`HostCopy` values; packed on the sender thread.

    ``result()`` never blocks and never raises: it returns None until every copy is done, then
    the packed envelope (a value that cannot be read is sent as None).
    """

    __slots__ = ("_copies", "_fields", "_head", "data", "nbytes")

    def __init__(self, head: bytes, fields: dict[str, Any], copies: list[HostCopy]) -> None:
        self._head = head
        self._fields: dict[str, Any] | None = fields
        self._copies = copies
        self.data: bytes | None = None
        # The outbox bounds bytes before the values are known; floats pack in 9 bytes.
        self.nbytes = len(head) + len(msgpack.packb(fields, default=_placeholder))

    def result(self) -> bytes | None:
        if self.data is not None or self._fields is None:
            return self.data
        try:
            if not all(copy.done() for copy in self._copies):
                return None
        except Exception:
            pass  # a broken device: send what can be read rather than hold the record forever
        fields = self._fields
        step = fields["step"]
        if isinstance(step, HostCopy):
            fields["step"] = _integral(_read(step))
        self.data = self._head + msgpack.packb(fields, default=_read)[1:]
        self._fields = None
        self._copies = []
        return self.data


def _placeholder(value: Any) -> Any:
    return 0.0


def _read(value: Any) -> Any:
    if isinstance(value, HostCopy):
        try:
            number = value.value()
        except Exception:
            return None
        return number if isinstance(number, bool | int | float) else None
    return None


def _integral(number: Any) -> int | None:
    if type(number) is int:
        return number
    if isinstance(number, float) and number.is_integer():
        return int(number)
    return None


def _map_body(fields: dict[str, Any]) -> bytes:
    """``fields`` packed as map entries, without the map header."""
    header: bytes = msgpack.Packer().pack_map_header(len(fields))
    packed: bytes = msgpack.packb(fields)
    return packed[len(header) :]


class RecordEncoder:
    """Builds and packs envelopes for one process identity (caller thread only).

    Values msgpack cannot carry are converted: numpy and torch scalars (and one-element
    CPU tensors) to Python numbers, anything else to its ``repr``; ``converted`` counts the
    ``repr`` fallbacks so they reach the collector. A one-element CUDA tensor is not read
    here: ``host_copy`` starts its copy to host memory and ``record`` returns a
    :class:`DeferredRecord` that the sender thread packs once the copy is done.
    """

    def __init__(
        self,
        identity: RankIdentity,
        *,
        host_copy: Callable[[Any], HostCopy | None] = start_cuda_copy,
    ) -> None:
        self.converted = 0
        self._host_copy = host_copy
        self._copies: list[HostCopy] | None = None
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
        # The identity part of every record envelope is packed once: a record packs only its
        # own fields (a map of _RECORD_FIELDS entries, so a one-byte header) and is joined
        # behind this head, which carries the header of the whole map.
        fixed = {**self._identity_fields, "kind": RECORD}
        header: bytes = msgpack.Packer().pack_map_header(len(fixed) + len(_RECORD_FIELDS))
        self._record_head = header + _map_body(fixed)

    def record(self, seq: int, record: logging.LogRecord) -> bytes | DeferredRecord:
        """Pack one LogRecord as a ``record`` envelope (deferred if it holds CUDA values)."""
        attrs = record.__dict__
        msg: Any = record.msg
        if type(msg) is not dict:
            msg = dict(msg) if isinstance(msg, Mapping) else record.getMessage()
        step = attrs.get("step")
        if step is not None and type(step) is not int:
            step = self._step(step)
        hparams = attrs.get("hparams", False)
        fields = {
            "seq": seq,
            "time": record.created,
            "logger": record.name,
            "level": record.levelno,
            "step": step,
            "hparams": hparams if type(hparams) is bool else bool(hparams),
            "msg": msg,
            # Checking that every attribute is a known one is a fifth of the cost of the scan.
            "extra": {} if _NOT_EXTRA.issuperset(attrs) else _extra(attrs),
        }
        try:
            body: bytes = self._packer.pack(fields)
            return self._record_head + body[1:]
        except (TypeError, ValueError, OverflowError, _SlowPath):
            pass  # rare: odd values or keys, huge ints, cycles, absurd nesting, device values
        copies: list[HostCopy] = []
        self._copies = copies
        try:
            safe = self._sanitize(fields, 0)
        finally:
            self._copies = None
        if copies:
            return DeferredRecord(self._record_head, safe, copies)
        body = self._packer.pack(safe)
        return self._record_head + body[1:]

    def control(self, kind: str, **fields: Any) -> bytes:
        """Pack a hello, heartbeat or goodbye envelope."""
        envelope = {**self._identity_fields, "kind": kind, **fields}
        try:
            packed: bytes = self._packer.pack(envelope)
        except (TypeError, ValueError, OverflowError):
            packed = self._packer.pack(self._sanitize(envelope, 0))
        return packed

    def _step(self, value: Any) -> Any:
        try:
            number = value if isinstance(value, int | float) else self._to_wire(value)
        except _SlowPath:
            copy = self._host_copy(value)
            if copy is not None:
                return copy  # read on the sender thread once on the host, like a metric
            number = None
        if isinstance(number, int) or (isinstance(number, float) and number.is_integer()):
            return int(number)
        self.converted += 1
        return None

    def _to_wire(self, value: Any) -> Any:
        module = type(value).__module__
        if module == "numpy" and getattr(value, "ndim", None) == 0:
            return value.item()
        torch = sys.modules.get("torch") if module.startswith("torch") else None
        tensor = torch is not None and isinstance(value, torch.Tensor)
        if tensor and value.numel() == 1 and not value.is_cuda:
            return value.item()
        if isinstance(value, set | frozenset):
            return list(value)
        if self._copies is None:
            # Inside the packer: anything else takes the slow path, which may defer it.
            raise _SlowPath
        copy = self._host_copy(value)
        if copy is not None:
            self._copies.append(copy)
            return copy
        self.converted += 1
        if tensor and value.device.type != "cpu":
            # repr() would copy the data to the host and wait for the device.
            return f"tensor(shape={list(value.shape)}, dtype={value.dtype}, device={value.device})"
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
        if isinstance(value, HostCopy) and self._copies is not None:
            self._copies.append(value)  # a step already on its way to the host
            return value
        converted = self._to_wire(value)
        if isinstance(converted, HostCopy):
            return converted
        return self._sanitize(converted, depth + 1)


def _extra(attrs: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in attrs.items() if key not in _NOT_EXTRA}


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
